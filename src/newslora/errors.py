"""The one exception type users see: a single line naming the problem and the fix; SIGTERM turned into an exception
so that the cleanup of an interrupted command runs."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class NewsloraError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during training or prediction, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs;
    its message says what was left (the run folder and how to continue it; the output not written)."""


@contextmanager
def sigterm_raises(message: str):
    """Inside the block SIGTERM raises :class:`Terminated` (handled like Ctrl-C) instead of killing the process
    half-way (a run folder still saying ``running``, a temp file left behind); the previous handler is restored
    after it. Signal handlers can only be set from the main thread: elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(message)

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def first_line(e: BaseException, limit: int | None = 300, with_type: bool = False) -> str:
    """The first non-empty line of an exception's message (at most ``limit`` characters), or its type's name when
    the message is empty: what a one-line ``error:`` quotes from a library's exception. ``with_type``:
    ``Type: line``, as run.json and a search trial record a failure."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:limit]
    if not line:
        return type(e).__name__
    return f"{type(e).__name__}: {line}" if with_type else line
