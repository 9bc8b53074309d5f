"""newslora.outputs: files written through a temp file keep a new file's usual mode and never outlive a failure."""
import os
import stat

import pytest

from newslora.outputs import make_parents, remove_created, write_file_atomic


def test_an_atomic_write_has_the_mode_of_a_plain_write_and_leaves_no_temp_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    out = write_file_atomic(tmp_path / "sub" / "trials.csv", lambda tmp: tmp.write_text("a,b\n1,2\n"))
    assert out.read_text() == "a,b\n1,2\n"
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)  # not mkstemp's 0600
    assert sorted(p.name for p in out.parent.iterdir()) == ["trials.csv"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_new_folder(tmp_path):
    old = tmp_path / "best.yaml"
    old.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file_atomic(old, fail)
    with pytest.raises(RuntimeError):
        write_file_atomic(tmp_path / "new" / "deeper" / "x.csv", fail)
    assert old.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml"]


def test_parents_are_listed_as_each_is_made_so_a_failure_midway_removes_them(tmp_path, monkeypatch):
    """A signal or error between two folders: the list already names the ones made, and removing them leaves
    nothing."""
    from pathlib import Path

    made, mkdir = [], Path.mkdir

    def second_fails(self, *a, **k):
        if made:
            raise KeyboardInterrupt
        mkdir(self, *a, **k)
        made.append(self)

    created: list = []
    monkeypatch.setattr(Path, "mkdir", second_fails)
    with pytest.raises(KeyboardInterrupt):
        make_parents(tmp_path / "a" / "b" / "c.csv", created)
    monkeypatch.undo()
    assert created == [tmp_path / "a"] and (tmp_path / "a").is_dir()
    remove_created(created)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc, line, typed", [
    (ValueError(), "ValueError", "ValueError"),
    (OSError("\n  \ncannot open x\nmore"), "cannot open x", "OSError: cannot open x"),
    (KeyError("k"), "'k'", "KeyError: 'k'"),
])
def test_the_error_line_of_any_exception(exc, line, typed):
    """One helper quotes a library's exception in an ``error:`` line, safe on an empty or blank message."""
    from newslora.errors import first_line

    assert first_line(exc) == line and first_line(exc, with_type=True) == typed
