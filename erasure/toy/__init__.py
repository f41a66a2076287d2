"""The toy world: nine fictional artists drawing coloured shapes, a small text-to-image latent
diffusion model trained on it, and oracle classifiers that judge its images.

Modules: `world` (names, prompts, classes), `render` (deterministic images), `tokenizer`
(CLIP-BPE files), `oracle` (artist / object / colour classifiers), `training` (the diffusion
model's training loop). The shipped files live in `models/toy/` (TOY_DIR).
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TOY_DIR = REPO_ROOT / "models" / "toy"
TOY_CONFIG = REPO_ROOT / "configs" / "toy" / "toy-ldm.yaml"
