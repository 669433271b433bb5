"""The errors a stage reports as one clear message (exit status 2), never a traceback.

They live here, not beside the code that raises them, so that the stage entry
point (:mod:`dtm_core.cli`) can catch them without importing the whole
library: each DVC stage depends only on the modules it runs.
"""


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid."""


class DataError(ValueError):
    """The configured data source cannot be read."""


class OutputError(RuntimeError):
    """An output path cannot be written."""


class ModelLoadError(RuntimeError):
    """A model directory is missing, not a diffusers model, or corrupt."""


class PartitionError(ValueError):
    """Ranges that do not tile [0, T)."""


class TaskVectorError(ValueError):
    """Task vectors or state dicts that do not line up."""


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


KNOWN_ERRORS = (
    ConfigError, DataError, OutputError, ModelLoadError, PartitionError, TaskVectorError, TrackingError,
    FileNotFoundError, ValueError, FloatingPointError,
)
