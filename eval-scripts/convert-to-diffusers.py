"""Export an ldm model (the embedded toy model or SD v1.x) to diffusers, optionally with erasures.

Full export (default): a folder that ``StableDiffusionPipeline.from_pretrained(folder)`` loads.
``--unet_only``: the UNet alone in ``UNet2DConditionModel`` format (one safetensors + config.json);
the only choice for the toy model, whose first stage is not a KL autoencoder.
``--apply``: increment / weight-difference files composed onto the model first (folded into
the exported weights).

    python eval-scripts/convert-to-diffusers.py --config_path configs/stable-diffusion/v1-inference.yaml \\
        --ckpt_path sd-v1-4-full-ema.ckpt --use_ema --dump_path outputs/sd-v1-4-diffusers
"""

from __future__ import annotations

import argparse
from pathlib import Path

from erasure.cli import run_script
from erasure.convert import export_diffusers
from erasure.increments import apply_any, load_any
from erasure.loading import add_model_arguments, load_model_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--dump_path", required=True, help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--unet_only", action="store_true", help="export only the UNet (UNet2DConditionModel format)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dump_path")
    parser.add_argument(
        "--apply",
        nargs="+",
        default=[],
        metavar="FILE",
        help="increment or weight-difference files to compose onto the model before the export",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    model = load_model_from_args(args)
    if args.apply:
        applied = apply_any(model, [load_any(path) for path in args.apply])
        print(f"Applied increments {applied['increments']}, weight differences {applied['weight_differences']}")
    written = export_diffusers(model, args.dump_path, unet_only=args.unet_only, overwrite=args.overwrite)
    kind = "UNet2DConditionModel" if args.unet_only else "StableDiffusionPipeline"
    print(f"Wrote {kind} to {written}")
    return written


if __name__ == "__main__":
    run_script(main)
