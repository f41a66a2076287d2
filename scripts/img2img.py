"""Make variations of an input image, with CompVis's ``scripts/img2img.py`` flags and outputs, on current packages.

    python scripts/img2img.py --init-img sketch.png --prompt "a fantasy landscape" --strength 0.75

The image (resized down to a multiple of 32 pixels a side) is encoded by the first stage, noised
to ``--strength`` of the DDIM schedule and denoised again with the prompt (SDEdit). Writes
``outputs/img2img-samples/samples/NNNNN.png`` and ``grid-NNNN.png`` as CompVis does (no watermark,
no safety check: CompVis's img2img has neither).

Differences from CompVis: the model runs on CUDA when present, else on the CPU; ``--ckpt`` may be
``.safetensors``; ``--strength 1.0`` starts from the top of the schedule (CompVis indexed past its
end); a strength too small for one denoising step is an error; ``--fixed_code`` reuses one noise
draw for every iteration. ``--plms`` stays unsupported, as in CompVis, and ``--C``/``--f`` are
accepted but unused (the latent's size comes from the first stage).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_lightning import seed_everything

from compvis_sampling import (
    add_model_flags,
    add_sampling_flags,
    decode_images,
    encode_prompts,
    finish_sampling,
    iterate_batches,
    load_sampling_model,
    output_folders,
    prompt_batches,
    sampling_device,
    sampling_scope,
    save_samples,
)
from erasure.cli import run_script
from erasure.errors import GenerationError, ImageDataError
from ldm.models.diffusion.ddim import DDIMSampler

#: CompVis resizes the input image down to a multiple of this many pixels a side.
SIZE_MULTIPLE = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(parser, outdir="outputs/img2img-samples", n_iter=1, n_samples=2, scale=5.0)
    parser.add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    parser.add_argument("--plms", action="store_true", help="use plms sampling (not supported by img2img, as in CompVis)")
    parser.add_argument("--C", type=int, default=4, help="latent channels (unused: the first stage decides)")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor, most often 8 or 16 (unused)")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="strength for noising/unnoising. 1.0 corresponds to full destruction of information in init image")
    add_model_flags(parser)
    return parser.parse_args(argv)


def load_img(path: str) -> torch.Tensor:
    """The image at ``path`` as [1, 3, H, W] in [-1, 1], resized down to multiples of 32 pixels."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    print(f"loaded input image of size ({width}, {height}) from {path}")
    width, height = width - width % SIZE_MULTIPLE, height - height % SIZE_MULTIPLE
    if width == 0 or height == 0:
        raise ImageDataError(f"--init-img {path} is {image.size[0]}x{image.size[1]} pixels; it must be at least "
                             f"{SIZE_MULTIPLE}x{SIZE_MULTIPLE}.")
    image = image.resize((width, height), resample=Image.LANCZOS)
    pixels = torch.from_numpy(np.array(image).astype(np.float32) / 255.0)[None].permute(0, 3, 1, 2)
    return 2.0 * pixels - 1.0


def encoding_steps(strength: float, ddim_steps: int) -> int:
    """The DDIM steps that denoise the encoded image: ``int(strength * ddim_steps)``."""
    if not 0.0 <= strength <= 1.0:
        raise GenerationError(f"--strength {strength} is outside [0.0, 1.0]; 1.0 destroys the input image entirely.")
    t_enc = int(strength * ddim_steps)
    if t_enc < 1:
        raise GenerationError(f"--strength {strength} with --ddim_steps {ddim_steps} leaves no denoising step; use "
                              f"--strength >= {1.0 / ddim_steps:g} (or more --ddim_steps).")
    return t_enc


def img2img(opt: argparse.Namespace) -> None:
    if opt.plms:
        raise GenerationError("PLMS sampler not (yet) supported by img2img (as in CompVis); leave out --plms to use DDIM.")
    if opt.init_img is None or not Path(opt.init_img).is_file():
        raise FileNotFoundError(f"--init-img {opt.init_img} is not a file; pass the image to vary with --init-img PATH.")
    t_enc = encoding_steps(opt.strength, opt.ddim_steps)
    data = prompt_batches(opt.prompt, opt.from_file, opt.n_samples)
    seed_everything(opt.seed)
    device = sampling_device()
    model = load_sampling_model(opt.config, opt.ckpt, device)
    sampler = DDIMSampler(model)
    outpath, sample_path, base_count, grid_count = output_folders(opt.outdir)
    n_rows = opt.n_rows if opt.n_rows > 0 else opt.n_samples

    init_image = load_img(opt.init_img).to(device).expand(opt.n_samples, -1, -1, -1)
    sampler.make_schedule(ddim_num_steps=opt.ddim_steps, ddim_eta=opt.ddim_eta, verbose=False)
    print(f"target t_enc is {t_enc} steps")
    # CompVis noises to DDIM index t_enc and denoises from index t_enc - 1; strength 1.0 has no index t_enc.
    encode_index = min(t_enc, opt.ddim_steps - 1)
    all_samples = []
    with sampling_scope(model, opt.precision, device):
        init_latent = model.get_first_stage_encoding(model.encode_first_stage(init_image))
        fixed_noise = torch.randn_like(init_latent) if opt.fixed_code else None
        tic = time.time()
        for prompts in iterate_batches(data, opt.n_iter):
            batch = len(prompts)
            c, uc = encode_prompts(model, prompts, opt.scale)
            noise = None if fixed_noise is None else fixed_noise[:batch]
            steps = torch.tensor([encode_index] * batch, device=device)
            z_enc = sampler.stochastic_encode(init_latent[:batch], steps, noise=noise)
            samples = sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=opt.scale,
                                     unconditional_conditioning=uc)
            x_samples = decode_images(model, samples)
            if not opt.skip_save:
                base_count = save_samples(x_samples, sample_path, base_count)
            all_samples.append(x_samples)
        finish_sampling(all_samples, n_rows, outpath, grid_count, opt.skip_grid, tic)

def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    run_script(lambda: img2img(opt))


if __name__ == "__main__":
    main()
