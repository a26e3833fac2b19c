"""The one error type for mistakes a user can make (bad config, bad recording, bad option).

The CLI prints its message on one line and exits with `exit_code` (2 unless said otherwise), without a traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message says what, where, and how to fix it."""

    exit_code = 2  # retrying cannot help (a Kubernetes podFailurePolicy fails the index on it)


class RunsFailed(UserError):
    """Some runs of a search failed while training; the others finished."""

    exit_code = 1


class ConfigError(UserError):
    """A hyperparameter file or value is wrong."""


class DataError(UserError):
    """A recording is missing or malformed."""


class AccessRefused(UserError):
    """The MLflow tracking server refused the request's credentials (error_code UNAUTHENTICATED, 401) or its user
    (PERMISSION_DENIED, 403); the code is kept so a caller can reword the line with where the address came from."""

    def __init__(self, message: str, error_code: str):
        super().__init__(message)
        self.error_code = error_code


class TrackingUnavailable(UserError):
    """The MLflow tracking server could not be reached: training stops, the local checkpoints stay, a rerun resumes."""

    exit_code = 3  # retrying later can help (a Kubernetes podFailurePolicy should not fail the index on it)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a pod being stopped, `docker stop`): unwinds like Ctrl-C so the run ends KILLED."""
