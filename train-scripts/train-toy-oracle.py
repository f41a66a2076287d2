"""Train the toy world's oracle classifiers (artist incl. blank, object, colour) and ship them.

    python train-scripts/train-toy-oracle.py               # -> models/toy/oracle.safetensors + oracle.json

They are trained on rendered images with brightness / contrast / tint / blur / noise jitter and
report their accuracy on fresh renders (seeds never seen in training), clean and jittered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train-toy.py: spinning threads starve a shared CPU

import torch  # noqa: E402

from erasure.cli import run_script  # noqa: E402
from erasure.toy import TOY_DIR  # noqa: E402
from erasure.toy.oracle import OracleTrainingConfig, save_oracle, train_oracle  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = OracleTrainingConfig()
    for f in fields(OracleTrainingConfig):
        parser.add_argument(f"--{f.name}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    parser.add_argument("--out_dir", type=Path, default=TOY_DIR, help="where oracle.safetensors/.json are written")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = OracleTrainingConfig(**{f.name: getattr(args, f.name) for f in fields(OracleTrainingConfig)})
    oracle, meta = train_oracle(config)
    path = save_oracle(oracle, meta, args.out_dir)
    print(json.dumps(meta["accuracy_on_fresh_renders"], indent=2))
    print(f"wrote {path} and {path.with_suffix('.json')} ({meta['train_seconds']} s)")


if __name__ == "__main__":
    run_script(main)
