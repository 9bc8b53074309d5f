"""newslora.outputs: files written through a temp file keep a new file's usual mode and never outlive a failure."""
import os
import stat

import pytest

from newslora.outputs import build_folder, make_parents, remove_created, temp_folder_for, write_file_atomic


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


def test_parents_made_before_a_signal_are_all_removed(tmp_path, monkeypatch):
    """A signal handled right after a folder is made (still inside mkdir) or before the next one: every folder this
    call made is on the list, and removing them leaves nothing."""
    from pathlib import Path

    calls, mkdir = [], Path.mkdir

    def signal_after_the_second(self, *a, **k):
        mkdir(self, *a, **k)
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt

    created: list = []
    monkeypatch.setattr(Path, "mkdir", signal_after_the_second)
    with pytest.raises(KeyboardInterrupt):
        make_parents(tmp_path / "a" / "b" / "c" / "d.csv", created)
    monkeypatch.undo()
    assert (tmp_path / "a" / "b").is_dir() and created[:2] == [tmp_path / "a", tmp_path / "a" / "b"]
    remove_created(created)
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_parent_folder_must_go_is_the_error_and_nothing_is_left(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError) as e:
        write_file_atomic(tmp_path / "afile" / "sub" / "x.csv", lambda tmp: tmp.write_text("y"))
    assert ".tmp" not in str(e.value) and e.value.__context__ is None  # the mkdir's error, not the cleanup's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "x"


def test_the_stale_temp_sweep_takes_only_the_targets_own_temp_folders(tmp_path):
    """A killed export's temp folder for this target goes (even with glob characters in the name); a sibling
    target's (``run[1].int8``) and other files stay; the new temp path is not created."""
    for name in (".run[1].0badc0de.tmp", ".run[1].int8.0badc0de.tmp", ".run[1].notours.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / ".run[1].12345678.tmp.keep").write_text("x")
    tmp = temp_folder_for(tmp_path / "run[1]")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run[1].12345678.tmp.keep", ".run[1].int8.0badc0de.tmp",
                                                          ".run[1].notours.tmp"]
    assert tmp.parent == tmp_path and tmp.name.startswith(".run[1].") and not tmp.exists()


def test_a_built_folder_replaces_the_old_one_only_when_complete(tmp_path):
    """The body writes into a temp folder next to the target; a failing body leaves the old folder as it was and no
    temp or parent folder behind; a finished body's folder takes the target's place, mode 755 under any umask."""
    old = tmp_path / "model"
    old.mkdir()
    (old / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with build_folder(old) as tmp:
            assert tmp.parent == tmp_path and tmp.is_dir()
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        with build_folder(tmp_path / "new" / "deeper" / "model") as tmp:
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (old / "weights").read_text() == "old"

    umask = os.umask(0o077)
    try:
        with build_folder(old) as tmp:
            (tmp / "weights").write_text("new")
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (old / "weights").read_text() == "new"
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o755


def test_a_temp_folder_name_another_writer_took_first_is_left_to_it(tmp_path, monkeypatch):
    """Between choosing a free random name and making the folder, another writer may make one of that name: the
    build fails, and the other writer's folder and files stay."""
    import newslora.outputs as outputs

    theirs = tmp_path / ".model.0badc0de.tmp"

    def taken_meanwhile(target):
        theirs.mkdir()
        (theirs / "weights").write_text("theirs")
        return theirs

    monkeypatch.setattr(outputs, "temp_folder_for", taken_meanwhile)
    with pytest.raises(FileExistsError):
        with build_folder(tmp_path / "model"):
            pytest.fail("the body must not run in another writer's folder")
    assert (theirs / "weights").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == [theirs.name]


@pytest.mark.parametrize("exc, line, typed", [
    (ValueError(), "ValueError", "ValueError"),
    (OSError("\n  \ncannot open x\nmore"), "cannot open x", "OSError: cannot open x"),
    (KeyError("k"), "'k'", "KeyError: 'k'"),
])
def test_the_error_line_of_any_exception(exc, line, typed):
    """One helper quotes a library's exception in an ``error:`` line, safe on an empty or blank message."""
    from newslora.errors import first_line

    assert first_line(exc) == line and first_line(exc, with_type=True) == typed
