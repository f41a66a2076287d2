"""Train SepCE increments (one separable increment per concept).

Flags: python train-scripts/train-sepce.py --help. Defaults are METHOD.md's reference settings;
with no arguments it erases the first toy artist from the embedded toy model and
writes the increment, a before/after grid and the toy oracle's accuracy table.
"""

from erasure.cli import sepce_parser, train_main
from erasure.settings import SepCESettings

if __name__ == "__main__":
    train_main(sepce_parser(), SepCESettings)
