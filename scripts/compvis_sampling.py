"""What CompVis's sampling scripts (``txt2img.py``, ``img2img.py``) share: the model, prompts,
precision and their numbered outputs.

The scripts keep CompVis's flags, defaults and files (``samples/NNNNN.png`` numbered on from
the files already in the folder, ``grid-NNNN.png`` beside them). What differs is what makes them
run on current packages and on a CPU: the model is loaded by the project's one loader
(``erasure.load_model``: ``.ckpt`` or ``.safetensors``, every UNet/VAE/text-encoder weight checked)
on CUDA when present and else the CPU, autocast applies only on CUDA (as CompVis's
``autocast("cuda")`` did), and bad input is one ``error:`` line naming the flag to fix.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid
from tqdm import tqdm, trange

from erasure.errors import GenerationError, PromptFileError
from erasure.files import atomic_path
from erasure.generation import first_stage_factor
from erasure.loading import load_model

T = TypeVar("T")
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"


def chunk(it: Iterable[T], size: int) -> Iterator[tuple[T, ...]]:
    """Consecutive tuples of ``size`` items (the last one shorter)."""
    iterator = iter(it)
    return iter(lambda: tuple(islice(iterator, size)), ())


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """CompVis's ``--config``, ``--ckpt``, ``--seed`` and ``--precision``, with its defaults."""
    parser.add_argument("--config", type=str, default=DEFAULT_CONFIG, help="path to config which constructs model")
    parser.add_argument("--ckpt", type=str, default=DEFAULT_CKPT,
                        help="path to checkpoint of model (.ckpt, or .safetensors)")
    parser.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    parser.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                        help="evaluate at this precision (autocast applies on CUDA only)")


def add_sampling_flags(parser: argparse.ArgumentParser, *, outdir: str, n_iter: int, n_samples: int,
                       scale: float) -> None:
    """The flags both scripts take from CompVis (prompt, outputs, DDIM steps, batch, guidance), with
    the script's own defaults for ``--outdir``, ``--n_iter``, ``--n_samples`` and ``--scale``."""
    parser.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                        help="the prompt to render")
    parser.add_argument("--outdir", type=str, nargs="?", default=outdir, help="dir to write results to")
    parser.add_argument("--skip_grid", action="store_true",
                        help="do not save a grid, only individual samples. Helpful when evaluating lots of samples")
    parser.add_argument("--skip_save", action="store_true", help="do not save individual samples. For speed measurements.")
    parser.add_argument("--ddim_steps", type=int, default=50, help="number of ddim sampling steps")
    parser.add_argument("--fixed_code", action="store_true", help="if enabled, uses the same starting code across samples ")
    parser.add_argument("--ddim_eta", type=float, default=0.0,
                        help="ddim eta (eta=0.0 corresponds to deterministic sampling")
    parser.add_argument("--n_iter", type=int, default=n_iter, help="sample this often")
    parser.add_argument("--n_samples", type=int, default=n_samples,
                        help="how many samples to produce for each given prompt. A.k.a. batch size")
    parser.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    parser.add_argument("--scale", type=float, default=scale,
                        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))")
    parser.add_argument("--from-file", type=str, help="if specified, load prompts from this file")


def sampling_device() -> torch.device:
    """CUDA when present, else the CPU (CompVis moved the model to CUDA unconditionally)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def require_model_files(config: str, ckpt: str) -> None:
    """Refuse a ``--config`` or ``--ckpt`` that is not a file, before any slow work starts."""
    for flag, path, what, default in (("--config", config, "an ldm YAML config", DEFAULT_CONFIG),
                                      ("--ckpt", ckpt, "the model's checkpoint", DEFAULT_CKPT)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist; pass {what} with {flag} PATH (CompVis's "
                                    f"default is {default}).")


def load_sampling_model(config: str, ckpt: str, device: torch.device) -> Any:
    """The frozen LatentDiffusion of ``--config`` with the weights of ``--ckpt`` on ``device``."""
    require_model_files(config, ckpt)
    print(f"Loading model from {ckpt}")
    return load_model(config, ckpt, device=str(device), verbose=True)


def check_latent_flags(model: Any, channels: int, factor: int, height: int, width: int) -> None:
    """Refuse ``--C``/``--f``/``--H``/``--W`` that do not fit the model (SD v1: 4 channels, factor 8)."""
    if channels != int(model.channels):
        raise GenerationError(f"--C {channels}, but this model's latents have {model.channels} channels; pass --C {model.channels}.")
    model_factor = first_stage_factor(model)
    if factor != model_factor:
        raise GenerationError(f"--f {factor}, but this model's first stage maps {model_factor} pixels to one latent "
                              f"cell; pass --f {model_factor}.")
    if height % factor or width % factor or height < factor or width < factor:
        raise GenerationError(f"--H {height} and --W {width} must be positive multiples of --f {factor}.")


def prompt_batches(prompt: str | None, from_file: str | None, batch_size: int) -> list[list[str]]:
    """CompVis's prompt batches: ``batch_size`` copies of ``--prompt``, or the lines of ``--from-file``
    in batches of ``batch_size`` (the last one may be smaller)."""
    if batch_size < 1:
        raise GenerationError(f"--n_samples must be at least 1, got {batch_size}.")
    if not from_file:
        if prompt is None:
            raise GenerationError("--prompt is empty; pass --prompt TEXT or --from-file FILE.")
        return [batch_size * [prompt]]
    path = Path(from_file)
    if not path.is_file():
        raise PromptFileError(f"--from-file {from_file} does not exist; pass a text file with one prompt per line.")
    print(f"reading prompts from {from_file}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise PromptFileError(f"--from-file {from_file} has no prompts; write one prompt per line.")
    return [list(batch) for batch in chunk(lines, batch_size)]


def precision_scope(precision: str, device: torch.device) -> AbstractContextManager:
    """fp16 autocast on CUDA for ``autocast``; full precision otherwise."""
    if precision == "autocast" and device.type == "cuda":
        return torch.autocast("cuda")
    return nullcontext()


@contextmanager
def sampling_scope(model: Any, precision: str, device: torch.device) -> Iterator[None]:
    """No gradients, ``--precision`` and the model's EMA weights, as CompVis's scripts sample."""
    with torch.no_grad(), precision_scope(precision, device), model.ema_scope():
        yield


def iterate_batches(data: Sequence[list[str]], n_iter: int) -> Iterator[list[str]]:
    """Every prompt batch of ``data``, ``n_iter`` times over, with CompVis's progress bars."""
    for _ in trange(n_iter, desc="Sampling"):
        yield from tqdm(data, desc="data")


def encode_prompts(model: Any, prompts: Sequence[str], scale: float) -> tuple[Any, Any | None]:
    """(conditioning, unconditional conditioning) of a prompt batch; no unconditional one at scale 1."""
    uc = model.get_learned_conditioning(len(prompts) * [""]) if scale != 1.0 else None
    return model.get_learned_conditioning(list(prompts)), uc


def decode_images(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> [N, 3, H, W] float images in [0, 1] through the first stage."""
    return torch.clamp((model.decode_first_stage(latents).float() + 1.0) / 2.0, min=0.0, max=1.0)


def finish_sampling(all_samples: Sequence[torch.Tensor], n_rows: int, outpath: Path, grid_count: int,
                    skip_grid: bool, started: float,
                    postprocess: Callable[[Image.Image], Image.Image] = lambda image: image) -> None:
    """Save the grid (unless ``skip_grid``), print the sampling time since ``started`` and where
    the samples are."""
    if not skip_grid:
        save_grid(all_samples, n_rows, outpath / f"grid-{grid_count:04}.png", postprocess=postprocess)
    print(f"Sampling took {time.time() - started:.1f} s.")
    print_done(outpath)


def output_folders(outdir: str) -> tuple[Path, Path, int, int]:
    """(outpath, sample_path, next sample number, next grid number), numbered as CompVis does: from
    the count of files already in ``samples/`` and of the other entries in ``outdir``."""
    outpath = Path(outdir)
    sample_path = outpath / "samples"
    sample_path.mkdir(parents=True, exist_ok=True)
    return outpath, sample_path, len(os.listdir(sample_path)), len(os.listdir(outpath)) - 1


def to_pil(image: torch.Tensor) -> Image.Image:
    """One [3, H, W] float image in [0, 1] as an 8-bit PIL image (truncated like CompVis's ``astype``)."""
    pixels = 255.0 * image.detach().float().cpu().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels.astype(np.uint8))


def save_image(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (an interrupted run never leaves a truncated file)."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def save_samples(images: torch.Tensor, sample_path: Path, first_number: int,
                 postprocess: Callable[[Image.Image], Image.Image] = lambda image: image) -> int:
    """Save [N, 3, H, W] images in [0, 1] as ``sample_path/NNNNN.png`` from ``first_number``; the next number."""
    number = first_number
    for image in images:
        save_image(postprocess(to_pil(image)), sample_path / f"{number:05}.png")
        number += 1
    return number


def save_grid(batches: Sequence[torch.Tensor], n_rows: int, path: Path,
              postprocess: Callable[[Image.Image], Image.Image] = lambda image: image) -> None:
    """All batches' images in one grid of ``n_rows`` images per row (torchvision's ``make_grid``)."""
    grid = make_grid(torch.cat([batch.detach().float().cpu() for batch in batches]), nrow=n_rows)
    save_image(postprocess(to_pil(grid)), path)


def print_done(outpath: Path) -> None:
    print(f"Your samples are ready and waiting for you here: \n{outpath} \n \nEnjoy.")
