"""Every training default, once: frozen settings of SepCE, CiE and ESD (METHOD.md §1, §2, §5).

The scripts map their flags onto these dataclasses and the Python API takes them as they are, so
a default lives here and nowhere else. ``lr=None`` means "the method's default learning rate for
the model's world" (``DEFAULT_LEARNING_RATES``): METHOD.md's reference values on Stable
Diffusion, values measured on the shipped toy model for the toy world (at the SD values the toy
artist is not erased: SepCE at 0.1 still has momentum 0.13 after 1000 steps, CiE at 1e-5 stops by
the momentum rule with the artist at 0.80; at the toy values it is gone after about 630 (SepCE),
60 (CiE) and 50 (ESD-x) steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from erasure.errors import SettingsError

#: method -> world name -> Adam learning rate. Worlds not listed use the "sd" (reference) value.
DEFAULT_LEARNING_RATES: dict[str, dict[str, float]] = {
    "sepce": {"sd": 0.1, "toy": 1.0},
    "cie": {"sd": 1e-5, "toy": 1e-4},
    "esd": {"sd": 1e-5, "toy": 1e-4},
}
REFERENCE_WORLD = "sd"
SEPCE_MODES = ("joint", "sequential")
#: METHOD.md §2 / §6: optimise the CiE loss from zero, solve in closed form, or optimise from the closed form.
SEPCE_SOLVERS = ("cie", "closed_form", "closed_form+cie")
#: Kinds of concept with built-in wordings (erasure.wordings).
CONCEPT_KINDS = ("artist", "object")
#: METHOD.md §2: the authors' v1 code (one momentum and one L1 term per concept) or the paper's
#: Eq. 34/37 (one L1 term on the sum of the increments, one weighted momentum for the set).
JOINT_OBJECTIVES = ("per_concept", "paper")
#: METHOD.md §2: protected by every SepCE increment so an invisible-watermark prompt keeps its output.
DEFAULT_WATERMARK_PROMPT = "watermark SRS-ME"
#: METHOD.md §5: the UNet's timestep for ESD's partial sample; "reference" = ESD's code (a DDPM index
#: drawn from the DDIM step's 20-step bin), "noise_level" = the DDPM step whose noise z really has.
ESD_TIMESTEPS = ("reference", "noise_level")
ESD_TRAIN_METHODS = {"xattn": "esd_x", "noxattn": "esd_u"}
#: METHOD.md §1: the momentum stop compares L_dir's momentum with tau times the concept's own
#: representation energy (relative, the default) or with tau itself (absolute, the reference).
STOP_RULES = ("relative", "absolute")
#: The default tau of each stop rule: the reference's 1e-4 (absolute); 3e-4 of the starting energy
#: (relative), the share the reference's 1e-4 is of a toy artist's starting L_dir (0.36), so artists
#: stop where they did and concepts with a small representation (objects) train on.
DEFAULT_TAU = {"absolute": 1e-4, "relative": 3e-4}


def default_learning_rate(method: str, world: str) -> float:
    """The default Adam learning rate of ``method`` ("sepce", "cie" or "esd") for a model of ``world``."""
    rates = DEFAULT_LEARNING_RATES[method]
    return rates.get(world, rates[REFERENCE_WORLD])


@dataclass(frozen=True)
class TrainingSettings:
    """What every trainer shares. ``iterations`` is the per-concept step limit; the momentum stop
    (``alpha``, ``tau`` after ``warmup`` steps, ``stop`` relative or absolute; ``tau=None`` is the
    rule's ``DEFAULT_TAU``) is METHOD.md §1's. ``checkpoint`` (a file path)
    makes the run resumable: written every ``save_every`` steps, continued when ``resume``."""

    #: The method whose default learning rate ``lr=None`` stands for (a DEFAULT_LEARNING_RATES key).
    method_family: ClassVar[str] = ""

    lr: float | None = None
    iterations: int = 1000
    batch_size: int = 1
    seed: int = 0
    alpha: float = 0.9
    tau: float | None = None
    stop: str = "relative"
    warmup: int = 10
    num_images: int = 100
    save_every: int = 100
    checkpoint: Path | None = None
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.lr is not None and (not math.isfinite(self.lr) or self.lr <= 0):
            raise SettingsError(f"lr (--lr) must be a positive finite number, got {self.lr}.")
        for name in ("iterations", "batch_size", "num_images"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} (--{name}) must be >= 1, got {getattr(self, name)}.")
        if self.save_every < 0:
            raise SettingsError(f"save_every (--save_every) must be >= 0 (0: never), got {self.save_every}.")
        if not math.isfinite(self.alpha) or not 0 <= self.alpha < 1:
            raise SettingsError(f"alpha (--alpha) must be in [0, 1), got {self.alpha}.")
        if self.tau is not None and not math.isfinite(self.tau):
            raise SettingsError(f"tau (--tau) must be a finite number, got {self.tau}.")
        if self.stop not in STOP_RULES:
            raise SettingsError(f"stop (--stop) must be one of {STOP_RULES}, got {self.stop!r}.")
        if self.resume and self.checkpoint is None:
            raise SettingsError("resume=True needs a checkpoint path (settings.checkpoint).")

    @property
    def stop_tau(self) -> float:
        """``tau``, or the stop rule's default when it is None."""
        return DEFAULT_TAU[self.stop] if self.tau is None else self.tau

    def with_lr(self, method: str, world: str) -> TrainingSettingsT:
        """These settings with ``lr`` filled in from the defaults when it is None."""
        if self.lr is not None:
            return self  # type: ignore[return-value]
        return replace(self, lr=default_learning_rate(method, world))  # type: ignore[return-value]

    def result_settings(self) -> dict[str, Any]:
        """The settings that decide the result (recorded in outputs, compared on resume)."""
        settings = asdict(self)
        for key in ("checkpoint", "resume", "progress", "save_every"):
            settings.pop(key)
        settings["tau"] = self.stop_tau
        return settings


TrainingSettingsT = TypeVar("TrainingSettingsT", bound=TrainingSettings)


@dataclass(frozen=True)
class SepCESettings(TrainingSettings):
    """SepCE (METHOD.md §2): increment scale ``beta``, L1 weight ``lam``, null-space tolerance
    ``rtol`` and smallest usable null space ``min_dims``; ``mode`` joint or sequential;
    ``protect_classes`` None = the model world's default (the toy world protects its other classes);
    ``watermark_prompt`` is protected by every increment ("" = none); ``joint_objective`` per_concept
    (default: each concept stops on its own momentum and its L1 term touches only its own increment,
    so an increment does not depend on which other concepts trained with it) or paper (Eq. 34/37)."""

    method_family: ClassVar[str] = "sepce"

    beta: float = 1e-4
    lam: float = 1e-6
    rtol: float = 1e-6
    min_dims: int = 8
    mode: str = "joint"
    protect_classes: bool | None = None
    watermark_prompt: str = DEFAULT_WATERMARK_PROMPT
    joint_objective: str = "per_concept"
    #: METHOD.md §6: how the coefficients are found (SEPCE_SOLVERS) and the closed form's inputs:
    #: ridge ``mu`` (relative), ``target`` (replaces the name in every wording; "" removes it), the
    #: wordings (``concept_templates`` file, else the built-in ones of ``concept_kind``; the optimiser
    #: trains over them too: every bare row plus one with a drawn wording), and the
    #: approximately protected prompts (``protect_file``, kept at ``protect_energy`` of their energy);
    #: ``keep_wordings``: the closed form also keeps the protected prompts' wordings as they are (less
    #: drift on them, weaker erasure of held-out wordings: METHOD.md §6).
    solver: str = "cie"
    mu: float = 1.0
    target: str = ""
    concept_templates: str | None = None
    concept_kind: str = "artist"
    protect_file: str | None = None
    protect_energy: float = 1.0
    keep_wordings: bool = False

    def validate(self) -> None:
        super().validate()
        if self.solver not in SEPCE_SOLVERS:
            raise SettingsError(f"solver (--solver) must be one of {SEPCE_SOLVERS}, got {self.solver!r}.")
        if not math.isfinite(self.mu) or self.mu <= 0:
            raise SettingsError(f"mu (--mu) must be a positive finite number, got {self.mu}; 1 is the default.")
        if self.concept_kind not in CONCEPT_KINDS:
            raise SettingsError(
                f"concept_kind (--concept_kind) must be one of {CONCEPT_KINDS}, got {self.concept_kind!r}."
            )
        if not 0 < self.protect_energy <= 1:
            raise SettingsError(
                f"protect_energy (--protect_energy) must be in (0, 1], got {self.protect_energy}; 1 protects every "
                f"prompt of --protect_file exactly, 0.999 keeps 99.9% of their energy."
            )
        if self.mode not in SEPCE_MODES:
            raise SettingsError(f"mode (--mode) must be one of {SEPCE_MODES}, got {self.mode!r}.")
        if self.joint_objective not in JOINT_OBJECTIVES:
            raise SettingsError(
                f"joint_objective (--joint_objective) must be one of {JOINT_OBJECTIVES}, got {self.joint_objective!r}."
            )
        if self.joint_objective == "paper" and self.mode == "sequential":
            raise SettingsError(
                "joint_objective='paper' couples the concepts trained together; it needs mode='joint' (--mode joint)."
            )
        if not math.isfinite(self.beta) or self.beta <= 0:
            raise SettingsError(f"beta (--beta) must be a positive finite number, got {self.beta}.")
        if not math.isfinite(self.lam) or self.lam < 0:
            raise SettingsError(f"lam (--lam) must be a finite number >= 0, got {self.lam}.")
        if self.min_dims < 1:
            raise SettingsError(f"min_dims (--min_dims) must be >= 1, got {self.min_dims}.")
        if not 0 < self.rtol < 1:
            raise SettingsError(f"rtol (--rtol) must be in (0, 1), got {self.rtol}; the default 1e-6 suits float32.")


@dataclass(frozen=True)
class CiESettings(TrainingSettings):
    """CiE (METHOD.md §1): every attn2 weight, L1 weight ``lam`` (1e-6 .. 3e-5)."""

    method_family: ClassVar[str] = "cie"

    lam: float = 1e-6

    def validate(self) -> None:
        super().validate()
        if not math.isfinite(self.lam) or self.lam < 0:
            raise SettingsError(f"lam (--lam) must be a finite number >= 0, got {self.lam}.")


@dataclass(frozen=True)
class ESDSettings(TrainingSettings):
    """ESD (METHOD.md §5): ``train_method`` xattn (ESD-x) or noxattn (ESD-u), the partial DDIM
    sample's ``ddim_steps`` and ``start_guidance``, the target's ``negative_guidance``, the UNet's
    ``timestep`` convention (reference: ESD's, the default; noise_level: the partial sample's true
    noise level). ESD has no stop rule: it runs all ``iterations``."""

    method_family: ClassVar[str] = "esd"

    train_method: str = "xattn"
    ddim_steps: int = 50
    start_guidance: float = 3.0
    negative_guidance: float = 1.0
    timestep: str = "reference"

    def result_settings(self) -> dict[str, Any]:
        """As the others', without the stop rule: ESD runs all its iterations."""
        settings = super().result_settings()
        for key in ("tau", "stop"):
            settings.pop(key)
        return settings

    def validate(self) -> None:
        super().validate()
        if self.train_method not in ESD_TRAIN_METHODS:
            raise SettingsError(
                f"train_method (--train_method) {self.train_method!r} is unknown; use 'xattn' (ESD-x) or 'noxattn' "
                f"(ESD-u)."
            )
        if self.ddim_steps < 1:
            raise SettingsError(f"ddim_steps (--ddim_steps) must be >= 1, got {self.ddim_steps}.")
        for name in ("start_guidance", "negative_guidance"):
            if not math.isfinite(getattr(self, name)):
                raise SettingsError(f"{name} (--{name}) must be a finite number, got {getattr(self, name)}.")
        if self.timestep not in ESD_TIMESTEPS:
            raise SettingsError(f"timestep (--timestep) must be one of {ESD_TIMESTEPS}, got {self.timestep!r}.")

    @property
    def method(self) -> str:
        """The name results are recorded under: esd_x or esd_u."""
        return ESD_TRAIN_METHODS[self.train_method]
