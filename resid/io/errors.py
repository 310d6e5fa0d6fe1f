"""The error every checkpoint reader raises."""


class CheckpointError(ValueError):
    """A file or folder that is not a checkpoint resid can read; the message says why."""
