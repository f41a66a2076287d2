"""Text-to-image sampling with CompVis's ``scripts/txt2img.py`` flags and outputs, on current packages.

    python scripts/txt2img.py --prompt "a photograph of an astronaut riding a horse" --plms

Writes ``outputs/txt2img-samples/samples/NNNNN.png`` (one per image) and ``grid-NNNN.png`` (all
images of the run), numbered on from what the folders hold, each with CompVis's invisible
watermark ("StableDiffusionV1", dwtDct); images the safety checker flags are replaced by
``assets/rick.jpeg`` where that file exists (else left as the checker returns them: black).

Differences from CompVis, for running on current packages, offline and on a CPU:
- the safety checker is loaded when a run starts, not when the module is imported, so ``--help``
  needs no network; if it cannot be loaded (offline and not cached) the run stops with one error
  before any sampling. ``--safety_checker DIR`` loads a local copy, ``--skip_safety_checker``
  saves the images unchecked (say so when you share them);
- the model runs on CUDA when present, else on the CPU; ``--ckpt`` may be ``.safetensors``;
- images smaller than invisible-watermark's minimum (256 x 256 pixels), e.g. the toy model's,
  are saved without the watermark, and the run says so;
- the toy model: ``--config configs/toy/toy-ldm.yaml --ckpt models/toy/model.safetensors
  --H 32 --W 32 --f 2 --C 12`` (``--C``/``--f`` that do not fit the model are an error).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_lightning import seed_everything

from compvis_sampling import (
    add_model_flags,
    add_sampling_flags,
    check_latent_flags,
    decode_images,
    encode_prompts,
    finish_sampling,
    iterate_batches,
    load_sampling_model,
    output_folders,
    prompt_batches,
    require_model_files,
    sampling_device,
    sampling_scope,
    save_samples,
)
from erasure.cli import run_script
from erasure.errors import GenerationError, ModelLoadError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler

SAFETY_MODEL_ID = "CompVis/stable-diffusion-safety-checker"
WATERMARK = "StableDiffusionV1"
#: invisible-watermark refuses smaller images (height * width below this).
WATERMARK_MIN_PIXELS = 256 * 256
REPLACEMENT_IMAGE = Path("assets/rick.jpeg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(parser, outdir="outputs/txt2img-samples", n_iter=2, n_samples=3, scale=7.5)
    parser.add_argument("--plms", action="store_true", help="use plms sampling")
    parser.add_argument("--dpm_solver", action="store_true", help="use dpm_solver sampling")
    parser.add_argument("--laion400m", action="store_true", help="uses the LAION400M model")
    parser.add_argument("--H", type=int, default=512, help="image height, in pixel space")
    parser.add_argument("--W", type=int, default=512, help="image width, in pixel space")
    parser.add_argument("--C", type=int, default=4, help="latent channels")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor")
    add_model_flags(parser)
    safety = parser.add_argument_group("safety checker (not in CompVis's script; its behaviour is the default)")
    safety.add_argument("--safety_checker", type=str, default=SAFETY_MODEL_ID,
                        help=f"Hugging Face id or local directory of the safety checker (default: {SAFETY_MODEL_ID})")
    safety.add_argument("--skip_safety_checker", action="store_true",
                        help="save the images without the NSFW check (e.g. offline without a local copy)")
    return parser.parse_args(argv)


def load_safety_checker(source: str) -> tuple[Any, Any]:
    """(feature extractor, ``StableDiffusionSafetyChecker``) from a hub id or a local directory."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import AutoImageProcessor

    try:
        extractor = AutoImageProcessor.from_pretrained(source)
        checker = StableDiffusionSafetyChecker.from_pretrained(source)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"Cannot load the safety checker {source!r} ({reason}). It comes from the Hugging Face Hub on first use: "
            f"with network, run once `huggingface-cli download {SAFETY_MODEL_ID} --local-dir DIR` and pass "
            f"--safety_checker DIR; or pass --skip_safety_checker to save the images unchecked."
        ) from None
    return extractor, checker.eval()


def load_replacement(x: np.ndarray) -> np.ndarray:
    """CompVis's stand-in for a flagged image: ``assets/rick.jpeg`` at the image's size, if present."""
    if not REPLACEMENT_IMAGE.is_file():
        return x
    height, width = x.shape[:2]
    replacement = Image.open(REPLACEMENT_IMAGE).convert("RGB").resize((width, height))
    return (np.array(replacement) / 255.0).astype(x.dtype)


def check_safety(images: np.ndarray, safety: tuple[Any, Any]) -> tuple[np.ndarray, list[bool]]:
    """Run the safety checker on [N, H, W, 3] images in [0, 1]; flagged ones are replaced."""
    extractor, checker = safety
    pil_images = [Image.fromarray((image * 255).round().astype("uint8")) for image in images]
    clip_input = extractor(pil_images, return_tensors="pt").pixel_values
    checked, has_nsfw = checker(images=images, clip_input=clip_input.to(checker.dtype))
    checked = np.asarray(checked)
    for index, flagged in enumerate(has_nsfw):
        if flagged:
            checked[index] = load_replacement(checked[index])
    return checked, list(has_nsfw)


def watermark_encoder() -> Any:
    """CompVis's invisible watermark encoder ("StableDiffusionV1" as bytes)."""
    try:
        from imwatermark import WatermarkEncoder
    except ImportError:
        raise GenerationError("scripts/txt2img.py watermarks its images with invisible-watermark, which is not "
                              "installed; install the `compvis` extra: pip install -e \".[compvis]\" (or use the "
                              "project's environment.yaml).") from None

    print("Creating invisible watermark encoder (see https://github.com/ShieldMnt/invisible-watermark)...")
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK.encode("utf-8"))
    return encoder


def put_watermark(image: Image.Image, encoder: Any) -> Image.Image:
    """Embed the watermark with the dwtDct method (on BGR pixels, as OpenCV-based invisible-watermark expects)."""
    bgr = np.ascontiguousarray(np.array(image)[:, :, ::-1])
    return Image.fromarray(np.ascontiguousarray(encoder.encode(bgr, "dwtDct")[:, :, ::-1]))


class Watermarker:
    """``put_watermark`` for images large enough to carry it; says once when one is too small."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.warned = False

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.width * image.height >= WATERMARK_MIN_PIXELS:
            return put_watermark(image, self.encoder)
        if not self.warned:
            print(f"note: {image.width}x{image.height} images are below invisible-watermark's minimum of 256x256 "
                  f"pixels; saving them without the watermark.")
            self.warned = True
        return image


def txt2img(opt: argparse.Namespace) -> None:
    if opt.laion400m:
        print("Falling back to LAION 400M model...")
        opt.config = "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
        opt.ckpt = "models/ldm/text2img-large/model.ckpt"
        opt.outdir = "outputs/txt2img-samples-laion400m"
    data = prompt_batches(opt.prompt, opt.from_file, opt.n_samples)
    require_model_files(opt.config, opt.ckpt)
    seed_everything(opt.seed)
    safety = None if opt.skip_safety_checker else load_safety_checker(opt.safety_checker)
    watermark = Watermarker(watermark_encoder())
    device = sampling_device()
    model = load_sampling_model(opt.config, opt.ckpt, device)
    check_latent_flags(model, opt.C, opt.f, opt.H, opt.W)
    if opt.dpm_solver:
        sampler = DPMSolverSampler(model)
    elif opt.plms:
        sampler = PLMSSampler(model)
    else:
        sampler = DDIMSampler(model)
    outpath, sample_path, base_count, grid_count = output_folders(opt.outdir)
    n_rows = opt.n_rows if opt.n_rows > 0 else opt.n_samples
    shape = [opt.C, opt.H // opt.f, opt.W // opt.f]
    start_code = torch.randn([opt.n_samples, *shape], device=device) if opt.fixed_code else None
    all_samples = []
    with sampling_scope(model, opt.precision, device):
        tic = time.time()
        for prompts in iterate_batches(data, opt.n_iter):
            batch = len(prompts)
            c, uc = encode_prompts(model, prompts, opt.scale)
            samples, _ = sampler.sample(
                S=opt.ddim_steps, conditioning=c, batch_size=batch, shape=shape, verbose=False,
                unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc, eta=opt.ddim_eta,
                x_T=None if start_code is None else start_code[:batch],
            )
            x_samples = decode_images(model, samples).cpu().permute(0, 2, 3, 1).numpy()
            if safety is not None:
                x_samples, _ = check_safety(x_samples, safety)
            checked = torch.from_numpy(x_samples).permute(0, 3, 1, 2)
            if not opt.skip_save:
                base_count = save_samples(checked, sample_path, base_count, postprocess=watermark)
            if not opt.skip_grid:
                all_samples.append(checked)
        finish_sampling(all_samples, n_rows, outpath, grid_count, opt.skip_grid, tic, postprocess=watermark)

def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    run_script(lambda: txt2img(opt))


if __name__ == "__main__":
    main()
