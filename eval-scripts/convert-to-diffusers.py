"""Export an ldm model (the embedded toy model or SD v1.x) to diffusers, optionally with erasures.

Full export (default): a folder that ``StableDiffusionPipeline.from_pretrained(folder)`` loads.
``--unet_only``: a folder that ``UNet2DConditionModel.from_pretrained(folder)`` loads
(config.json + diffusion_pytorch_model.safetensors); the only choice for the toy model, whose
first stage is not a KL autoencoder. It needs no text tokenizer (nothing from the Hugging Face Hub).
``--apply``: increment / weight-difference files folded into the exported weights (the files
are checked against the model first).
Either folder also holds ``erasure_provenance.json``: the base model's fingerprint, every
applied file (path, sha256, concept, the fingerprints and metadata in its header), the export
settings and the library versions.

    python eval-scripts/convert-to-diffusers.py --config_path configs/stable-diffusion/v1-inference.yaml \\
        --ckpt_path sd-v1-4-full-ema.ckpt --use_ema --dump_path outputs/sd-v1-4-diffusers
"""

from __future__ import annotations

import argparse
from pathlib import Path

from erasure.cli import add_model_arguments, load_model_from_args, run_script
from erasure.convert import PROVENANCE_NAME, export_diffusers
from erasure.edits import load_edit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--dump_path", required=True, help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--unet_only", action="store_true", help="export only the UNet (UNet2DConditionModel folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dump_path")
    parser.add_argument(
        "--apply",
        nargs="+",
        default=[],
        metavar="FILE",
        help="increment or weight-difference files to fold into the exported weights",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    edits = [load_edit(path) for path in args.apply]
    model = load_model_from_args(args, needs_tokenizer=not args.unet_only)
    written = export_diffusers(model, args.dump_path, unet_only=args.unet_only, overwrite=args.overwrite, edits=edits)
    kind = "UNet2DConditionModel" if args.unet_only else "StableDiffusionPipeline"
    applied = ", ".join(edit.describe() for edit in edits) or "no edits"
    print(f"Wrote {kind} with {applied} to {written} (provenance: {written / PROVENANCE_NAME})")
    return written


if __name__ == "__main__":
    run_script(main)
