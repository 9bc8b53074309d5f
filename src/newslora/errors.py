"""The one exception type users see: a single line naming the problem and the fix."""


class NewsloraError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with code 2."""
