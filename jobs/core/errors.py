"""Exceptions the command line shows as one clear line instead of a traceback."""


class UserError(Exception):
    """A bad config, a missing file, an unsupported model: shown as one line, exit code 2.

    The message must name the thing (a dotted config key, a path, a tensor) and the fix.
    """


class RunFailed(Exception):
    """A run that started and then stopped for a reason we can name (a non-finite loss at step N, a
    worker that kept dying): shown as one line, exit code 1. Its MLflow run is marked FAILED."""
