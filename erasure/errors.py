"""Every error the project raises for input a user can fix, in one module.

Each names the problem and the fix in its message. All but two are ``ErasureError``s, which are
``ValueError``s, so ``except ValueError`` keeps working; ``NonFiniteLossError`` is also a
``FloatingPointError`` and ``ToyFilesMissingError`` a ``FileNotFoundError``. Scripts turn them into one
line on stderr (``erasure.cli.run_script``); the Python API raises them as they are.
"""

from __future__ import annotations


class ErasureError(ValueError):
    """Input the project cannot use as given; the message names the problem and the fix."""


class CapacityError(ErasureError):
    """The protected prompts leave (almost) no null space at this text width."""


class CheckpointError(ErasureError):
    """A checkpoint that does not belong to this run or cannot be read; the message says the fix."""


class ErasureFileError(ErasureError):
    """A file that cannot be written or read as the requested kind; the message says the fix."""


class ExportError(ErasureError):
    """A model that cannot be exported as asked; the message says what to do instead."""


class GenerationError(ErasureError):
    """Options or an output folder that would give wrong or mixed images; the message names the fix."""


class GridError(ErasureError):
    """Rows or labels that do not make a grid; the message says what to pass instead."""


class ImageDataError(ErasureError):
    """An image folder that cannot be used as it is; the message names the folder and the fix."""


class IncrementError(ErasureError):
    """An increment that does not fit the model or the request; the message says the fix."""


class MetricsError(ErasureError):
    """Metrics that cannot be computed as asked; the message says what to pass instead."""


class ModelLoadError(ErasureError):
    """A config or checkpoint that cannot give a working model; the message says how to fix it."""


class OverlayError(ErasureError):
    """A CompVis clone or overlay file list the overlay check cannot use; the message says the fix."""


class NonFiniteLossError(ErasureError, FloatingPointError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""


class PromptFileError(ErasureError):
    """A prompt CSV that cannot be used; the message names the file, the row and the fix."""


class SamplingError(ErasureError):
    """Sampler settings that cannot make images; the message names the setting and the fix."""


class SceneError(ErasureError):
    """A timeline, concept list or set of edits that cannot make a scene; the message says the fix."""


class SettingsError(ErasureError):
    """Settings that cannot give a working run; the message names the setting and the fix."""


class ToyFilesMissingError(ErasureError, FileNotFoundError):
    """A file of the embedded toy model is absent; the message says how to get it back."""


class TrainingDataError(ErasureError):
    """Training images that are missing, unreadable or inconsistent; the message names the fix."""


class TrainingSetupError(ErasureError):
    """Options that cannot give a working training run; the message names the fix."""


class VerificationError(ErasureError):
    """Composed increments that change a protected prompt's keys/values beyond the tolerance, or a
    compose -> detach that does not give back the exact weights; ``report`` holds the measurements."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class WeightDifferenceError(ErasureError):
    """A weight difference that does not fit the model; the message says the fix."""


class WorldError(ErasureError):
    """An unknown class, or a world that cannot be read or used; the message names the problem and the fix."""
