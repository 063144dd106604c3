"""Errors a person can cause and fix (a config value, a missing or corrupt file, a foreign checkpoint).

Raise :class:`UserError` with a message that says what was wrong and what to do. The command-line
entry points catch it, print the message without a Python traceback and exit with status 2.
Anything else is a bug in flowlab and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one message."""


class ConfigError(UserError, ValueError):
    """A configuration value is not allowed; the message names the key, the value and what is allowed."""


class DataError(UserError):
    """A dataset is missing, empty or corrupt; the message names the file or folder."""


class CheckpointError(UserError):
    """A checkpoint is missing, unsafe, corrupt or belongs to another model configuration."""
