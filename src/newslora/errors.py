"""The one exception type users see: a single line naming the problem and the fix."""


class NewsloraError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during training, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs; its message
    names the run folder and how to continue it."""
