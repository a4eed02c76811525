"""Exceptions raised for bad input.

Every message names the file, key or value at fault, so a user can fix the input
without reading a traceback from deep inside torch.
"""


class S4MCError(Exception):
    """Base class for all errors this package raises about its inputs."""


class ConfigError(S4MCError, ValueError):
    """A config file, key, value or override is wrong."""


class DataError(S4MCError, ValueError):
    """A dataset root, split file, image or mask is missing or malformed."""


class CheckpointError(S4MCError, ValueError):
    """A weights or checkpoint file is missing or does not fit the model."""
