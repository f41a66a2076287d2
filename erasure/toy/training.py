"""Training of the toy text-to-image model: reproducible, config-driven and resumable.

Design choices (see configs/toy/toy-ldm.yaml for the numbers) and why:
- v-prediction on a cosine schedule: a first probe with eps-prediction on a linear schedule
  learnt textures but not global tone (grey/pink instead of white backgrounds) after 52 minutes;
  v-prediction keeps the high-noise steps, where tone is decided, well posed.
- Loss weights, in x0 space, clamp(SNR, floor, gamma): min-SNR-gamma stops the easy low-noise
  steps from dominating, and the floor (Salimans & Ho's truncated SNR) keeps the high-noise steps
  weighted. Without the floor (plain min-SNR, weight = SNR there) a 3,000-step model ignored
  colour and object words completely: they only matter where the image is still mostly noise.
- The empty prompt is trained as its own class (the blank style), never as random caption
  dropout, because the probe's dropout made "" produce a mixture of styles.
- The text encoder (a small CLIPTextModel inside FrozenCLIPEmbedder) gets its own short training
  first (erasure/toy/text_encoder.py) and is frozen while the UNet trains, as in SD. The shipped
  UNet weights are its EMA.
- Every step's data, timesteps and noise come from generators seeded by (seed, step), so a run
  resumed from a checkpoint draws exactly the batches an uninterrupted run would; checkpoints
  therefore need no RNG state, only weights, EMA, optimizer and the step. They use the trainers'
  one-file format (erasure/trainers/checkpoint.py), which also refuses a checkpoint of a run
  with other training settings.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from transformers import CLIPTextConfig

from erasure.files import atomic_path, write_json
from erasure.resources import source_root
from erasure.toy.render import random_scene, render_batch
from erasure.toy.text_encoder import train_text_encoder
from erasure.toy.tokenizer import (
    END_TOKEN,
    START_TOKEN,
    load_tokenizer,
    write_tokenizer,
)
from erasure.toy.world import ARTISTS, BLANK_PROMPT, NUM_CLASSES
from erasure.trainers.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config

CHECKPOINT = "checkpoint.safetensors"
#: Training settings that leave the trained weights unchanged, so a resumed run may differ in them.
UNRECORDED_SETTINGS = ("checkpoint_minutes", "log_every")
LOSS_CSV = "loss.csv"
NULL_SPACE_TOLERANCE = 1e-6  # relative to the largest singular value


@dataclass
class TextEncoderConfig:
    """Architecture of the toy CLIPTextModel (written to text_encoder/config.json)."""

    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 3
    num_attention_heads: int = 4


@dataclass
class TrainingConfig:
    """The `training:` section of configs/toy/toy-ldm.yaml."""

    seed: int = 0
    steps: int = 10000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 300
    final_lr_fraction: float = 0.02
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    snr_weight_floor: float = 1.0
    text_encoder_steps: int = 150
    text_encoder_lr: float = 1e-3
    bare_artist_fraction: float = 0.4
    empty_prompt_fraction: float = 0.5
    checkpoint_minutes: float = 5.0
    log_every: int = 50
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    @classmethod
    def from_mapping(cls, section: dict[str, Any]) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown keys in the training section: {unknown}; known keys are {sorted(known)}")
        values = dict(section)
        text = values.pop("text_encoder", {})
        text_known = {f.name for f in fields(TextEncoderConfig)}
        if set(text) - text_known:
            raise ValueError(f"unknown keys in training.text_encoder: {sorted(set(text) - text_known)}")
        config = cls(**values, text_encoder=TextEncoderConfig(**text))
        if config.steps < 1 or config.batch_size < 1 or config.warmup_steps < 0:
            raise ValueError("training.steps and training.batch_size must be >= 1 and warmup_steps >= 0")
        return config


def load_toy_config(path: str | Path) -> tuple[DictConfig, TrainingConfig]:
    """Read the YAML: its `model:` section (for the ldm loader) and its `training:` section."""
    config = OmegaConf.load(path)
    if "model" not in config or "training" not in config:
        raise ValueError(f"{path} needs a `model:` and a `training:` section (see configs/toy/toy-ldm.yaml)")
    return config, TrainingConfig.from_mapping(OmegaConf.to_container(config.training, resolve=True))


def write_text_encoder_dir(directory: str | Path, text: TextEncoderConfig, max_length: int) -> Path:
    """Tokenizer files and CLIPTextConfig for the toy text encoder; no weights (they live in the
    LDM checkpoint under cond_stage_model.transformer.text_model.*)."""
    directory = write_tokenizer(directory, model_max_length=max_length)
    tokenizer = load_tokenizer(directory)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        max_position_embeddings=max_length,
        projection_dim=text.hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.convert_tokens_to_ids(START_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(END_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(END_TOKEN),
    )
    config.save_pretrained(directory)
    return directory


def build_model(config: DictConfig, text_encoder_dir: Path) -> LatentDiffusion:
    """Instantiate the toy LatentDiffusion with its text encoder read from `text_encoder_dir`."""
    model_config = OmegaConf.create(OmegaConf.to_container(config.model, resolve=True))
    model_config.params.cond_stage_config.params.version = str(text_encoder_dir)
    model = instantiate_from_config(model_config)
    if not isinstance(model, LatentDiffusion):
        raise TypeError(f"the toy config must build a LatentDiffusion, got {type(model).__name__}")
    return model


def sample_batch(seed: int, step: int, cfg: TrainingConfig) -> tuple[list[str], torch.Tensor]:
    """The captions and images of training step `step`: a pure function of (seed, step).

    Classes are uniform over blank + 9 artists. An artist image is captioned with the bare name
    or `a {colour} {object} by {artist}`; a blank-style image with "" or `a {colour} {object}`.
    """
    rng = np.random.default_rng([seed, step, 0x70E])
    prompts, scenes, render_seeds = [], [], []
    for _ in range(cfg.batch_size):
        scene = random_scene(rng, class_id=int(rng.integers(0, NUM_CLASSES)))
        if scene.artist == 0:
            template = "blank" if rng.random() < cfg.empty_prompt_fraction else "colour_object"
        else:
            template = "artist" if rng.random() < cfg.bare_artist_fraction else "colour_object_by_artist"
        prompts.append(scene.prompt(template))
        scenes.append(scene)
        render_seeds.append(int(rng.integers(0, 2**31 - 1)))
    return prompts, render_batch(scenes, render_seeds)


def learning_rate(step: int, cfg: TrainingConfig) -> float:
    """Linear warm-up, then cosine decay to `final_lr_fraction` of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.final_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def loss_weights(snr: torch.Tensor, parameterization: str, min_snr_gamma: float,
                 snr_weight_floor: float = 0.0) -> torch.Tensor:
    """Per-sample weights of a parameterization's squared error such that, in x0 space, every
    timestep counts clamp(SNR, snr_weight_floor, min_snr_gamma) (an x0 error e is an eps error
    e * sqrt(SNR) and a v error e * sqrt(SNR + 1))."""
    if snr_weight_floor > 0 and parameterization == "eps":
        raise ValueError("snr_weight_floor > 0 needs v or x0 parameterization: an eps loss cannot be "
                         "weighted up at SNR -> 0; set training.snr_weight_floor: 0 or parameterization: v")
    x0_weight = torch.clamp(snr, min=snr_weight_floor, max=min_snr_gamma)
    if parameterization == "v":
        return x0_weight / (snr + 1)
    if parameterization == "eps":
        return x0_weight / snr
    return x0_weight


def diffusion_loss(model: LatentDiffusion, images: torch.Tensor, context: torch.Tensor,
                   generator: torch.Generator, min_snr_gamma: float, snr_weight_floor: float = 0.0) -> torch.Tensor:
    """Weighted (see ``loss_weights``) loss of the model's parameterization at uniform random timesteps."""
    z0 = model.get_first_stage_encoding(model.encode_first_stage(images))
    t = torch.randint(0, model.num_timesteps, (z0.shape[0],), generator=generator).to(z0.device)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    z_t = model.q_sample(z0, t, noise)
    prediction = model.apply_model(z_t, t, context)
    abar = model.alphas_cumprod[t]
    weight = loss_weights(abar / (1 - abar), model.parameterization, min_snr_gamma, snr_weight_floor)
    target = {"v": lambda: model.get_v(z0, noise, t), "eps": lambda: noise, "x0": lambda: z0}[model.parameterization]()
    per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    return (weight * per_sample).mean()


def null_space_dimensions(model: LatentDiffusion) -> dict[str, float | int]:
    """Null-space size of vstack(e(""), e(artist_1..9)) (float64 SVD), the SepCE room."""
    with torch.no_grad():
        rows = model.get_learned_conditioning([BLANK_PROMPT, *ARTISTS]).double().flatten(0, 1)
    singular = torch.linalg.svdvals(rows)
    rank = int((singular > NULL_SPACE_TOLERANCE * singular[0]).sum())
    return {"rows": rows.shape[0], "width": rows.shape[1], "rank": rank,
            "null_space_dims": rows.shape[1] - rank, "relative_tolerance": NULL_SPACE_TOLERANCE}


def _repo_relative(path: Path) -> str:
    resolved, root = path.resolve(), source_root()
    return str(resolved.relative_to(root)) if root is not None and resolved.is_relative_to(root) else str(resolved)


class ToyTrainer:
    """Owns model, EMA and optimizer of one run directory; `run()` trains, checkpoints, ships."""

    def __init__(self, config_path: Path, run_dir: Path, out_dir: Path, steps: int | None = None,
                 overwrite: bool = False, log: Callable[[str], None] = print) -> None:
        self.config_path = Path(config_path)
        self.config, self.cfg = load_toy_config(self.config_path)
        if steps is not None:
            self.cfg.steps = steps
        self.run_dir, self.out_dir, self.log = Path(run_dir), Path(out_dir), log
        self.run_dir.mkdir(parents=True, exist_ok=True)
        max_length = int(self.config.model.params.cond_stage_config.params.max_length)
        self.text_encoder_dir = write_text_encoder_dir(self.run_dir / "text_encoder", self.cfg.text_encoder, max_length)
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(self.config, self.text_encoder_dir)
        resuming = not overwrite and (self.run_dir / CHECKPOINT).is_file()
        self.text_encoder_training: dict[str, Any] = {}
        if not resuming:  # a checkpoint holds the trained text encoder
            self.text_encoder_training = train_text_encoder(
                self.model.cond_stage_model, self.cfg.text_encoder_steps, self.cfg.text_encoder_lr, self.cfg.seed)
            self.log(f"text encoder trained: {self.text_encoder_training}")
        self.model.cond_stage_model.freeze()
        self.ema = LitEma(self.model, decay=self.cfg.ema_decay)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=self.cfg.lr, betas=(0.9, 0.99),
                                           weight_decay=self.cfg.weight_decay)
        self.step, self.train_seconds = 0, 0.0
        if resuming:
            self._load_checkpoint()
        elif overwrite:
            (self.run_dir / LOSS_CSV).unlink(missing_ok=True)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a resumed run restores in place: the trained parameters first, in optimizer order (the
        checkpoint names optimizer state by position), then the model's other parameters and buffers (the trained
        text encoder among them), then the EMA's buffers."""
        trained = {f"model.{name}": p for name, p in self.model.named_parameters() if p.requires_grad}
        model = {f"model.{name}": t for name, t in self.model.state_dict(keep_vars=True).items()}
        ema = {f"ema.{name}": t for name, t in self.ema.state_dict(keep_vars=True).items()}
        return {**trained, **{k: v for k, v in model.items() if k not in trained}, **ema}

    def _run_settings(self) -> dict[str, Any]:
        """The settings that decide the trained weights; a checkpoint of a run with others is refused."""
        return {key: value for key, value in asdict(self.cfg).items() if key not in UNRECORDED_SETTINGS}

    def _save_checkpoint(self) -> None:
        extra = {"train_seconds": self.train_seconds, "text_encoder_training": self.text_encoder_training}
        state = TrainingState(step=self.step, run=self._run_settings(), stoppers={}, extra=extra)
        save_checkpoint(self.run_dir / CHECKPOINT, self._checkpoint_tensors(), self.optimizer, state)
        self.log(f"checkpoint: step {self.step} -> {self.run_dir / CHECKPOINT}")

    def _load_checkpoint(self) -> None:
        state = load_checkpoint(self.run_dir / CHECKPOINT, self._checkpoint_tensors(), self.optimizer,
                                self._run_settings())
        self.step, self.train_seconds = state.step, float(state.extra["train_seconds"])
        self.text_encoder_training = state.extra["text_encoder_training"]
        self._truncate_loss_csv()
        self.log(f"resumed from step {self.step} ({self.train_seconds / 60:.1f} min of training so far)")

    def _truncate_loss_csv(self) -> None:
        """Drop loss rows logged after the checkpoint, which the resumed run will log again."""
        path = self.run_dir / LOSS_CSV
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [rows[0]] + [row for row in rows[1:] if int(row[0]) <= self.step]
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)

    # ------------------------------------------------------------------ training
    def train_step(self) -> float:
        prompts, images = sample_batch(self.cfg.seed, self.step, self.cfg)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.cfg)
        # Encode each distinct caption once (a batch repeats "" and the bare names many times).
        distinct = sorted(set(prompts))
        rows = torch.tensor([distinct.index(p) for p in prompts])
        context = self.model.get_learned_conditioning(distinct)[rows.to(self.model.device)]
        loss = diffusion_loss(self.model, images.to(self.model.device), context, generator,
                              self.cfg.min_snr_gamma, self.cfg.snr_weight_floor)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.grad_clip)
        self.optimizer.step()
        self.ema(self.model)
        self.step += 1
        return loss.item()

    def run(self, max_minutes: float | None = None, stop_requested: Callable[[], bool] = lambda: False) -> bool:
        """Train until the configured steps, `max_minutes` or `stop_requested()` (checked every step, e.g.
        set by a SIGTERM handler); returns True when finished and shipped, False after a checkpoint."""
        started = time.time()
        last_checkpoint = started
        csv_path = self.run_dir / LOSS_CSV
        new_csv = not csv_path.is_file()
        window: list[float] = []
        window_start = time.time()
        with open(csv_path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new_csv:
                writer.writerow(["step", "train_minutes", "loss", "lr", "seconds_per_step"])
            while self.step < self.cfg.steps:
                tick = time.time()
                window.append(self.train_step())
                self.train_seconds += time.time() - tick
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    per_step = (time.time() - window_start) / len(window)
                    lr = learning_rate(self.step - 1, self.cfg)
                    writer.writerow([self.step, f"{self.train_seconds / 60:.2f}", f"{np.mean(window):.5f}",
                                     f"{lr:.3e}", f"{per_step:.3f}"])
                    handle.flush()
                    eta = (self.cfg.steps - self.step) * per_step / 60
                    self.log(f"step {self.step}/{self.cfg.steps}  loss {np.mean(window):.4f}  lr {lr:.2e}  "
                             f"{per_step:.2f} s/step  eta {eta:.0f} min")
                    window, window_start = [], time.time()
                out_of_time = max_minutes is not None and time.time() - started >= 60 * max_minutes
                interrupted = out_of_time or stop_requested()
                if time.time() - last_checkpoint >= 60 * self.cfg.checkpoint_minutes or interrupted:
                    self._save_checkpoint()
                    last_checkpoint = time.time()
                if interrupted and self.step < self.cfg.steps:
                    reason = f"after {max_minutes} min" if out_of_time else "on request"
                    self.log(f"stopped {reason} at step {self.step}; run again to resume")
                    return False
        self._save_checkpoint()
        self.ship()
        return True

    # ------------------------------------------------------------------ shipping
    def final_loss(self, last_rows: int = 4) -> float | None:
        path = self.run_dir / LOSS_CSV
        if not path.is_file():
            return None
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return float(np.mean([float(r["loss"]) for r in rows[-last_rows:]])) if rows else None

    def ship(self) -> None:
        """Write model.safetensors (EMA weights), text_encoder/ and model.json into out_dir, each atomically."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ema.copy_to(self.model)
        self.model.eval()
        state = self.model.state_dict()
        null_space = null_space_dimensions(self.model)
        with atomic_path(self.out_dir / "model.safetensors") as temporary:
            tensors = {key: value.detach().contiguous() for key, value in state.items()}
            save_file(tensors, str(temporary), metadata={"format": "pt", "step": str(self.step)})
        staged = self.out_dir / "text_encoder.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(self.text_encoder_dir, staged)
        target = self.out_dir / "text_encoder"
        if target.exists():
            previous = self.out_dir / "text_encoder.old"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(target, previous)
            os.replace(staged, target)
            shutil.rmtree(previous)
        else:
            os.replace(staged, target)
        meta = {
            "description": "toy text-to-image LatentDiffusion (9 fictional artists + blank); UNet and text "
                           "encoder weights are the EMA of training",
            "config_file": _repo_relative(self.config_path),
            "config": OmegaConf.to_container(self.config, resolve=True),
            "training": asdict(self.cfg),
            "seed": self.cfg.seed,
            "steps": self.step,
            "final_loss": self.final_loss(),
            "text_encoder_training": self.text_encoder_training,
            "train_minutes": round(self.train_seconds / 60, 1),
            "null_space": null_space,
            "parameters": {"unet": sum(p.numel() for p in self.model.model.parameters()),
                           "text_encoder": sum(p.numel() for p in self.model.cond_stage_model.parameters())},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        write_json(meta, self.out_dir / "model.json")
        self.log(f"shipped {self.out_dir}: null space {null_space['null_space_dims']} dims "
                 f"(rank {null_space['rank']} of {null_space['rows']}x{null_space['width']})")
