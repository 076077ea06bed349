"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A bad config, a missing file, an unsupported model: shown as one line, exit code 2.

    The message must name the thing (a dotted config key, a path, a tensor) and the fix.
    """
