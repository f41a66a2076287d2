"""Train the ESD-x / ESD-u baseline (a weight-difference file).

Flags: python train-scripts/train-esd.py --help. Defaults are METHOD.md's reference settings;
processes and devices: --accelerator, --devices, --num_nodes, --strategy (Lightning Fabric).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from erasure.trainers.cli import main, run_esd, esd_parser  # noqa: E402

if __name__ == "__main__":
    main(run_esd, esd_parser())
