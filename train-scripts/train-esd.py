"""Train the ESD-x / ESD-u baseline (a weight-difference file).

Flags: python train-scripts/train-esd.py --help. Defaults are METHOD.md's reference settings;
processes and devices: --accelerator, --devices, --num_nodes, --strategy (Lightning Fabric).
"""

from erasure.trainers.cli import esd_parser, main, run_esd

if __name__ == "__main__":
    main(run_esd, esd_parser())
