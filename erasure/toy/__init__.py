"""The toy world: nine fictional artists drawing coloured shapes, a small text-to-image latent
diffusion model trained on it, and oracle classifiers that judge its images.

Modules: `world` (names, prompts, classes), `render` (deterministic images), `tokenizer`
(CLIP-BPE files), `oracle` (artist / object / colour classifiers), `training` (the diffusion
model's training loop). The shipped files live in `models/toy/` (TOY_DIR).
"""

from pathlib import Path

TOY_DIR = Path(__file__).resolve().parents[2] / "models" / "toy"
TOY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy" / "toy-ldm.yaml"
