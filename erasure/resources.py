"""Where the embedded toy model and its config are: the source tree, else the installed package.

The repository keeps them at ``configs/toy/`` and ``models/toy/``, the paths the README, the
scripts and CompVis-overlay users rely on. A wheel can only install files inside its packages,
so setup.py ships the same folders as ``erasure/_resources/configs/toy/`` and
``erasure/_resources/models/toy/``. Both layouts keep the same relative paths under one root,
which the toy config needs: it names its text encoder as ``models/toy/text_encoder``.

Nothing here raises on import: the paths are computed when a module asks for them, and
``require_toy_file`` raises the one error that says how to get a missing file back.
"""

from __future__ import annotations

from pathlib import Path

from erasure.errors import ToyFilesMissingError

TOY_CONFIG_RELATIVE = Path("configs", "toy", "toy-ldm.yaml")
TOY_MODEL_RELATIVE = Path("models", "toy")
#: Where setup.py puts configs/toy/ and models/toy/ in a non-editable install.
PACKAGED_ROOT = Path(__file__).resolve().parent / "_resources"
_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def source_root() -> Path | None:
    """The checkout (or CompVis clone) this package runs from; None when it runs installed.

    A checkout is recognised by the toy config beside the package, which no site-packages has;
    outputs such as generated training images belong there, never inside an installation.
    """
    return _CHECKOUT_ROOT if (_CHECKOUT_ROOT / TOY_CONFIG_RELATIVE).is_file() else None


def resource_root() -> Path:
    """The folder that holds ``configs/toy/`` and ``models/toy/``: the source tree, else the installed copy."""
    return source_root() or PACKAGED_ROOT


def toy_config_path() -> Path:
    """The embedded toy model's ldm config (``configs/toy/toy-ldm.yaml``)."""
    return resource_root() / TOY_CONFIG_RELATIVE


def toy_model_dir() -> Path:
    """The embedded toy model's folder (``models/toy/``: weights, text encoder, oracle)."""
    return resource_root() / TOY_MODEL_RELATIVE


def require_toy_file(path: Path) -> Path:
    """``path`` if it is a file, else one error that names the fix for this kind of installation."""
    if path.is_file():
        return path
    if source_root() is not None:
        fix = "rebuild it with `python train-scripts/train-toy.py`"
    else:
        fix = (
            "this installation lacks the toy files its wheel ships; reinstall from a clone of the "
            "repository (`pip install .`) or run from the clone"
        )
    raise ToyFilesMissingError(
        f"The embedded toy model is incomplete: {path} is missing; {fix}; or pass --config_path and "
        f"--ckpt_path for SD v1.4."
    )
