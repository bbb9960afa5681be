"""needle's exceptions. Each carries the message the `needle` command prints for the same
problem; those about bad input are also ``ValueError`` (and file problems ``OSError``), so
generic handlers catch them too."""


class NeedleError(Exception):
    """Base of every needle error."""


class ConfigError(NeedleError, ValueError):
    """A config file or dict that cannot be used: unknown keys, values out of range."""


class DataError(NeedleError, ValueError):
    """Input data that cannot be read: a missing column, a malformed row, an empty table."""


class TrainError(NeedleError):
    """Training failed, e.g. it diverged (non-finite loss)."""


class Cancelled(TrainError):
    """Training was stopped before its first epoch ended, so there is nothing to save."""


class RunError(NeedleError):
    """A run directory that cannot be read, or data other than what the run was trained on."""


class VectorIndexError(NeedleError, ValueError):
    """An index that cannot be built, opened or searched: bad parameters, a damaged file."""


class FileError(NeedleError, OSError):
    """A file or folder that cannot be read or written."""


class InvalidArgument(NeedleError, ValueError):
    """An argument out of range, or naming a user or item that does not exist."""
