"""pevideo's own exception classes.

The command line maps them to exit statuses (see ``pevideo --help``): a :class:`UsageError` is exit 2
(the command was wrong: fix it and run again), any other :class:`PevideoError` is exit 3 (the run
failed on its data or its files). Both print one line that names the file and the cause.
"""
from __future__ import annotations

__all__ = ["PevideoError", "UsageError", "CheckpointMismatchError", "CheckpointConfigError"]


class PevideoError(Exception):
    """Base of the errors pevideo raises on purpose (as opposed to bugs). Its message is meant to be
    shown to a user as it is: it names the file (or argument) and the cause."""


class UsageError(PevideoError, ValueError):
    """Bad arguments: a device torch does not know, an output name of the wrong kind, ... (a ValueError,
    so that callers that catch ValueError for bad arguments keep working)."""


class CheckpointMismatchError(UsageError):
    """A checkpoint's tensors don't fit the model its config describes, or its files disagree: a tensor
    missing, unexpected or of the wrong shape, integer or bool data where float weights belong, one tensor
    in two shards with different values. The message names the tensors (and the files)."""


class CheckpointConfigError(UsageError):
    """A checkpoint's ``config.json`` (or its weights index) cannot describe a PE Video model: not JSON,
    not a JSON object, a size that is zero, negative or not an integer, a shard name outside the folder.
    The message names the file and the field."""
