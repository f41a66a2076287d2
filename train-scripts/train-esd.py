"""Train the ESD-x / ESD-u baseline (a weight-difference file).

Flags: python train-scripts/train-esd.py --help. Defaults are METHOD.md's reference settings;
processes and devices: --accelerator, --devices, --num_nodes, --strategy (Lightning Fabric).
"""

from erasure.cli import esd_parser, train_main
from erasure.settings import ESDSettings

if __name__ == "__main__":
    train_main(esd_parser(), ESDSettings)
