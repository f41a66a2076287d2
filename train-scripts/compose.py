"""Compose increments (and baseline weight differences) onto the base model; verify; export.

--verify (increments only): composes them, prints the largest relative key/value change over
every protected prompt of every increment and the largest absolute difference between the
original model and the model after compose -> detach-all, as JSON on the last line; it fails
(exit status 2, ``error: ...``) when that change exceeds --rtol (default 1e-4: float rounding
gives 1e-8 .. 2e-7, a broken or tampered basis about 1) or NaN, or the restore is not exact.
--output: writes the composed model, increments merged, as an ldm safetensors checkpoint that
loads with the base model's config (e.g. --ckpt_path for txt2img or the diffusers export).

    python train-scripts/compose.py --increments outputs/sepce-*.safetensors --verify
    python train-scripts/compose.py --increments a.safetensors b.safetensors --output composed.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from erasure.cli import add_model_arguments, load_model_from_args, run_script
from erasure.edits import apply, load_edit
from erasure.files import check_free_space, check_writable
from erasure.errors import VerificationError
from erasure.increments import DEFAULT_VERIFY_RTOL, Increment, IncrementError, export_checkpoint, verify


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument(
        "--increments", nargs="+", required=True, metavar="FILE", help="increment or weight-difference files"
    )
    parser.add_argument("--verify", action="store_true", help="check exactness of the increments (JSON last line)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_VERIFY_RTOL,
                        help=f"--verify fails above this relative key/value change of a protected prompt "
                        f"(default: {DEFAULT_VERIFY_RTOL:g}; float rounding gives about 1e-7)")
    parser.add_argument("--output", default=None, help="write the composed model here (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    started = time.perf_counter()
    if not 0 < args.rtol < float("inf"):
        raise IncrementError(f"--rtol must be a positive finite number, got {args.rtol}.")
    if args.output:
        check_writable(args.output, args.overwrite)
    items = [load_edit(path) for path in args.increments]
    differences = [str(item.source) for item in items if not isinstance(item, Increment)]
    if args.verify and differences:
        raise IncrementError(
            f"--verify checks SepCE increments, but {differences} are weight differences (which change every "
            f"prompt by design); verify the increments alone."
        )
    model = load_model_from_args(args)
    if args.output:
        size = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
        check_free_space(Path(args.output).parent, size, "The composed model (--output) would")
    result: dict[str, object] = {}
    if args.verify:
        try:
            result.update(verify(model, items, rtol=args.rtol))
        except VerificationError as error:
            print(json.dumps({**error.report, "passed": False}))
            raise
        print(
            f"Verified {len(items)} increments: protected keys/values change by <= "
            f"{result['max_relative_kv_change']:.3g} (relative); compose -> detach differs by "
            f"{result['max_restore_abs_diff']:.3g}."
        )
    applied = apply(model, items)
    result["applied"] = {"increments": applied.increments, "weight_differences": applied.weight_differences}
    if args.output:
        result["output"] = str(export_checkpoint(model, args.output, overwrite=args.overwrite))
        print(f"Wrote the composed model to {result['output']}")
    result["seconds"] = round(time.perf_counter() - started, 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_script(main)
