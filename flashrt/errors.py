"""The exceptions flashrt raises. Catch `FlashrtError` to catch them all.

Each subclasses the built-in a caller would already expect, so `except OSError`
or `except ValueError` keep working too.
"""


class FlashrtError(Exception):
    """Base class of every error flashrt raises on purpose."""


class ModelFormatError(FlashrtError, ValueError):
    """A model directory (or a source checkpoint) is missing, corrupt or unsupported."""


class UnsupportedModelError(ModelFormatError):
    """The architecture or a config option is one flashrt does not implement."""


class BudgetError(FlashrtError, ValueError):
    """The memory budget is too small to run the model; the message names the minimum."""


class FlashIOError(FlashrtError, OSError):
    """Reading weights from flash failed (names the file, offset and errno)."""


class GenerationError(FlashrtError, ValueError):
    """Bad generation input: empty prompt, prompt longer than the context, bad sampling values."""


class DiskFullError(FlashrtError, OSError):
    """Writing a model directory (conversion, calibration) ran out of disk space; names the file."""
