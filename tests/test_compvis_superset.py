"""Our ``ldm/`` is a drop-in superset of CompVis's: public names and signatures (by AST, see
``tools/compvis_api.py``), every config under the clone's ``configs/`` at its own size (slow;
``tests/test_overlay.py`` checks every module and config of the overlaid clone in the default
tier), and the classes added for it (VQ first stages, self-attention UNets, CompVis's other
encoders and helpers).

Tests marked by the ``COMPVIS_CLONE`` environment variable (a pristine CompVis clone; CI uses
``../shared/upstream/CompVis-stable-diffusion``) are skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.lr_scheduler import LambdaWarmUpCosineScheduler2
from ldm.models.autoencoder import VQModel, VQModelInterface
from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel, UNetModel
from ldm.modules.encoders.modules import (
    BERTEmbedder,
    ClassEmbedder,
    FrozenCLIPTextEmbedder,
    SpatialRescaler,
)
from ldm.modules.vector_quantizer import VectorQuantizer
from ldm.util import instantiate_from_config, log_txt_as_img, parallel_data_prefetch

import compvis_reference_outputs
from conftest import perturb_zero_init

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_tool(file_name: str) -> ModuleType:
    """A script of tools/ (a folder of scripts, not a package) as a module."""
    name = file_name.replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{file_name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


compvis_api = _load_tool("compvis_api")
check_overlay = _load_tool("check-overlay")

CLONE = os.environ.get("COMPVIS_CLONE")
needs_clone = pytest.mark.skipif(
    not CLONE, reason="set COMPVIS_CLONE to a pristine CompVis/stable-diffusion clone "
    "(CI: ../shared/upstream/CompVis-stable-diffusion)"
)
PROBE = REPO_ROOT / "tools" / "overlay_probe.py"  # the probes of tools/check-overlay.py
SD_V1_PARAMETERS = 1_066_235_307  # UNet 859,520,964 + VAE 83,653,863 + CLIP text 123,060,480

@pytest.fixture(scope="module")
def overlaid_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the clone with the files of ldm-replace.txt copied over it (as check-overlay makes it)."""
    clone = tmp_path_factory.mktemp("overlay") / "clone"
    check_overlay.make_overlaid_copy(Path(CLONE), REPO_ROOT, check_overlay.listed_files(REPO_ROOT), clone)
    return clone


def _probe(clone: Path, kind: str, *args: str) -> list[dict]:
    """Records {"item", "ok", "error", ...} of tools/overlay_probe.py run in ``clone``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(PROBE), kind, str(clone), *args], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=900)
    prefix = "OVERLAY-PROBE "
    records = [json.loads(line[len(prefix):]) for line in result.stdout.splitlines() if line.startswith(prefix)]
    assert records, result.stderr[-3000:]
    return records


@needs_clone
def test_added_modules_compute_what_compvis_computes(tmp_path: Path) -> None:
    """CompVis's classes (in a pristine copy of the clone) and ours, with the same weights, agree."""
    pristine = tmp_path / "pristine"
    shutil.copytree(str(CLONE), pristine)
    reference = tmp_path / "reference.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pristine), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("compvis_reference_outputs.py")),
                             str(reference)], cwd=pristine, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    differences = compvis_reference_outputs.compare(reference)
    assert set(differences) == set(compvis_reference_outputs.CASES)
    assert {name: diff for name, diff in differences.items() if diff > 1e-4} == {}


@needs_clone
def test_every_compvis_public_name_exists_with_a_compatible_signature() -> None:
    report = compvis_api.compare(Path(CLONE))
    assert report.names >= 100
    assert report.missing == []


def test_api_checker_finds_missing_names_and_changed_signatures(tmp_path: Path) -> None:
    clone, ours = tmp_path / "clone", tmp_path / "ours"
    (clone / "ldm").mkdir(parents=True)
    (ours / "ldm" / "impl").mkdir(parents=True)
    (clone / "ldm" / "util.py").write_text(
        "def kept(x, d=[]):\n    pass\n\ndef renamed(val):\n    pass\n\ndef gone():\n    pass\n\n"
        "def default_changed(n=3):\n    pass\n\nclass Model:\n    def __init__(self, a, b=1, **kwargs):\n        pass\n"
    )
    (ours / "ldm-replace.txt").write_text("ldm/util.py\n")
    (ours / "ldm" / "util.py").write_text(
        "from ldm.impl.model import Model\n\ndef kept(x, d=None, extra=2):\n    pass\n\n"
        "def renamed(value):\n    pass\n\ndef default_changed(n=4):\n    pass\n"
    )
    (ours / "ldm" / "impl" / "model.py").write_text("class Model:\n    def __init__(self, a, b=1):\n        pass\n")
    report = compvis_api.compare(clone, ours)
    assert report.names == 5
    problems = {gap.split("(")[0].split(":")[0]: gap for gap in report.missing}
    assert set(problems) == {"ldm.util.renamed", "ldm.util.gone", "ldm.util.default_changed", "ldm.util.Model"}
    assert "CompVis calls it 'val'" in problems["ldm.util.renamed"]
    assert "**kwargs" in problems["ldm.util.Model"]


@needs_clone
@pytest.mark.slow
def test_every_compvis_config_instantiates_at_its_own_size(overlaid_clone: Path) -> None:
    """Every config fits in 24 GiB at float32 (the largest, txt2img-1p4B-eval, has 1.54 B parameters)."""
    configs = sorted(str(path.relative_to(overlaid_clone)) for path in (overlaid_clone / "configs").rglob("*.yaml"))
    records = _probe(overlaid_clone, "configs", "24", *configs)
    assert [f"{r['item']}: {r['error']}" for r in records if not r["ok"]] == []
    assert {r["device"] for r in records} == {"cpu"} and len(records) == len(configs)
    assert max(r["parameters"] for r in records) * 4 < 24 * 2**30


def test_sd_v1_config_instantiates_on_meta_without_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformers.utils.hub._is_offline_mode", True)
    config = OmegaConf.load(REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    assert sum(p.numel() for p in model.parameters()) == SD_V1_PARAMETERS
    assert sum(p.numel() for p in model.model.parameters()) == 859_520_964
    assert {p.device.type for p in model.parameters()} == {"meta"}


def _tiny_vq(**kwargs: object) -> VQModel:
    ddconfig = dict(double_z=False, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    return VQModel(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, n_embed=16, embed_dim=3, **kwargs)


def test_vq_model_keys_round_trip_and_interface() -> None:
    model = _tiny_vq().eval()
    keys = set(model.state_dict())
    assert {"quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.bias"} <= keys
    assert model.state_dict()["quantize.embedding.weight"].shape == (16, 3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        quant, loss, (_, _, indices) = model.encode(x)
        decoded, diff, predicted = model(x, return_pred_indices=True)
        codes = model.quantize.embedding.weight[indices].reshape(2, 8, 8, 3).permute(0, 3, 1, 2)
        assert torch.allclose(quant, codes, atol=1e-6)
        assert torch.allclose(model.decode_code(indices.reshape(2, 8, 8)), decoded, atol=1e-5)
    assert decoded.shape == x.shape and torch.equal(predicted, indices) and loss > 0 and torch.equal(loss, diff)


def test_vq_interface_encodes_before_and_decodes_through_the_quantiser(tmp_path: Path) -> None:
    model = _tiny_vq().eval()
    checkpoint = tmp_path / "vq.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    ddconfig = dict(double_z=False, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    interface = VQModelInterface(embed_dim=3, ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"},
                                 n_embed=16, ckpt_path=str(checkpoint)).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        h = interface.encode(x)
        assert torch.equal(h, model.encode_to_prequant(x))
        assert torch.allclose(interface.decode(h), model(x)[0])
        assert torch.allclose(interface.decode(h, force_not_quantize=True), model.decode(h))


def test_vector_quantizer_matches_nearest_code_and_taming() -> None:
    torch.manual_seed(1)
    quantizer = VectorQuantizer(8, 4, beta=0.25, sane_index_shape=True)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    z_q, loss, (_, _, indices) = quantizer(z)
    codes = quantizer.embedding.weight
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(indices.flatten(), torch.cdist(flat, codes).argmin(dim=1))
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through
    taming = pytest.importorskip("taming.modules.vqvae.quantize")
    reference = taming.VectorQuantizer2(8, 4, beta=0.25, sane_index_shape=True)
    reference.load_state_dict(quantizer.state_dict())
    ref_q, ref_loss, (_, _, ref_indices) = reference(z)
    assert torch.equal(ref_indices, indices) and torch.allclose(ref_q, z_q) and torch.allclose(ref_loss, loss)


def test_self_attention_unet_and_encoder_unet_run() -> None:
    torch.manual_seed(0)
    unet = UNetModel(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=(1, 2), num_head_channels=16, num_classes=4,
                     use_scale_shift_norm=True, resblock_updown=True).eval()
    assert perturb_zero_init(unet, seed=1) > 0
    blocks = {type(module).__name__ for module in unet.modules()}
    assert "AttentionBlock" in blocks and "SpatialTransformer" not in blocks
    assert "output_blocks.0.1.qkv.weight" in unet.state_dict()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 500]), torch.tensor([0, 3])
    with torch.no_grad():
        out = unet(x, t, y=y)
        assert out.shape == x.shape
        assert not torch.allclose(unet(x, t, y=torch.tensor([1, 2])), out)
        codebook = UNetModel(16, 3, 32, 3, 1, [2], channel_mult=(1, 2), num_heads=2, use_new_attention_order=True,
                             n_embed=7)(x, t)
    assert codebook.shape == (2, 7, 16, 16)
    for pool in ("adaptive", "attention", "spatial", "spatial_v2"):
        encoder = EncoderUNetModel(16, 3, 32, 5, 1, [2], channel_mult=(1, 2), num_head_channels=16, pool=pool)
        with torch.no_grad():
            assert encoder(x, t).shape == (2, 5)


def test_fp16_torso_keeps_output_dtype() -> None:
    unet = UNetModel(16, 3, 32, 3, 1, [2], channel_mult=(1, 2), num_head_channels=16, use_fp16=True)
    assert unet.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert unet.time_embed[0].weight.dtype == torch.float32
    with torch.no_grad():
        assert unet(torch.randn(1, 3, 16, 16), torch.tensor([1])).dtype == torch.float32


def test_cosine_cycle_scheduler_warms_up_then_decays() -> None:
    schedule = LambdaWarmUpCosineScheduler2(warm_up_steps=[10, 10], f_min=[0.0, 0.5], f_max=[1.0, 1.0],
                                            f_start=[0.0, 0.0], cycle_lengths=[110, 110])
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(60) == pytest.approx(0.5)  # half-way through the decay: cos(pi / 2) = 0
    assert schedule(110) == pytest.approx(0.0)  # a cycle's last step belongs to it (CompVis)
    assert schedule(115) == pytest.approx(0.5)  # second cycle's warm-up
    assert schedule(10_000) == pytest.approx(0.5)
    assert schedule.find_in_interval(111) == 1


def test_caption_images_and_parallel_prefetch() -> None:
    images = log_txt_as_img((64, 32), ["a caption long enough to wrap onto a second line", ""], size=8)
    assert images.shape == (2, 3, 32, 64)
    assert images.min() >= -1 and images.max() <= 1
    assert (images[0] < 0).any() and torch.equal(images[1], torch.ones_like(images[1]))
    doubled = parallel_data_prefetch(np.negative, np.arange(10), 3, cpu_intensive=False)
    assert doubled.tolist() == [-v for v in range(10)]
    tagged = parallel_data_prefetch(lambda part, worker_id: [worker_id] * len(part), list(range(7)), 3,
                                    target_data_type="list", cpu_intensive=False, use_worker_id=True)
    assert tagged == [0, 0, 0, 1, 1, 1, 2]


def test_class_embedder_and_spatial_rescaler() -> None:
    embedder = ClassEmbedder(embed_dim=8, n_classes=5, key="class_label")
    batch = {"class_label": torch.tensor([4, 1])}
    assert torch.equal(embedder(batch), embedder.embedding.weight[[4, 1]][:, None])
    rescaler = SpatialRescaler(n_stages=2, multiplier=0.5, in_channels=3, out_channels=6)
    assert rescaler(torch.randn(1, 3, 16, 16)).shape == (1, 6, 4, 4)
    with pytest.raises(ValueError, match="method"):
        SpatialRescaler(method="lanczos")


def test_optional_packages_are_needed_only_when_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "clip", None)
    with pytest.raises(ImportError, match="pip install clip-anytorch"):
        FrozenCLIPTextEmbedder()
    monkeypatch.setitem(sys.modules, "ldm.modules.x_transformer", None)
    with pytest.raises(ImportError, match="x_transformer.py"):
        BERTEmbedder(n_embed=8, n_layer=1)


def test_attention_pool_and_log_shapes_match_compvis_formula() -> None:
    """QKVAttentionLegacy against CompVis's formula: heads first, softmax(q k / sqrt(c)) v."""
    from ldm.modules.diffusionmodules.openaimodel import QKVAttentionLegacy

    qkv = torch.randn(2, 2 * 3 * 4, 5)
    q, k, v = qkv.reshape(4, 12, 5).split(4, dim=1)
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(4), dim=-1)
    expected = torch.einsum("bts,bcs->bct", weights, v).reshape(2, -1, 5)
    assert torch.allclose(QKVAttentionLegacy(2)(qkv), expected, atol=1e-6)


def test_ancestral_sampling_follows_the_posterior(tiny_model: torch.nn.Module) -> None:
    """p_sample at t > 0 is the posterior mean plus sigma * noise; at t = 0 it is the mean."""
    c = tiny_model.get_learned_conditioning(["a cat", "a dog"])
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 0])
    with torch.no_grad():
        mean, _, log_variance = tiny_model.p_mean_variance(x, c, t, clip_denoised=False)
        torch.manual_seed(3)
        sample = tiny_model.p_sample(x, c, t)
        torch.manual_seed(3)
        noise = torch.randn_like(x)
    assert torch.allclose(sample[0], mean[0] + (0.5 * log_variance[0]).exp() * noise[0], atol=1e-6)
    assert torch.allclose(sample[1], mean[1])
    with torch.no_grad():
        final, intermediates = tiny_model.sample(c, batch_size=2, return_intermediates=True, timesteps=4,
                                                 verbose=False)
        denoised, predicted_x0 = tiny_model.progressive_denoising(c, (4, 8, 8), batch_size=2, verbose=False,
                                                                  start_T=3, log_every_t=1)
    assert final.shape == denoised.shape == (2, 4, 8, 8) and torch.isfinite(final).all()
    assert len(intermediates) == 3 and len(predicted_x0) == 4  # the start, then t = 3 and t = 0 (log_every_t 200)


def test_image_logging_of_a_latent_model(tiny_model: torch.nn.Module) -> None:
    batch = {"jpg": torch.rand(2, 16, 16, 3) * 2 - 1, "txt": ["a red square", "a blue circle"]}
    with torch.no_grad():
        log = tiny_model.log_images(batch, N=2, n_row=2, ddim_steps=2)
    assert set(log) == {"inputs", "reconstruction", "conditioning", "diffusion_row", "samples"}
    assert log["inputs"].shape == log["samples"].shape == log["conditioning"].shape == (2, 3, 16, 16)
    assert log["diffusion_row"].shape == (4, 3, 16, 16)
    with pytest.raises(NotImplementedError, match="plot_denoise_rows"):
        tiny_model.log_images(batch, N=2, plot_denoise_rows=True)
    z, c, x, reconstruction, raw = tiny_model.get_input(batch, "jpg", return_first_stage_outputs=True,
                                                        return_original_cond=True)
    assert raw == batch["txt"] and torch.equal(x, log["inputs"]) and reconstruction.shape == x.shape


def test_ddim_stochastic_encode_on_ddpm_steps(tiny_model: torch.nn.Module) -> None:
    from ldm.models.diffusion.ddim import DDIMSampler

    sampler = DDIMSampler(tiny_model)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 999])
    noised = sampler.stochastic_encode(x0, t, use_original_steps=True, noise=noise)
    assert torch.allclose(noised, tiny_model.q_sample(x0, t, noise=noise), atol=1e-6)


class _ReconstructionLoss(torch.nn.Module):
    """A stand-in for CompVis's adversarial loss: L2 for the autoencoder (optimizer 0), a
    discriminator-only term for optimizer 1."""

    def __init__(self) -> None:
        super().__init__()
        self.discriminator = torch.nn.Linear(1, 1)

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posterior: object, optimizer_idx: int,
                global_step: int, last_layer: torch.Tensor | None = None, split: str = "train"
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if optimizer_idx == 0:
            loss = (inputs - reconstructions).pow(2).mean()
            return loss, {f"{split}/rec_loss": loss.detach()}
        loss = self.discriminator(torch.ones(1, 1)).pow(2).mean()
        return loss, {f"{split}/disc_loss": loss.detach()}


def test_kl_autoencoder_trains_with_two_optimizers_under_lightning_2(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from ldm.models.autoencoder import AutoencoderKL

    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    model = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    model.loss = _ReconstructionLoss()
    model.learning_rate = 1e-3
    batch = {"image": torch.rand(2, 16, 16, 3) * 2 - 1}
    direct = model.training_step(batch, 0, optimizer_idx=0)
    assert direct.ndim == 0 and direct > 0
    before = model.decoder.conv_out.weight.detach().clone()
    discriminator_before = model.loss.discriminator.weight.detach().clone()
    loader = torch.utils.data.DataLoader([{"image": image} for image in batch["image"]], batch_size=2)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    assert not torch.equal(model.decoder.conv_out.weight, before)
    assert not torch.equal(model.loss.discriminator.weight, discriminator_before)


def test_layout_model_requires_box_conditioning(tiny_clip_dir: Path) -> None:
    from conftest import tiny_model_config
    from ldm.models.diffusion.ddpm import Layout2ImgDiffusion

    params = dict(tiny_model_config(tiny_clip_dir)["params"])
    with pytest.raises(ValueError, match="coordinates_bbox"):
        Layout2ImgDiffusion(**params)
