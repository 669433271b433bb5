"""The project's error family: problems a user can fix, reported as one line.

Every error that a user's input, a missing upstream output or an unreachable
service can cause is a :class:`DtmError`, raised at the place that validates
it with a message naming the key or file and what would fix it. The stage
runner (:func:`stages.common.main`) turns exactly these into a one-line
message and exit status 2. Anything else (``ValueError``, ``KeyError``,
``RuntimeError`` ... from a bug in the library or a dependency) is not caught
there: it propagates with its traceback, so a bug never looks like a user's
mistake.

The classes live in this small module, not beside the code that raises them,
so that the stage runner can catch them without importing the whole library.
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
