"""Train CiE on every attn2 weight (a weight-difference file).

Flags: python train-scripts/train-cie.py --help. Defaults are METHOD.md's reference settings;
processes and devices: --accelerator, --devices, --num_nodes, --strategy (Lightning Fabric).
"""

from erasure.trainers.cli import cie_parser, main, run_cie

if __name__ == "__main__":
    main(run_cie, cie_parser())
