"""The one error type for mistakes a user can make (bad config, bad recording, bad option).

The CLI prints its message on one line and exits non-zero, without a traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message says what, where, and how to fix it."""


class ConfigError(UserError):
    """A hyperparameter file or value is wrong."""


class DataError(UserError):
    """A recording is missing or malformed."""
