"""One process trains a run folder at a time: an exclusive ``flock`` on the folder itself (no file is created in
it). The kernel drops the lock when the process ends, however it ends, so a killed run never leaves a stale lock."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import NewsloraError

_held: dict[str, int] = {}  # resolved folder -> the open descriptor that holds its lock


def lock_run_folder(path: str | os.PathLike, what: str) -> None:
    """Take the run folder's lock for this process, or refuse with one line when another process holds it.
    ``what``: how the user named the folder, e.g. ``--resume runs/demo``. Taking a lock already held here is a
    no-op."""
    key = str(Path(path).resolve())
    if key in _held:
        return
    fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise NewsloraError(f"{what}: another process is training this run folder now; wait for it to finish "
                            "(or stop it), then run the command again") from None
    _held[key] = fd


def unlock_run_folder(path: str | os.PathLike) -> None:
    fd = _held.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock
