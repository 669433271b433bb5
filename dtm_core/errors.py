"""The project's error family: problems a user can fix, reported as one line.

A :class:`DtmError` is raised where a user's input, a missing upstream output or an unreachable service is
detected, its message naming the key or file and the fix. The stage runner (:func:`stages.common.main`) prints
exactly these as one line with exit status 2; anything else (``ValueError``, ``KeyError`` ...) is a bug and
keeps its traceback. The classes live here so that the runner can catch them without importing the library.
"""


class DtmError(Exception):
    """Base of every error a user can fix; the stage runner prints its message alone."""


class ConfigError(DtmError):
    """params.yaml is missing, unreadable or invalid."""


class DataError(DtmError):
    """The configured data source, or a prepared split, cannot be read."""


class OutputError(DtmError):
    """An output path cannot be written."""


class ModelLoadError(DtmError):
    """A model directory is missing, not a diffusers model, corrupt, or does not fit the data."""


class PartitionError(DtmError):
    """Ranges that do not tile [0, T)."""


class TaskVectorError(DtmError):
    """Task vectors or state dicts that do not line up."""


class TrackingError(DtmError):
    """The MLflow tracking store cannot be used."""


class MissingInputError(DtmError):
    """A file an upstream stage produces is missing or corrupt (re-run that stage)."""


class WeightsMissingError(DtmError):
    """A weight file that would have to be downloaded (e.g. clean-fid's Inception) is not on disk."""


class TrainingDivergedError(DtmError):
    """The loss became NaN or infinite: the recipe (usually the learning rate) is unstable."""
