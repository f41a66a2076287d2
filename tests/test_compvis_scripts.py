"""CompVis's top-level scripts (main.py, scripts/txt2img.py, scripts/img2img.py) and samplers
(PLMS, DPM-Solver) on current packages, offline, on a CPU.

The samplers are checked against the exact probability-flow ODE solution for Gaussian data, where
the optimal noise prediction is known in closed form: eps(x, t) = sigma_t x / (alpha_t^2 s^2 + sigma_t^2)
and x_0 = x_T * sqrt(alpha_0^2 s^2 + sigma_0^2) / sqrt(alpha_T^2 s^2 + sigma_T^2).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset

from conftest import REPO_ROOT, TINY_SD_CONFIG
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver, NoiseScheduleVP
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import make_beta_schedule

TOY_ARGS = ["--config", str(REPO_ROOT / "configs/toy/toy-ldm.yaml"), "--ckpt", str(REPO_ROOT / "models/toy/model.safetensors")]
TOY_LATENT = ["--H", "32", "--W", "32", "--f", "2", "--C", "12"]
DATA_VARIANCE = 0.25


def _offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}


def _script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """scripts/<name>.py as a module (scripts/ on the path, as when it runs as a script)."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    return importlib.import_module(name)


# ------------------------------------------------------------------------------------------ samplers
class GaussianDataModel:
    """A stand-in LatentDiffusion whose eps-prediction is exact for data ~ N(0, DATA_VARIANCE I)."""

    parameterization = "eps"

    def __init__(self) -> None:
        self.betas = torch.tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012), dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self.num_timesteps = 1000

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        abar = self.alphas_cumprod[t.long()].view(-1, *[1] * (x.ndim - 1))
        return (1 - abar).sqrt() * x / (abar * DATA_VARIANCE + 1 - abar)

    def exact(self, x_T: torch.Tensor, abar_T: torch.Tensor, abar_0: torch.Tensor) -> torch.Tensor:
        return x_T * ((abar_0 * DATA_VARIANCE + 1 - abar_0) / (abar_T * DATA_VARIANCE + 1 - abar_T)).sqrt()


def test_plms_solves_the_ode_far_better_than_ddim() -> None:
    model = GaussianDataModel()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ddim = DDIMSampler(model)
    ddim_out, _ = ddim.sample(20, 2, (3, 4, 4), x_T=x_T)
    plms = PLMSSampler(model)
    plms_out, _ = plms.sample(20, 2, (3, 4, 4), x_T=x_T, verbose=False)
    exact = model.exact(x_T, model.alphas_cumprod[int(ddim.ddim_timesteps[-1])], model.alphas_cumprod[0])
    ddim_error = (ddim_out - exact).abs().max().item()
    plms_error = (plms_out - exact).abs().max().item()
    assert plms_error < 0.05 and plms_error < ddim_error / 4, (plms_error, ddim_error)
    with pytest.raises(ValueError, match="ddim_eta must be 0"):
        plms.make_schedule(10, ddim_eta=0.5)


@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("method", ["multistep", "singlestep_fixed"])
def test_dpm_solver_orders_converge_at_their_rates(predict_x0: bool, method: str) -> None:
    """Doubling the steps divides the error by about 2^order (logSNR steps; order 3 nears float32's floor)."""
    alphas_cumprod = torch.cumprod(1 - torch.tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012)), 0)
    schedule = NoiseScheduleVP("discrete", alphas_cumprod=alphas_cumprod)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = schedule.marginal_alpha(t).view(-1, 1), schedule.marginal_std(t).view(-1, 1)
        return sigma * x / (alpha**2 * DATA_VARIANCE + sigma**2)

    x_T = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def scale(t: float) -> torch.Tensor:
        t = torch.tensor([t])
        return (schedule.marginal_alpha(t) ** 2 * DATA_VARIANCE + schedule.marginal_std(t) ** 2).sqrt()

    exact = x_T * scale(1 / 1000) / scale(1.0)
    errors = {}
    for order in (1, 2, 3):
        solver = DPM_Solver(eps, schedule, predict_x0=predict_x0)
        errors[order] = [
            (solver.sample(x_T, steps=steps, order=order, method=method, skip_type="logSNR", lower_order_final=False)
             - exact).abs().max().item()
            for steps in (24, 48)
        ]
    ratios = {order: coarse / fine for order, (coarse, fine) in errors.items()}
    assert 1.7 < ratios[1] < 2.3 and ratios[2] > 3.0 and ratios[3] > 3.5, errors
    assert errors[3][1] < errors[2][1] / 5 < errors[1][1] / 25, errors


def test_plms_and_dpm_solver_sample_a_tiny_model_on_cpu(tiny_model) -> None:
    cond = tiny_model.get_learned_conditioning(["a red square", "a blue circle"])
    uncond = tiny_model.get_learned_conditioning(["", ""])
    shape = (tiny_model.channels, tiny_model.image_size, tiny_model.image_size)
    for sampler in (PLMSSampler(tiny_model), DPMSolverSampler(tiny_model)):
        x_T = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
        out, _ = sampler.sample(S=4, batch_size=2, shape=shape, conditioning=cond, verbose=False, x_T=x_T,
                                unconditional_guidance_scale=3.0, unconditional_conditioning=uncond)
        assert out.shape == (2, *shape) and out.device.type == "cpu" and torch.isfinite(out).all()
        assert not torch.allclose(out, x_T), type(sampler).__name__
    assert DPMSolverSampler(tiny_model).alphas_cumprod.device.type == "cpu"


# ------------------------------------------------------------------------------------------ --help
def test_txt2img_help_works_offline() -> None:
    """--help imports the script offline (CompVis's txt2img loaded the safety checker at import)."""
    run = subprocess.run([sys.executable, "scripts/txt2img.py", "--help"], cwd=REPO_ROOT, env=_offline_env(),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    expected = ["--plms", "--dpm_solver", "--laion400m", "--fixed_code", "--precision", "--skip_safety_checker"]
    assert not [flag for flag in expected if flag not in run.stdout], run.stdout


def test_main_parser_has_compvis_and_trainer_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    main = importlib.import_module("main")
    parser = main.add_trainer_flags(main.get_parser())
    opt, unknown = parser.parse_known_args(["-t", "-b", "a.yaml", "b.yaml", "--gpus", "0,1", "--max_epochs", "3",
                                            "--scale_lr", "False", "model.params.x=1"])
    assert (opt.train, opt.base, opt.gpus, opt.max_epochs, opt.scale_lr, opt.seed, opt.logdir) == (
        True, ["a.yaml", "b.yaml"], "0,1", 3, False, 23, "logs")
    assert unknown == ["model.params.x=1"] and not hasattr(opt, "max_steps")  # only given Trainer flags
    kwargs, ngpu = main.trainer_arguments({"gpus": "0,1", "benchmark": True, "accelerator": "ddp"})
    assert kwargs == {"accelerator": "gpu", "devices": [0, 1], "strategy": "ddp", "benchmark": True} and ngpu == 2
    with pytest.raises(ValueError, match="does not take"):
        main.trainer_arguments({"not_a_trainer_argument": 1})


def test_img2img_parser_keeps_compvis_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    img2img = _script("img2img", monkeypatch)
    opt = img2img.parse_args(["--init-img", "x.png"])
    assert (opt.init_img, opt.strength, opt.ddim_steps, opt.scale, opt.n_samples, opt.outdir, opt.precision) == (
        "x.png", 0.75, 50, 5.0, 2, "outputs/img2img-samples", "autocast")


# ------------------------------------------------------------------------------------------ txt2img
def _write_safety_checker(folder: Path, threshold: float) -> Path:
    """A tiny random StableDiffusionSafetyChecker; ``threshold`` > 1 flags nothing, < -1 flags everything."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_txt2img_writes_compvis_outputs_with_every_sampler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    txt2img = _script("txt2img", monkeypatch)
    out = tmp_path / "out"
    common = [*TOY_ARGS, *TOY_LATENT, "--prompt", "vela quorin", "--ddim_steps", "4", "--n_samples", "2", "--n_iter", "1",
              "--scale", "1.25", "--outdir", str(out)]
    passes = _write_safety_checker(tmp_path / "passes", threshold=2.0)
    flags_all = _write_safety_checker(tmp_path / "flags_all", threshold=-2.0)

    txt2img.main([*common, "--safety_checker", str(passes)])
    txt2img.main([*common, "--safety_checker", str(flags_all), "--plms"])
    txt2img.main([*common, "--skip_safety_checker", "--dpm_solver", "--fixed_code", "--n_iter", "2"])

    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == [f"{n:05}.png" for n in range(8)], samples
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png", "grid-0002.png"]
    first, second = _pixels(out / "samples/00000.png"), _pixels(out / "samples/00001.png")
    assert first.shape == (32, 32, 3) and first.std() > 5 and np.abs(first - second).max() > 0
    assert all(_pixels(out / f"samples/{n:05}.png").max() == 0 for n in (2, 3)), "flagged images must be blacked out"
    # --fixed_code: one start code per batch position, reused by every iteration
    assert np.array_equal(_pixels(out / "samples/00004.png"), _pixels(out / "samples/00006.png"))
    assert np.abs(_pixels(out / "samples/00004.png") - _pixels(out / "samples/00005.png")).max() > 0
    assert Image.open(out / "grid-0000.png").size == (2 * 34 + 2, 36)
    assert Image.open(out / "grid-0002.png").size == (2 * 34 + 2, 2 * 34 + 2)


def test_txt2img_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    txt2img = _script("txt2img", monkeypatch)
    cases = [
        (["--safety_checker", str(tmp_path / "absent")], "--skip_safety_checker"),
        (["--skip_safety_checker", "--C", "4"], "pass --C 12"),
        (["--skip_safety_checker", "--ckpt", str(tmp_path / "none.ckpt")], "--ckpt"),
    ]
    for extra, fix in cases:
        with pytest.raises(SystemExit) as exit_info:
            txt2img.main([*TOY_ARGS, "--H", "32", "--W", "32", "--f", "2", "--C", "12", "--outdir", str(tmp_path), *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fix in err and "\n" not in err, err


def test_watermark_is_embedded_and_decodable(monkeypatch: pytest.MonkeyPatch) -> None:
    txt2img = _script("txt2img", monkeypatch)
    from imwatermark import WatermarkDecoder

    grey = Image.fromarray(np.full((256, 256, 3), 128, dtype=np.uint8))
    marked = txt2img.Watermarker(txt2img.watermark_encoder())(grey)
    bgr = np.ascontiguousarray(np.asarray(marked)[:, :, ::-1])
    assert WatermarkDecoder("bytes", 8 * len(txt2img.WATERMARK)).decode(bgr, "dwtDct") == txt2img.WATERMARK.encode()
    small = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    assert txt2img.Watermarker(txt2img.watermark_encoder())(small) is small


# ------------------------------------------------------------------------------------------ img2img
def test_img2img_varies_an_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    img2img = _script("img2img", monkeypatch)
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "out"
    args = [*TOY_ARGS, "--init-img", str(init), "--ddim_steps", "4", "--scale", "1.25", "--outdir", str(out)]
    img2img.main([*args, "--strength", "0.5"])
    img2img.main([*args, "--strength", "1.0", "--n_samples", "1"])
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert _pixels(out / "samples/00000.png").shape == (32, 32, 3)  # 36 x 40 cut to multiples of 32
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    with pytest.raises(SystemExit):
        img2img.main([*args, "--strength", "0.1"])
    assert "no denoising step" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ main.py
class RandomCaptionedImages(Dataset):
    """Seeded random 16 x 16 images in [-1, 1] (channels last, as CompVis's datasets) with a caption."""

    def __init__(self, size: int = 4) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, object]:
        image = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(index)) * 2 - 1
        return {"jpg": image, "txt": "a red square"}


def _run_main(args: list[str]) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "main.py", *args, "--accelerator", "cpu", "--no-test"], cwd=REPO_ROOT,
                         env=_offline_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _train_tiny(tmp_path: Path, clip_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Two steps of the tiny LatentDiffusion on RandomCaptionedImages; the run's log folder."""
    config = OmegaConf.load(TINY_SD_CONFIG)
    config.model.params.cond_stage_config.params.version = str(clip_dir)
    config.model.params.monitor = None
    config.data = {"target": "main.DataModuleFromConfig",
                   "params": {"batch_size": 2, "num_workers": 0,
                              "train": {"target": "test_compvis_scripts.RandomCaptionedImages"}}}
    config.lightning = {
        "trainer": {"enable_progress_bar": False},
        "callbacks": {"image_logger": {"params": {"batch_frequency": 2, "max_images": 2, "increase_log_steps": False,
                                                  "log_images_kwargs": {"ddim_steps": 4, "plot_progressive_rows": False}}}},
    }
    OmegaConf.save(config, tmp_path / "tiny.yaml")
    run = _run_main(["-t", "--base", str(tmp_path / "tiny.yaml"), "--logdir", str(tmp_path / "logs"), "-n", "tiny",
                     "--max_steps", "2"])
    (logdir,) = (tmp_path / "logs").iterdir()
    return logdir, run


def _global_step(logdir: Path) -> int:
    return torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


def test_main_trains_and_writes_a_compvis_log_folder(tmp_path: Path, tiny_clip_dir: Path) -> None:
    logdir, run = _train_tiny(tmp_path, tiny_clip_dir)
    assert "Setting learning rate to 2.00e-04 = 1 (accumulate_grad_batches) * 1 (num_gpus) * 2 (batchsize)" in run.stdout
    assert logdir.name.endswith("_tiny")
    checkpoint = torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert any(key.startswith("model.diffusion_model.") for key in checkpoint["state_dict"])
    (project,) = (logdir / "configs").glob("*-project.yaml")
    assert OmegaConf.load(project).data.params.batch_size == 2
    lightning = OmegaConf.load(next((logdir / "configs").glob("*-lightning.yaml")))
    assert lightning.lightning.trainer.max_steps == 2
    assert any((logdir / "images" / "train").glob("samples_gs-000002_*.png")), "ImageLogger at step 2"


@pytest.mark.slow
def test_main_resumes_a_run_from_its_log_folder(tmp_path: Path, tiny_clip_dir: Path) -> None:
    logdir, _ = _train_tiny(tmp_path, tiny_clip_dir)
    run = _run_main(["-r", str(logdir), "-t", "--max_steps", "4"])
    assert "Restored all states from the checkpoint" in run.stdout + run.stderr
    assert _global_step(logdir) == 4
    assert len(list((logdir / "configs").glob("*-project.yaml"))) == 2  # the first run's and the resumed run's
