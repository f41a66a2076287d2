"""Benchmark 6 (issue 6): erase one artist from Stable Diffusion v1.4 on a GPU, end to end.

Runs the code behind train-scripts/train-{sepce,cie,esd}.py (``erasure.runs.run_training``) on one
CUDA device with the real weights: load configs/stable-diffusion/v1-inference.yaml and the
checkpoint, make ``--num_images`` training images of the artist with the original model (SepCE
and CiE; kept under data/generated/<model fingerprint>/ and reused by later runs, so a second run
skips this), compute the basis (SepCE), train (at most ``--iterations`` steps) and write the
result to ``--output_dir``. Reports the wall time of the whole run, the training seconds and
steps, and the peak GPU memory (``torch.cuda.max_memory_allocated`` over the whole run).
Without a CUDA device or without the checkpoint it stops at once with one clear error.

    python bench/sd-gpu.py                                          # SepCE, "Van Gogh"
    python bench/sd-gpu.py --quick                                  # 10 steps on 4 images
    python bench/sd-gpu.py --method esd_x --ckpt_path /path/sd-v1-4-full-ema.ckpt
    python bench/sd-gpu.py -- --lr 0.01 --batch_size 2              # after --: the training script's flags
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import BenchError, bench_parser, print_json, print_table, run_main, sized
from erasure.runs import RunRequest, run_training
from erasure.settings import CiESettings, ESDSettings, SepCESettings, TrainingSettings
from erasure.training import default_fabric

REPO_ROOT = Path(__file__).resolve().parents[1]  # the bench runs from the checkout
DEFAULT_CKPT = REPO_ROOT / "models" / "ldm" / "stable-diffusion-v1" / "sd-v1-4-full-ema.ckpt"
SD_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
#: method -> its settings class (and, for ESD, the trained set)
METHODS: dict[str, tuple[type[TrainingSettings], dict[str, str]]] = {
    "sepce": (SepCESettings, {}),
    "cie": (CiESettings, {}),
    "esd_x": (ESDSettings, {"train_method": "xattn"}),
}


def check_requirements(ckpt_path: Path) -> torch.device:
    """The checkpoint and a CUDA device, or one error that says what is missing and what to do."""
    if not ckpt_path.is_file():
        raise BenchError(
            f"Checkpoint {ckpt_path} not found. Download sd-v1-4-full-ema.ckpt (CompVis/stable-diffusion-v-1-4-"
            f"original) to {DEFAULT_CKPT.relative_to(REPO_ROOT)} or pass --ckpt_path."
        )
    if not torch.cuda.is_available():
        raise BenchError(
            "This benchmark measures GPU time and memory and needs a CUDA GPU, but torch sees none here. Run it on a "
            "machine with an NVIDIA GPU and a CUDA build of torch."
        )
    return torch.device("cuda", torch.cuda.current_device())


def main(args: argparse.Namespace) -> None:
    device = check_requirements(Path(args.ckpt_path))
    args.iterations = sized(args.iterations, args.quick, 10, 1000)
    args.num_images = sized(args.num_images, args.quick, 4, 100)
    settings_class, extra = METHODS[args.method]
    sizes = {"iterations": args.iterations} | ({} if args.method == "esd_x" else {"num_images": args.num_images})
    request = RunRequest(
        concepts=(args.concept,), settings=settings_class(**sizes, **extra), config_path=str(SD_CONFIG),
        ckpt_path=str(args.ckpt_path), output_dir=Path(args.output_dir), overwrite=True, report=False,
    )
    torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    summary = run_training(default_fabric(device), request)
    torch.cuda.synchronize(device)
    row = {
        "method": args.method,
        "concept": args.concept,
        "total_s": time.perf_counter() - started,
        "train_s": summary["seconds"],
        "steps": max(concept["steps"] for concept in summary["concepts"].values()),
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20,
        "gpu": torch.cuda.get_device_name(device),
    }
    print_table("SD v1.4, one artist, end to end", [row], list(row))
    print_json("sd_gpu", args, device, {"result": row, "summary": summary})


def parser() -> argparse.ArgumentParser:
    result = bench_parser(__doc__)
    result.add_argument("--method", choices=tuple(METHODS), default="sepce", help="default: sepce")
    result.add_argument("--concept", default="Van Gogh", help="the artist to erase (default: Van Gogh)")
    result.add_argument("--ckpt_path", default=str(DEFAULT_CKPT),
                        help=f"default: {DEFAULT_CKPT.relative_to(REPO_ROOT)}")
    result.add_argument("--iterations", type=int, default=None, help="step limit (default: 1000; --quick: 10)")
    result.add_argument("--num_images", type=int, default=None,
                        help="training images to generate (default: 100; --quick: 4)")
    result.add_argument("--output_dir", default="outputs/bench-sd-gpu", help="default: outputs/bench-sd-gpu")
    result.add_argument("--quick", action="store_true", help="10 steps on 4 images: checks the whole path in minutes")
    return result


if __name__ == "__main__":
    run_main(main, parser())
