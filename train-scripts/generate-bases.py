"""Compute SepCE null-space bases (METHOD.md §2) and write one safetensors file per concept.

Joint (default): each concept protects "", every other listed concept and --protected prompts.
--sequential: concept i protects "", concepts 0..i-1 and --protected prompts.
Prints a table (concept, rank, dims, reach) and, as its last line, a JSON summary.

    python train-scripts/generate-bases.py --concepts "vela quorin" "tamsin brack" --output_dir outputs/bases
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from erasure.bases import DEFAULT_MIN_DIMS, DEFAULT_RTOL, compute_bases, save_basis
from erasure.cli import run_script
from erasure.files import check_writable
from erasure.increments import slugify
from erasure.cli import add_model_arguments, load_model_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--concepts", nargs="+", required=True, help="concepts to erase (one basis each)")
    parser.add_argument("--protected", nargs="*", default=[], help="extra prompts every basis protects")
    parser.add_argument("--sequential", action="store_true", help="concept i protects only concepts 0..i-1")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="relative singular-value cut-off of the rank")
    parser.add_argument("--min_dims", type=int, default=DEFAULT_MIN_DIMS, help="refuse smaller null spaces")
    parser.add_argument("--output_dir", default="outputs/bases", help="folder for basis-<concept>.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace existing basis files")
    return parser.parse_args(argv)


def basis_path(output_dir: Path, concept: str) -> Path:
    return output_dir / f"basis-{slugify(concept)}.safetensors"


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    paths = {concept: basis_path(output_dir, concept) for concept in args.concepts}
    for path in paths.values():  # refuse before any work, so nothing is half-written
        check_writable(path, args.overwrite)
    model = load_model_from_args(args)
    bases = compute_bases(
        model, args.concepts, args.protected, rtol=args.rtol, min_dims=args.min_dims, sequential=args.sequential
    )
    rows = []
    print(f"{'concept':<28} {'rank':>5} {'dims':>5} {'reach':>6}  file")
    for concept, basis in bases.items():
        written = save_basis(basis, paths[concept], overwrite=args.overwrite)
        print(f"{concept:<28} {basis.rank:>5} {basis.dims:>5} {basis.concept_reach:>6.3f}  {written}")
        rows.append({"concept": concept, "file": str(written), "rank": basis.rank, "dims": basis.dims,
                     "concept_reach": round(basis.concept_reach, 4), "protected_prompts": basis.protected_prompts})
    summary = {
        "mode": "sequential" if args.sequential else "joint",
        "text_width": next(iter(bases.values())).width,
        "rtol": args.rtol,
        "bases": rows,
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_script(main)
