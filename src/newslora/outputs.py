"""Output paths the commands write: checked before any work (never replace an input, a folder or an existing file
without ``--overwrite``), written through a temp file in the same folder that never outlives a failure."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import NewsloraError

UMASK = os.umask(0o022)  # the process's umask, read once (reading it sets it), for temp files made owner-only
os.umask(UMASK)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def file_ancestor(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a folder (a file where a folder must go)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_file(path: str | Path, inputs=(), overwrite: bool = False, option: str = "--output") -> Path:
    """Refuse an output file that is a folder, sits under a file, is one of ``inputs``, or exists (unless
    ``overwrite``)."""
    path = Path(path)
    if path.is_dir():
        raise NewsloraError(f"{option} {path} is a folder; give a file name, e.g. {option} {path / 'out.csv'}")
    blocker = file_ancestor(path)
    if blocker is not None:
        raise NewsloraError(f"{option} {path}: {blocker} is a file, not a folder; choose another {option}")
    for i in inputs:
        if _same(path, Path(i)):
            raise NewsloraError(f"{option} {path} is the input file {i}; write to another file")
    if path.exists() and not overwrite:
        raise NewsloraError(f"{option} {path} exists; pass --overwrite to replace it, or choose another {option}")
    return path


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temp file next to ``path``, then rename it over ``path``; the temp file is removed on
    any failure (and the folders this call created)."""
    path = Path(path)
    created: list[Path] = []
    tmp = temp_name(path)  # named first: the cleanup below always knows it
    try:
        make_parents(path, created)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:  # another writer's temp file of the same random name: not this call's to remove
            tmp = None
            raise
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # created owner-only; the result gets a new file's usual mode
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):  # e.g. never created: a file where a parent folder must go
                tmp.unlink()
        remove_created(created)
        raise
    return path


TEMP_TOKEN_BYTES = 4  # temp names are ``.<name>.<8 hex digits>.tmp``


def temp_name(target: Path) -> Path:
    """A random temp path next to ``target``: ``.<name>.<8 hex digits>.tmp``."""
    return target.parent / f".{target.name}.{secrets.token_hex(TEMP_TOKEN_BYTES)}.tmp"


def temp_pattern(target: Path) -> re.Pattern:
    """Matches exactly the names :func:`temp_name` gives ``target``'s temp paths (not a sibling's: ``model.int8``)."""
    return re.compile(re.escape(f".{target.name}.") + f"[0-9a-f]{{{2 * TEMP_TOKEN_BYTES}}}" + r"\.tmp")


def make_parents(path: Path, created: list[Path]) -> None:
    """Create ``path``'s missing parent folders, outermost first. Each is added to ``created`` before it is made, so a
    signal at any moment leaves the list naming every folder this call made, for :func:`remove_created` (which skips
    one listed but not yet made)."""
    for p in [p for p in reversed(path.parents) if not p.exists()]:
        created.append(p)
        try:
            p.mkdir()
        except OSError:  # made meanwhile by another process (then fine), or a file in the way: not ours to remove
            created.pop()
            if not p.is_dir():
                raise


def remove_created(folders: list[Path]) -> None:
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            pass


def check_folder_place(path: str | Path, what: str, option: str = "--output") -> Path:
    """Refuse a folder path that is a file, or lies under one (a file where a folder must go)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NewsloraError(f"{option} {path} is a file; give a folder for the {what}")
    blocker = file_ancestor(path)
    if blocker is not None:
        raise NewsloraError(f"{option} {path}: {blocker} is a file, not a folder; choose another {option}")
    return path


def check_output_folder(path: str | Path, owned: Callable[[Path], bool], what: str, overwrite: bool = False,
                        option: str = "--output", protect=()) -> Path:
    """Refuse an output folder that is a file, a non-empty folder that ``owned`` does not recognise as this
    command's earlier output (never replaced, even with ``overwrite``), an earlier output without ``overwrite``,
    or a folder holding one of ``protect`` (e.g. the run folder being exported)."""
    path = check_folder_place(path, what, option)
    for p in protect:
        p = Path(p).resolve()
        if path.resolve() == p or path.resolve() in p.parents:
            raise NewsloraError(f"{option} {path} would replace {p}; choose a new folder")
    if path.is_dir() and any(path.iterdir()):
        if not owned(path):
            raise NewsloraError(f"{option} {path} is a non-empty folder that is not a {what}; newslora will not "
                                f"replace it: choose a new or empty folder")
        if not overwrite:
            raise NewsloraError(f"{option} {path} already holds a {what}; pass --overwrite to replace it")
    return path


def temp_folder_for(target: Path) -> Path:
    """A fresh, not yet created path next to ``target`` (``.<name>.<random>.tmp``) to build it in. Temp folders of an
    earlier build of ``target`` that was killed (SIGKILL, power loss) are removed first: nothing else writes folders
    of that name."""
    ours = temp_pattern(target)
    if target.parent.is_dir():
        for stale in target.parent.iterdir():
            if ours.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
    while True:
        tmp = temp_name(target)
        if not tmp.exists():
            return tmp


@contextlib.contextmanager
def build_folder(target: Path) -> Iterator[Path]:
    """Build the folder ``target`` in a temp folder next to it (mode 755 whatever the umask: an exported model is
    not private), so relative paths written into it stay right after the rename. The body writes into the folder
    this yields; once the body ends without error it replaces ``target`` (:func:`replace_folder`). On any error or
    signal the temp folder and the parent folders made for it are removed -- each is listed before it is made --
    but not a folder of the chosen random name that appeared before this call made it. Earlier temp folders of
    ``target`` are swept first (:func:`temp_folder_for`): one build of a target runs at a time."""
    created: list[Path] = []
    tmp = temp_folder_for(target)
    ours = False
    try:
        make_parents(target, created)
        ours = True
        try:
            tmp.mkdir()
        except FileExistsError:
            ours = False
            raise
        tmp.chmod(0o755)
        yield tmp
        replace_folder(tmp, target)
    except BaseException:
        if ours:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise


def replace_folder(tmp: Path, target: Path) -> Path:
    """Move the finished folder ``tmp`` to ``target``, replacing what is there (checked by
    :func:`check_output_folder`) only once the new one is complete."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def write_json(path: str | os.PathLike, obj) -> Path:
    """JSON through a temp file and a rename (:func:`write_file_atomic`): a reader never sees half a file."""
    text = json.dumps(obj, indent=2, default=str)
    return write_file_atomic(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON mapping, or {} when the file is missing, damaged or not a mapping (interrupted runs)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
