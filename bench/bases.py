"""Benchmark 1 (issue 6): our float64 SVD null space vs exact symbolic elimination (sympy).

The protected matrix of a concept stacks the L token rows of ``""`` and of every other protected
prompt (METHOD.md §2). The benchmark builds CLIP-like ones: width d and L tokens per prompt as
SD v1's text encoder (768 and 77); the first token's row is the same for every prompt (as CLIP's
output at the start token is), the other rows are a shared low-rank structure with a decaying
spectrum plus noise, and every value is rounded to float32 (the encoder's output type). Such a
matrix has rank 1 + prompts * (L - 1) (at most d), as the rows of real prompts have.

- ``svd``: ``erasure.bases.null_space`` (float64 SVD, rank tolerance 1e-6 of the largest singular
  value), timed as the mean of ``--svd_number`` calls.
- ``sympy``: ``sympy.Matrix(rows).nullspace()`` (Gaussian elimination to reduced row echelon form),
  conversion to a sympy Matrix included, run in its own process with a time limit. ``--arithmetic
  float``: the matrix is given to sympy as Python floats (sympy ``Float``, 53-bit), what passing an
  embedding array to ``sympy.Matrix`` does; ``rational``: every float32 value as the exact
  ``sympy.Rational`` it is, so the elimination is exact. Which of the two the authors' code does
  could not be checked here (their code was not available offline); both are offered.
Reported per size: both times, their ratio (goal >= 1000x), null-space dimensions, the largest
principal angle between the two subspaces (scipy.linalg.subspace_angles; goal < 1e-6 rad) and
each basis' residual max|E s| / max|E|. A size whose sympy run passes ``--sympy_timeout`` is
reported as not finished.

    python bench/bases.py                           # 1 and 2 protected prompts, 77 x 768 rows each
    python bench/bases.py --quick                   # 8 x 64 rows per prompt (smoke test)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import scipy.linalg
import sympy
import torch

from common import add_common_arguments, bench_parser, print_json, print_table, progress, run_in_process, run_main, setup, sized
from erasure.bases import DEFAULT_RTOL, null_space

SPEEDUP_GOAL = 1000.0
ANGLE_GOAL = 1e-6
STRUCTURE_RANK = 32
NOISE = 1e-2
ARITHMETICS = ("float", "rational")


def clip_like_matrix(prompts: int, tokens: int, width: int, seed: int) -> torch.Tensor:
    """A protected matrix [prompts * tokens, width] of float32 values (as float64), see the docstring."""
    generator = torch.Generator().manual_seed(seed)
    first_token = torch.randn(width, generator=generator, dtype=torch.float64)
    spectrum = torch.logspace(1, -1, STRUCTURE_RANK, dtype=torch.float64)
    structure = spectrum[:, None] * torch.randn(STRUCTURE_RANK, width, generator=generator, dtype=torch.float64)
    blocks = []
    for _ in range(prompts):
        mixing = torch.randn(tokens - 1, STRUCTURE_RANK, generator=generator, dtype=torch.float64)
        noise = NOISE * torch.randn(tokens - 1, width, generator=generator, dtype=torch.float64)
        blocks.append(torch.cat([first_token[None], mixing @ structure / STRUCTURE_RANK**0.5 + noise]))
    return torch.cat(blocks).to(torch.float32).to(torch.float64)


def sympy_null_space(rows: list[list[float]], arithmetic: str) -> tuple[float, np.ndarray]:
    """Seconds of ``Matrix(...).nullspace()`` (conversion included) and the basis as columns [d, k]."""
    started = time.perf_counter()
    if arithmetic == "rational":
        matrix = sympy.Matrix([[sympy.Rational(value) for value in row] for row in rows])
    else:
        matrix = sympy.Matrix(rows)
    vectors = matrix.nullspace()
    seconds = time.perf_counter() - started
    width = len(rows[0])
    basis = np.array([[float(value) for value in vector] for vector in vectors]).T if vectors else np.zeros((width, 0))
    return seconds, basis


def residual(matrix: np.ndarray, basis: np.ndarray) -> float:
    """max |E s| / max |E| over unit-norm basis vectors s (columns of ``basis``)."""
    if basis.shape[1] == 0:
        return 0.0
    unit = basis / np.linalg.norm(basis, axis=0, keepdims=True)
    return float(np.abs(matrix @ unit).max() / np.abs(matrix).max())


def time_svd(matrix: torch.Tensor, number: int) -> tuple[float, torch.Tensor, int]:
    """Mean seconds of ``number`` calls of ``null_space``, its basis [dims, d] and the rank."""
    started = time.perf_counter()
    for _ in range(number):
        basis, rank, _ = null_space(matrix, DEFAULT_RTOL)
    return (time.perf_counter() - started) / number, basis, rank


def bench_size(prompts: int, arithmetic: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    matrix = clip_like_matrix(prompts, args.tokens, args.width, args.seed + prompts)
    progress(f"{prompts} prompt(s), {matrix.shape[0]} x {matrix.shape[1]}, sympy {arithmetic}")
    rows = matrix.tolist()
    svd_times, sympy_times = [], []
    finished = True
    for repeat in range(args.repeats):
        for method in ("svd", "sympy") if repeat % 2 == 0 else ("sympy", "svd"):
            if method == "svd":
                seconds, ours, rank = time_svd(matrix, args.svd_number)
                svd_times.append(seconds)
            elif finished:
                try:
                    seconds, sympy_basis = run_in_process(
                        sympy_null_space, (rows, arithmetic), device, args.sympy_timeout
                    )
                    sympy_times.append(seconds)
                except TimeoutError:
                    finished = False
    row: dict[str, Any] = {
        "prompts": prompts,
        "rows": matrix.shape[0],
        "width": matrix.shape[1],
        "arithmetic": arithmetic,
        "rank": rank,
        "svd_dims": ours.shape[0],
        "svd_s": float(np.median(svd_times)),
        "svd_residual": residual(matrix.numpy(), ours.numpy().T),
        "sympy_finished": finished,
    }
    if not finished:
        row["sympy_s"] = f"> {args.sympy_timeout:g}"
        return row
    sympy_s = float(np.median(sympy_times))
    row.update(
        sympy_dims=sympy_basis.shape[1],
        sympy_s=sympy_s,
        speedup=sympy_s / row["svd_s"],
        sympy_residual=residual(matrix.numpy(), sympy_basis),
    )
    if row["sympy_dims"] == row["svd_dims"]:
        row["max_angle_rad"] = float(scipy.linalg.subspace_angles(ours.numpy().T, sympy_basis).max())
    else:
        row["max_angle_rad"] = "dims differ"
    return row


def goal_met(row: dict[str, Any]) -> bool:
    angle = row.get("max_angle_rad")
    return (
        row["sympy_finished"]
        and isinstance(angle, float)
        and angle < ANGLE_GOAL
        and row["speedup"] >= SPEEDUP_GOAL
    )


def main(args: argparse.Namespace) -> None:
    device = setup(args)
    if device.type != "cpu":
        raise ValueError("The bases benchmark runs on the CPU (both methods are CPU code); drop --device.")
    args.width = sized(args.width, args.quick, 64, 768)
    args.tokens = sized(args.tokens, args.quick, 8, 77)
    if min(args.svd_number, args.width, *args.prompts) < 1 or args.sympy_timeout <= 0 or args.tokens < 2:
        raise ValueError("--svd_number, --width, --prompts and --sympy_timeout must be positive and --tokens >= 2.")
    rows = [bench_size(prompts, arithmetic, args, device) for arithmetic in args.arithmetic for prompts in args.prompts]
    for row in rows:
        row["goal_met"] = goal_met(row)
    print_table(
        f"Null space of CLIP-like protected matrices ({args.tokens} tokens x {args.width} per prompt), "
        f"{args.repeats} repeat(s)",
        rows,
        ["prompts", "rows", "width", "arithmetic", "rank", "svd_dims", "sympy_dims", "svd_s", "sympy_s", "speedup",
         "max_angle_rad", "svd_residual", "sympy_residual", "goal_met"],
    )
    print_json(
        "bases", args, torch.device("cpu"),
        {"rows": rows, "goals": {"speedup_at_least": SPEEDUP_GOAL, "angle_below_rad": ANGLE_GOAL}},
    )


def parser() -> argparse.ArgumentParser:
    result = bench_parser(__doc__)
    result.add_argument("--prompts", type=int, nargs="+", default=[1, 2],
                        help="protected prompts per matrix, one size each (default: 1 2)")
    result.add_argument("--width", type=int, default=None, help="text width d (default: 768; --quick: 64)")
    result.add_argument("--tokens", type=int, default=None, help="tokens per prompt L (default: 77; --quick: 8)")
    result.add_argument("--arithmetic", nargs="+", choices=ARITHMETICS, default=list(ARITHMETICS),
                        help="how sympy receives the values (default: both)")
    result.add_argument("--svd_number", type=int, default=20, help="SVD calls averaged per repeat (default: 20)")
    result.add_argument("--sympy_timeout", type=float, default=1800.0,
                        help="seconds before a sympy run is given up (default: 1800)")
    return add_common_arguments(result, repeats=1)


if __name__ == "__main__":
    run_main(main, parser())
