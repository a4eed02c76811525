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


def clean_message(exc: BaseException) -> str:
    """The error's own message. An error raised in a DataLoader worker reaches the main
    process with torch's worker traceback in front of it; keep only the original message
    (which names the file)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    kind = type(exc)
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        at = text.rfind("\n" + prefix)
        if at >= 0:
            return text[at + 1 + len(prefix):].strip()
    return text
