"""The toy world: nine fictional artists drawing coloured shapes, a small text-to-image latent
diffusion model trained on it, and oracle classifiers that judge its images.

Modules: `world` (names, prompts, classes), `render` (deterministic images), `tokenizer`
(CLIP-BPE files), `oracle` (artist / object / colour classifiers), `training` (the diffusion
model's training loop). The shipped files live in `models/toy/` (TOY_DIR; in a non-editable
install, `erasure/_resources/models/toy/`: see `erasure.resources`).
"""

from erasure.resources import toy_config_path, toy_model_dir

TOY_DIR = toy_model_dir()
TOY_CONFIG = toy_config_path()
