"""The error a harvest raises when it cannot start, resume or be read."""


class HarvestError(ValueError):
    """A harvest that cannot start, resume or be read; the message names the problem and the
    fix."""
