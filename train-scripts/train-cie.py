"""Train CiE on every attn2 weight (a weight-difference file).

Flags: python train-scripts/train-cie.py --help. Defaults are METHOD.md's reference settings;
processes and devices: --accelerator, --devices, --num_nodes, --strategy (Lightning Fabric).
"""

from erasure.cli import cie_parser, train_main
from erasure.settings import CiESettings

if __name__ == "__main__":
    train_main(cie_parser(), CiESettings)
