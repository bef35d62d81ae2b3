"""Every error oodlab raises on purpose, in one leaf module that any layer may import.

Each is a ``ValueError`` whose message names the bad field, file or reference and what is
allowed, so the CLI can print it as one line and exit 2 instead of a traceback.
"""


class SpecError(ValueError):
    """A spec or search space that cannot be run. The message names each bad field."""


class StorageError(SpecError):
    """S3 storage is unreachable, missing or refuses access; says what and why."""


class JobError(SpecError):
    """A Ray Jobs submission that cannot be sent or a job that cannot be found."""


class ModelReferenceError(ValueError):
    """A runs:/ or models:/ reference that does not resolve to a usable detector."""
