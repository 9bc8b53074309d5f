"""A corpus of bad inputs and faults: recipes, data files, labels, models and run folders, checkpoints, outputs.

Each case runs one command in-process (typer's runner) and asserts the exit code, exactly one ``error:`` line and
no traceback, and a file system unchanged apart from the intended outputs: the working folder (data, run folders,
outputs), the temp folder, the tokenization cache and the shared tiny run are snapshotted before and after.
Cases that need a trained model share one tiny run (copied when the case damages it) and one interrupted tiny
AdaLoRA run (for ``--resume``); nothing here trains longer than that.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, ROBERTA, TEST_CSV, TRAIN_CSV, ctrl_c_after, tiny_overrides
from newslora.cli import app

AG = ["World", "Sports", "Business", "Sci/Tech"]
runner = CliRunner()


# ----------------------------------------------------------------------------- the harness


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: (kind, size, mtime) so that a created, deleted or rewritten entry
    shows."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            out[str(p)] = ("dir", 0, 0) if p.is_dir() else ("file", st.st_size, st.st_mtime_ns)
    return out


@dataclass
class Env:
    work: Path  # the working folder: inputs, run copies, outputs
    tmp: Path  # tempfile's folder for the case
    cache: Path  # the tokenization cache for the case
    tiny_run: Path  # the shared finished tiny run (read only)
    merged: Path  # its export (read only)
    cut_run: Path  # an interrupted tiny AdaLoRA run with a checkpoint (read only)
    mp: pytest.MonkeyPatch | None = None  # for cases that inject a fault into the training loop

    def roots(self):
        return [self.work, self.tmp, self.cache, self.tiny_run, self.merged, self.cut_run]

    def copy_run(self, src: Path, name: str = "run") -> Path:
        dst = self.work / name
        shutil.copytree(src, dst)
        return dst


@dataclass
class Case:
    id: str
    setup: Callable[[Env], list]  # writes the case's inputs under env.work, returns the command line
    words: list[str]  # in the error line
    code: int = 2
    changes: list[str] = field(default_factory=list)  # paths under work that may change (intended outputs)
    check: Callable[[Env], None] | None = None  # extra assertions after the command


def run_case(case: Case, env: Env):
    args = [str(a) for a in case.setup(env)]
    before = snapshot(*env.roots())
    r = runner.invoke(app, args)
    after = snapshot(*env.roots())
    out = r.output
    assert "Traceback" not in out, out
    assert r.exit_code == case.code, (r.exit_code, out, r.exception)
    if not case.code:
        for w in case.words:
            assert w in out, (w, out)
    if case.code:
        assert isinstance(r.exception, SystemExit) or r.exception is None, repr(r.exception)
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, out
        for w in case.words:
            assert w in errors[0], (w, errors[0])
    allowed = {os.path.normpath(env.work / c) for c in case.changes}
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    unexpected = sorted(c for c in changed if not any(c == a or c.startswith(a + "/") for a in allowed))
    assert not unexpected, unexpected
    if case.check:
        case.check(env)
    return r


# ----------------------------------------------------------------------------- shared runs and data


def balanced(n_per_class: int = 30) -> pd.DataFrame:
    """Real AG News rows, every class (labels 0-3)."""
    df = pd.read_csv(TRAIN_CSV)
    return df.groupby("label").head(n_per_class).reset_index(drop=True)


def write_csv(path: Path, df: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def train_args(env: Env, source: Path | str, *extra: str, test: Path | str | None = None) -> list:
    return ["train", *tiny_overrides(**{"data.source": source, "data.test": test or "null",
                                        "data.validation_size": 16}), *extra, "--run-dir", env.work / "runs" / "x"]


@pytest.fixture(scope="module")
def shared(tiny_run, tmp_path_factory):
    from newslora.config import load_recipe
    from newslora.export import export
    from newslora.train import train

    root = tmp_path_factory.mktemp("corpus-shared")
    merged = export(tiny_run.run_dir, root / "merged")
    fast = {"method": "adalora", "train.max_steps": 8, "train.batch_size": 16, "train.eval_steps": 4,
            "data.max_train_samples": 96, "data.validation_size": 32, "data.max_test_samples": 16,
            "adalora.init_r": 6, "adalora.target_r": 2, "adalora.tinit": 1, "adalora.tfinal": 3, "adalora.deltaT": 1}
    cut = root / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(None, tiny_overrides(**fast)), run_dir=cut, extra_callbacks=[ctrl_c_after(6)])
    assert (cut / "checkpoints" / "checkpoint-4" / "adalora_state.pt").is_file()
    return tiny_run.run_dir, merged, cut


@pytest.fixture
def env(shared, tmp_path, monkeypatch):
    import newslora.data

    e = Env(tmp_path / "work", tmp_path / "tmp", tmp_path / "cache", *shared, mp=monkeypatch)
    for d in (e.work, e.tmp, e.cache):
        d.mkdir()
    monkeypatch.chdir(e.work)
    monkeypatch.setattr(tempfile, "tempdir", str(e.tmp))
    monkeypatch.setenv("TMPDIR", str(e.tmp))
    monkeypatch.setattr(newslora.data, "CACHE_ROOT", e.cache)
    return e


class Payload:
    """Unpickling this creates ``path``: proof that code from the file ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by a pickle that runs code (creates ``marker``) when loaded without
    ``weights_only``; for the AdaLoRA state, keep its real contents around the payload."""
    state = {}
    if path.name == "adalora_state.pt":
        state = torch.load(path, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, path)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ----------------------------------------------------------------------------- the cases


def _labels(env: Env, labels: list, name="d.csv", classes: list[str] | None = None, text_col="text",
            label_col="label") -> Path:
    df = balanced()
    extra = pd.DataFrame({"text": ["Odd one out: a row with a wrong label"] * len(labels), "label": labels})
    df = pd.concat([df.astype({"label": object}), extra], ignore_index=True)
    f = write_csv(env.work / "data" / name, df.rename(columns={"text": text_col, "label": label_col}))
    if classes:
        (f.parent / "classes.txt").write_text("\n".join(classes) + "\n")
    return f


def _kaggle(env: Env, shift: int = 1, extra_class: int | None = None) -> Path:
    df = balanced()
    k = pd.DataFrame({"Class Index": df["label"] + shift, "Title": df["text"].str[:30], "Description": df["text"]})
    if extra_class is not None:
        k.loc[len(k)] = [extra_class, "Odd", "One out"]
    return write_csv(env.work / "kaggle" / "train.csv", k)


def _long_texts(env: Env) -> Path:
    df = balanced(20)
    df.loc[df.index[:8], "text"] = ("word " * 700).strip()
    return write_csv(env.work / "data" / "long.csv", df)


def _header_only(env: Env) -> Path:
    f = env.work / "data" / "empty.csv"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("text,label\n")
    return f


def _texts(env: Env, name="in.csv") -> Path:
    return write_csv(env.work / name, pd.DataFrame({"text": ["Stocks fall on oil", "Team wins the cup"]}))


def _run_without(env: Env, *rel: str) -> Path:
    run = env.copy_run(env.tiny_run)
    for r in rel:
        p = run / r
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return run


def _run_truncated(env: Env, rel: str) -> Path:
    run = env.copy_run(env.tiny_run)
    truncate(run / rel)
    return run


def _merged_pickle(env: Env) -> Path:
    m = env.copy_run(env.merged, "merged")
    from safetensors.torch import load_file

    torch.save(load_file(str(m / "model.safetensors")), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    return m


def _cut_planted(env: Env, rel: str) -> Path:
    run = env.copy_run(env.cut_run)
    plant(run / "checkpoints" / "checkpoint-4" / rel, env.work / "PWNED")
    return run


def _cut_without_checkpoints(env: Env) -> Path:
    run = env.copy_run(env.cut_run)
    shutil.rmtree(run / "checkpoints")
    return run


def _cut_truncated(env: Env, rel: str) -> Path:
    run = env.copy_run(env.cut_run)
    truncate(run / "checkpoints" / "checkpoint-4" / rel)
    return run


def _sigterm_at_step_6(env: Env) -> list:
    """SIGTERM sent to this process at optimizer step 6 (after checkpoint-4), as ``kill <pid>`` would."""
    import newslora.train

    class SigtermAt6(newslora.train.ReadableProgress):
        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            if state.global_step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    env.mp.setattr(newslora.train, "ReadableProgress", SigtermAt6)
    return ["train", *tiny_overrides(**{"train.threads": 1}), "--run-dir", env.work / "runs" / "x"]


def _terminated(env: Env) -> None:
    info = json.loads((env.work / "runs" / "x" / "run.json").read_text())
    assert info["status"] == "terminated" and info["attempts"][-1]["steps"] == 6, info
    assert "SIGTERM" in info["error"] and (env.work / "runs" / "x" / "checkpoints" / "checkpoint-4").is_dir()
    assert "sigterm_raises" not in repr(signal.getsignal(signal.SIGTERM))  # the handler is restored after training


def _replaced_export(env: Env) -> None:
    m = env.work / "m"
    assert json.loads((m / "newslora.json").read_text())["max_length"] == 48 and (m / "model.safetensors").is_file()
    assert sorted(p.name for p in env.work.iterdir()) == ["m"]  # no temp or old folder left beside it


def _submission(path: Path, n: int) -> None:
    df = pd.read_csv(path)
    assert df.columns.tolist() == ["ID", "Label"] and df["ID"].tolist() == list(range(n))


def _no_marker(env: Env) -> None:
    assert not (env.work / "PWNED").exists()


def _file(env: Env, name: str, text: str = "keep me\n") -> Path:
    f = env.work / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    return f


def _foreign_folder(env: Env) -> Path:
    d = env.work / "mine"
    _file(env, "mine/thesis.tex", "\\documentclass{article}\n")
    _file(env, "mine/notes/todo.txt")
    return d


CASES = [
    # --- labels (item 1)
    Case("label-7-among-0-3", lambda e: train_args(e, _labels(e, [7])), ["label 7", "row 120", "no row has label 4"]),
    Case("label-7-classes-txt", lambda e: train_args(e, _labels(e, [7], classes=AG)),
         ["label 7", "row 120", "out of range 0..3", "classes.txt"]),
    Case("label-7-label-names", lambda e: train_args(e, _labels(e, [7]), "data.label_names=[World,Sports,Business,"
                                                                         "Sci/Tech]"),
         ["label 7", "row 120", "out of range 0..3", "data.label_names"]),
    Case("label-7-num-labels", lambda e: train_args(e, _labels(e, [7]), "data.num_labels=4"),
         ["label 7", "row 120", "out of range 0..3", "data.num_labels=4"]),
    Case("string-among-integers", lambda e: train_args(e, _labels(e, ["Sports"])),
         ["label 'Sports'", "row 120", "among integer labels"]),
    Case("integer-among-names", lambda e: train_args(e, write_csv(e.work / "d.csv", pd.DataFrame(
        {"text": [f"headline {i}" for i in range(41)], "label": ["sport", "tech"] * 20 + ["3"]}))),
        ["label '3'", "row 40", "among class names"]),
    Case("unknown-name", lambda e: train_args(e, write_csv(e.work / "d.csv", pd.DataFrame(
        {"text": [f"headline {i}" for i in range(41)], "label": ["World", "Sports"] * 20 + ["Sprots"]})),
        "data.label_names=[World,Sports]"), ["label 'Sprots'", "row 40", "data.label_names"]),
    Case("fractional-label", lambda e: train_args(e, _labels(e, [1.5])), ["label 1.5", "row 120", "integers"]),
    Case("negative-label", lambda e: train_args(e, _labels(e, [-1])), ["label -1", "row 120"]),
    Case("kaggle-class-5", lambda e: train_args(e, _kaggle(e, extra_class=5)),
         ["label 4", "row 120", "out of range 0..3", "AG News"]),
    Case("kaggle-class-0", lambda e: train_args(e, _kaggle(e, extra_class=0)), ["line 122", "1-based"]),
    Case("num-labels-disagrees", lambda e: train_args(e, _labels(e, [], classes=AG), "data.num_labels=5"),
         ["data.num_labels=5", "classes.txt", "4 classes"]),
    Case("num-labels-below-2", lambda e: train_args(e, _labels(e, []), "data.num_labels=1"),
         ["data.num_labels=1", "at least 2"]),
    Case("class-without-training-rows", lambda e: train_args(e, write_csv(e.work / "d.csv", balanced().query(
        "label < 3")), "data.label_names=[World,Sports,Business,Sci/Tech]"),
        ["no rows of class", "Sci/Tech"]),
    Case("test-label-outside-train-set", lambda e: train_args(
        e, _labels(e, [], classes=AG), test=write_csv(e.work / "t.csv", pd.DataFrame(
            {"text": ["a", "b", "c"], "label": [0, 1, 9]}))), ["(test)", "label 9", "row 2", "out of range 0..3"]),
    Case("evaluate-label-outside-model", lambda e: ["evaluate", e.tiny_run, "--data", _labels(e, [7])],
         ["label 7", "row 120", "out of range 0..3", "the model"]),
    Case("no-label", lambda e: train_args(e, _file(e, "d.csv", "text,label\nhello,1\nworld,\n")),
         ["no label", "row 1"]),
    # --- outputs (item 2)
    Case("export-into-foreign-folder", lambda e: ["export", e.tiny_run, "--output", _foreign_folder(e)],
         ["--output", "not a merged model", "choose a new or empty folder"]),
    Case("export-foreign-folder-even-with-overwrite",
         lambda e: ["export", e.tiny_run, "--output", _foreign_folder(e), "--overwrite"], ["not a merged model"]),
    Case("export-earlier-export-needs-overwrite",
         lambda e: ["export", e.tiny_run, "--output", e.copy_run(e.merged, "m")], ["--overwrite"]),
    Case("export-overwrite-replaces-earlier-export",
         lambda e: ["export", e.tiny_run, "--output", e.copy_run(e.merged, "m"), "--overwrite"], [], code=0,
         changes=["m"], check=lambda e: _replaced_export(e)),
    Case("export-output-is-a-file", lambda e: ["export", e.tiny_run, "--output", _file(e, "model.txt")],
         ["--output", "is a file"]),
    Case("export-output-under-a-file", lambda e: ["export", e.tiny_run, "--output", _file(e, "f") / "merged"],
         ["is a file, not a folder"]),
    Case("export-output-is-the-run", lambda e: ["export", e.copy_run(e.tiny_run), "--output", e.work / "run"],
         ["would replace"]),
    Case("predict-output-is-input", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o", e.work / "in.csv",
                                               "--overwrite"], ["is the input file"]),
    Case("predict-output-is-a-folder", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o", e.work],
         ["--output", "is a folder"]),
    Case("predict-output-exists", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o", _file(e, "sub.csv")],
         ["exists", "--overwrite"]),
    Case("predict-overwrite-replaces", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o",
                                                  _file(e, "sub.csv"), "--overwrite"], [], code=0,
         changes=["sub.csv"], check=lambda e: _submission(e.work / "sub.csv", 2)),
    Case("predict-new-folder-output", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o",
                                                 e.work / "out" / "deep" / "sub.csv"], [], code=0, changes=["out"]),
    Case("evaluate-output-is-data", lambda e: ["evaluate", e.tiny_run, "--data", write_csv(
        e.work / "d.csv", balanced(2)), "--output", e.work / "d.csv", "--overwrite"], ["is the input file"]),
    Case("evaluate-output-is-a-folder", lambda e: ["evaluate", e.tiny_run, "--data", write_csv(
        e.work / "d.csv", balanced(2)), "--output", e.work], ["--output", "is a folder"]),
    # --- checkpoints that could run code (item 3)
    Case("resume-payload-in-adalora-state", lambda e: ["train", "--resume", _cut_planted(e, "adalora_state.pt")],
         ["adalora_state.pt", "pickled objects beyond tensors"], check=_no_marker),
    Case("resume-payload-in-optimizer", lambda e: ["train", "--resume", _cut_planted(e, "optimizer.pt")],
         ["optimizer.pt", "pickled objects beyond tensors"], check=_no_marker),
    Case("resume-payload-in-rng-state", lambda e: ["train", "--resume", _cut_planted(e, "rng_state.pth")],
         ["rng_state.pth", "pickled objects beyond tensors"], check=_no_marker),
    Case("resume-truncated-trainer-state", lambda e: ["train", "--resume", _cut_truncated(e, "trainer_state.json")],
         ["trainer_state.json", "damaged"]),
    Case("resume-truncated-adapter", lambda e: ["train", "--resume",
                                                _cut_truncated(e, "adapter_model.safetensors")],
         ["adapter_model.safetensors", "damaged"]),
    Case("resume-truncated-optimizer", lambda e: ["train", "--resume", _cut_truncated(e, "optimizer.pt")],
         ["optimizer.pt", "damaged"]),
    Case("merged-pickle-checkpoint", lambda e: ["predict", _merged_pickle(e), "-i", _texts(e), "-o", "sub.csv"],
         ["pytorch_model.bin", "pickle", "safetensors"]),
    # --- tracebacks turned into one line (item 5)
    Case("predict-adapter-weights-missing", lambda e: ["predict", _run_without(e, "adapter/adapter_model.safetensors"),
                                                       "-i", _texts(e), "-o", "sub.csv"],
         ["no adapter weights", "adapter_model.safetensors"]),
    Case("evaluate-adapter-weights-truncated", lambda e: ["evaluate", _run_truncated(
        e, "adapter/adapter_model.safetensors"), "--data", write_csv(e.work / "d.csv", balanced(2))],
        ["cannot load the adapter", "damaged or truncated"]),
    Case("predict-run-json-missing", lambda e: ["predict", _run_without(e, "run.json"), "-i", _texts(e), "-o",
                                                "sub.csv"], ["run.json", "missing or damaged"]),
    Case("merged-weights-truncated", lambda e: ["evaluate", _run_truncated_merged(e), "--data",
                                                write_csv(e.work / "d.csv", balanced(2))],
         ["cannot load the model", "export it again"]),
    Case("train-header-only-file", lambda e: train_args(e, _header_only(e)), ["has no rows", "header only"]),
    Case("evaluate-header-only-file", lambda e: ["evaluate", e.tiny_run, "--data", _header_only(e)],
         ["has no rows"]),
    Case("train-empty-file", lambda e: train_args(e, _file(e, "d.csv", "")), ["could not be parsed"]),
    Case("run-dir-is-a-file", lambda e: train_args(e, TRAIN_CSV)[:-1] + [_file(e, "runfile")],
         ["--run-dir", "is a file"]),
    Case("run-dir-under-a-file", lambda e: train_args(e, TRAIN_CSV)[:-1] + [_file(e, "runfile") / "r"],
         ["--run-dir", "is a file, not a folder"]),
    Case("max-length-above-positions", lambda e: train_args(e, _long_texts(e), "model.max_length=600"),
         ["model.max_length=600", "512 positions", "model.max_length=512"]),
    Case("max-length-padding-offset", lambda e: train_args(e, _long_texts(e), "model.max_length=513"),
         ["model.max_length=513", "514 position embeddings", "padding offset"]),
    Case("evaluate-text-column-names-option", lambda e: ["evaluate", e.tiny_run, "--data", write_csv(
        e.work / "d.csv", balanced(2)), "--text-column", "body"], ["column 'body' not found", "--text-column"]),
    Case("evaluate-label-column-names-option", lambda e: ["evaluate", e.tiny_run, "--data", write_csv(
        e.work / "d.csv", balanced(2)), "--label-column", "y"], ["column 'y' not found", "--label-column"]),
    Case("predict-text-column-names-option", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o", "s.csv",
                                                        "--text-column", "body"], ["--text-column"]),
    # --- recipes, data, models and run folders beyond the list
    Case("config-missing", lambda e: ["train", "--config", e.work / "nope.yaml"], ["recipe not found"]),
    Case("config-not-yaml", lambda e: ["train", "--config", _file(e, "r.yaml", "model: [unclosed\n")],
         ["not valid YAML"]),
    Case("config-not-a-mapping", lambda e: ["train", "--config", _file(e, "r.yaml", "- a\n- b\n")],
         ["must hold a mapping"]),
    Case("override-not-key-value", lambda e: ["budget", "lora.r"], ["not key=value"]),
    Case("override-wrong-type", lambda e: ["budget", "lora.r=eight"], ["lora.r must be an integer"]),
    Case("resume-with-config", lambda e: ["train", "--resume", e.cut_run, "--config", _file(e, "r.yaml", "{}")],
         ["--resume takes the run folder's own recipe"]),
    Case("resume-not-a-run", lambda e: ["train", "--resume", e.work], ["not a run folder"]),
    Case("resume-without-checkpoint", lambda e: ["train", "--resume", _cut_without_checkpoints(e)],
         ["no checkpoint saved yet"]),
    Case("data-not-utf8", lambda e: train_args(e, _bytes(e, "d.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"))),
         ["not UTF-8"]),
    Case("data-folder-without-train-file", lambda e: train_args(e, _dir(e, "data")), ["no train.csv"]),
    Case("predict-not-a-model", lambda e: ["predict", _dir(e, "nothing"), "-i", _texts(e), "-o", "s.csv"],
         ["neither a newslora run folder"]),
    Case("predict-unfinished-run", lambda e: ["predict", _run_without(e, "adapter"), "-i", _texts(e), "-o", "s.csv"],
         ["did not finish", "--resume"]),
    Case("export-not-a-run", lambda e: ["export", _dir(e, "nothing")], ["not a finished run folder"]),
    Case("plot-not-a-run", lambda e: ["plot", _dir(e, "nothing")], ["not a run folder"]),
    Case("report-output-is-a-file", lambda e: ["report", e.tiny_run, "--output", _file(e, "report")],
         ["--output", "is a file"]),
    Case("report-output-under-a-file", lambda e: ["report", e.tiny_run, "--output", _file(e, "report") / "sub"],
         ["is a file, not a folder"]),
    Case("report-not-a-run", lambda e: ["report", _dir(e, "nothing"), "--output", e.work / "rep"], ["nothing"]),
    # --- signals and repeated runs (issue 16)
    Case("sigterm-mid-training", _sigterm_at_step_6, ["terminated (SIGTERM)", "--resume"], code=143,
         changes=["runs", "../cache"], check=_terminated),
    Case("resume-completed-run", lambda e: ["train", "--resume", e.tiny_run], ["already completed", "nothing changed"],
         code=0),
    Case("predict-pickle-untrusted", lambda e: ["predict", e.tiny_run, "-i", _bytes(e, "t.pkl", b"\x80\x04N."),
                                                "-o", "s.csv"], ["--trust-pickle"]),
    # --- data of one's own (issue 30)
    Case("headerless-not-ag-news", lambda e: train_args(e, _bytes(e, "d.csv", b"some text,1\nmore text,0\n")),
         ["no header line", "AG News", "data.text_column/data.label_column"]),
    Case("predict-headerless-id-text-label", lambda e: ["predict", e.tiny_run, "-i", _bytes(
        e, "in.csv", b"1,Stocks fall on oil,2\n2,Team wins the cup,1\n"), "-o", "s.csv"],
         ["no header line", "class 1-4", "--text-column/--label-column"]),
    Case("class-too-small-to-stratify", lambda e: train_args(e, _rare(e)),
         ["class 'Rare'", "only 1 training row", "data.validation"]),
    Case("text-columns-missing", lambda e: train_args(e, _texts(e, "d.csv"), "data.text_columns=[text,body]"),
         ["column 'body' not found", "data.text_column"]),
    Case("predict-unknown-extension", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o", e.work / "s.txt"],
         ["no writer for '.txt'", ".parquet"]),
    Case("predict-id-column-missing", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o", "s.csv",
                                                 "--id-column", "key"], ["column 'key' not found", "--id-column"]),
    Case("budget-head-over-budget", lambda e: ["budget", "-c", REPO / "configs" / "seed-004-lora-r6-qkv.yaml",
                                               f"model.backbone={ROBERTA}", f"data.source={_many_classes(e)}"],
         ["1,076,168", "head.type: lora", "smaller rank"], code=1),
]


def _tiny_with(**config) -> str:
    """``model.config_overrides=...``: the tiny model's config with ``config`` on top."""
    import yaml

    from conftest import TINY

    return "model.config_overrides=" + yaml.safe_dump({**TINY, **config}, default_flow_style=True, width=10_000).strip()


def _recipe(env: Env, text: str | bytes, name: str = "r.yaml") -> list:
    """``train --config <a recipe file>``: the file's recipe on top of nothing (the defaults)."""
    f = env.work / name
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["train", "--config", f, "--run-dir", env.work / "runs" / "x"]


ALIAS_BOMB = ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
              "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
              "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
              "model: {config_overrides: {x: [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]}}\n")


def _space(env: Env, text: str) -> Path:
    return _file(env, "space.yaml", text)


# recipes refused before anything is read or written (issue 29: non-finite numbers, seeds, plans, YAML)
RECIPE_CASES = [
    Case("nonfinite-lora-alpha", lambda e: train_args(e, TRAIN_CSV, "lora.alpha=nan"), ["lora.alpha=nan", "finite"]),
    Case("nonfinite-lr", lambda e: train_args(e, TRAIN_CSV, "train.lr=.inf"), ["train.lr=inf", "finite"]),
    Case("nonfinite-weight-decay", lambda e: train_args(e, TRAIN_CSV, "train.weight_decay=nan"),
         ["train.weight_decay=nan", "finite"]),
    Case("nonfinite-warmup", lambda e: train_args(e, TRAIN_CSV, "train.warmup=nan"), ["train.warmup=nan", "finite"]),
    Case("nonfinite-validation-size", lambda e: train_args(e, TRAIN_CSV, "data.validation_size=nan"),
         ["data.validation_size=nan", "finite"]),
    Case("nonfinite-epochs", lambda e: train_args(e, TRAIN_CSV, "train.epochs=.inf"), ["train.epochs=inf", "finite"]),
    Case("nonfinite-max-steps", lambda e: train_args(e, TRAIN_CSV, "train.max_steps=.nan"),
         ["train.max_steps", "integer"]),
    Case("nonfinite-label-smoothing", lambda e: train_args(e, TRAIN_CSV, "train.label_smoothing=-.inf"),
         ["train.label_smoothing=-inf", "finite"]),
    Case("nonfinite-distill-temperature", lambda e: ["distill", "--teacher", e.tiny_run, *tiny_overrides(),
                                                     "distill.temperature=nan"], ["distill.temperature=nan", "finite"]),
    Case("nonfinite-in-config-overrides", lambda e: train_args(e, TRAIN_CSV, _tiny_with(layer_norm_eps=float("nan"))),
         ["model.config_overrides.layer_norm_eps=nan", "finite"]),
    Case("nonfinite-in-recipe-file", lambda e: _recipe(e, "lora:\n  dropout: .NaN\n"), ["lora.dropout=nan", "finite"]),
    Case("nonfinite-budget-command", lambda e: ["budget", "vera.d_initial=.inf"], ["vera.d_initial=inf", "finite"]),
    Case("nonfinite-baseline-command", lambda e: ["baseline", "train.lr=nan"], ["train.lr=nan", "finite"]),
    Case("nonfinite-search-bound", lambda e: ["search", *tiny_overrides(), "--space", _space(
        e, "params:\n  train.lr: {type: loguniform, low: .nan, high: 1.0e-2}\n"), "--output", e.work / "study"],
        ["train.lr: low=nan", "finite"]),
    Case("nonfinite-search-base-recipe", lambda e: ["search", "lora.alpha=.inf", "--space", _space(
        e, "params:\n  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"), "--output", e.work / "study"],
        ["lora.alpha=inf", "finite"]),
    Case("negative-train-seed", lambda e: train_args(e, TRAIN_CSV, "train.seed=-1"),
         ["train.seed=-1", "[0, 4294967295]"]),
    Case("negative-data-seed", lambda e: train_args(e, TRAIN_CSV, "data.seed=-7"), ["data.seed=-7"]),
    Case("seed-beyond-32-bits", lambda e: train_args(e, TRAIN_CSV, "train.seed=4294967296"),
         ["train.seed=4294967296", "4294967295"]),
    Case("plan-over-ten-million-steps", lambda e: train_args(e, TRAIN_CSV, "train.epochs=1e9"),
         ["train.epochs=1e+09", "optimizer steps", "per epoch", "10,000,000", "train.max_steps"]),
    Case("max-steps-over-ten-million", lambda e: train_args(e, TRAIN_CSV, "train.max_steps=20000000"),
         ["train.max_steps=20000000", "<= 10000000"]),
    Case("recipe-duplicate-key", lambda e: _recipe(e, "name: a\ntrain:\n  lr: 1.0e-3\n  lr: 1.0e-4\n"),
         ["duplicate key 'lr'", "line 4", "first at line 3"]),
    Case("recipe-duplicate-section", lambda e: _recipe(e, "lora: {r: 4}\ntrain: {lr: 1.0e-3}\nlora: {r: 8}\n"),
         ["duplicate key 'lora'", "line 3", "first at line 1"]),
    Case("override-duplicate-key", lambda e: train_args(e, TRAIN_CSV, "model.config_overrides={a: 1, a: 2}"),
         ["duplicate key 'a'"]),
    Case("recipe-tab-indent", lambda e: _recipe(e, "lora:\n\tr: 4\n"), ["not valid YAML", "line 2", "tabs"]),
    Case("recipe-unclosed-bracket-line", lambda e: _recipe(e, "name: a\nlora:\n  target_modules: [query, value\n"),
         ["not valid YAML", "line"]),
    Case("recipe-not-utf8", lambda e: _recipe(e, "name: caf\xe9\n".encode("latin-1")),
         ["not UTF-8", "save it as UTF-8"]),
    Case("recipe-alias-bomb", lambda e: _recipe(e, ALIAS_BOMB), ["aliases", "100,000"]),
    Case("recipe-unknown-key-suggests", lambda e: _recipe(e, "train:\n  learning_rate: 1.0e-3\n"),
         ["train.learning_rate", "valid keys here"]),
    Case("recipe-section-not-a-mapping", lambda e: _recipe(e, "lora: [1, 2]\n"), ["lora must be a mapping"]),
    Case("recipe-unknown-method", lambda e: _recipe(e, "method: lorax\n"), ["method='lorax'", "choose one of"]),
    Case("recipe-bool-for-a-name", lambda e: _recipe(e, "data:\n  label_names: [no, yes]\n"),
         ["data.label_names[0]", "quote it"]),
    Case("scheduler-choices", lambda e: train_args(e, TRAIN_CSV, "train.scheduler=foo"),
         ["train.scheduler='foo'", "choose one of: linear, cosine"]),
    Case("report-to-choices", lambda e: train_args(e, TRAIN_CSV, "train.report_to=wandb"),
         ["train.report_to[0]='wandb'", "tensorboard, mlflow"]),
    Case("distill-alpha-range", lambda e: train_args(e, TRAIN_CSV, "distill.alpha=2"), ["distill.alpha=2", "[0, 1]"]),
    Case("config-overrides-zero-heads", lambda e: train_args(e, TRAIN_CSV, _tiny_with(num_attention_heads=0)),
         ["model.config_overrides", "do not build a roberta model", "ZeroDivisionError"]),
    Case("config-overrides-heads-not-dividing", lambda e: train_args(e, TRAIN_CSV, _tiny_with(hidden_size=7)),
         ["model.config_overrides", "do not build a roberta model", "not a multiple"]),
    Case("config-overrides-unknown-activation", lambda e: train_args(e, TRAIN_CSV, _tiny_with(hidden_act="nope")),
         ["model.config_overrides", "do not build a roberta model", "nope"]),
    Case("config-overrides-wrong-kind", lambda e: train_args(e, TRAIN_CSV, _tiny_with(vocab_size="x")),
         ["model.config_overrides.vocab_size='x'", "refused by the roberta config"]),
    Case("deprecated-key-still-works", lambda e: ["budget", *tiny_overrides(method="loraplus"),
                                                  "lora.loraplus_lr_ratio=4"],
         ["deprecated: lora.loraplus_lr_ratio -> use loraplus.ratio"], code=0),
]
CASES += RECIPE_CASES


def _rare(env: Env) -> Path:
    """The AG News rows by class name, plus one row of a fifth class, 'Rare'."""
    df = balanced().assign(label=lambda d: d["label"].map(dict(enumerate(AG))))
    return write_csv(env.work / "data" / "few.csv",
                     pd.concat([df, pd.DataFrame({"text": ["a rare one"], "label": ["Rare"]})]))


def _many_classes(env: Env) -> Path:
    return write_csv(env.work / "many.csv", pd.DataFrame({"text": [f"row {i}" for i in range(400)],
                                                          "label": [i % 200 for i in range(400)]}))


def _run_truncated_merged(env: Env) -> Path:
    m = env.copy_run(env.merged, "merged")
    truncate(m / "model.safetensors")
    return m


def _bytes(env: Env, name: str, data: bytes) -> Path:
    f = env.work / name
    f.write_bytes(data)
    return f


def _dir(env: Env, name: str) -> Path:
    d = env.work / name
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------- reliability (issue 29)

_held_sockets: list = []  # listening sockets that keep a port busy for a case


def _nan_weights(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata={"format": "pt"})


def _nan_run(env: Env) -> Path:
    run = env.copy_run(env.tiny_run)
    _nan_weights(run / "adapter" / "adapter_model.safetensors")
    return run


def _nan_merged(env: Env) -> Path:
    m = env.copy_run(env.merged, "merged")
    _nan_weights(m / "model.safetensors")
    return m


def _busy_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _held_sockets.append(s)
    return s.getsockname()[1]


def _release_ports() -> None:
    while _held_sockets:
        _held_sockets.pop().close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _disk_full(env: Env, *cmd) -> list:
    """The command with every rename that would publish a file or folder failing as on a full disk (ENOSPC)."""
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]))

    env.mp.setattr(os, "replace", full)
    env.mp.setattr(os, "rename", full)
    return list(cmd)


def _cut_foreign_checkpoint(env: Env) -> Path:
    run = _cut_without_checkpoints(env)
    (run / "checkpoints" / "checkpoint-final").mkdir(parents=True)
    return run


def _merged_meta(env: Env, meta: dict) -> Path:
    m = env.copy_run(env.merged, "merged")
    (m / "newslora.json").write_text(json.dumps({**json.loads((m / "newslora.json").read_text()), **meta}))
    return m


def _merged_dangling(env: Env) -> Path:
    m = env.copy_run(env.merged, "merged")
    (m / "model.safetensors").unlink()
    (m / "model.safetensors").symlink_to(env.work / "gone.safetensors")
    return m


def _run_info(env: Env, **changes) -> Path:
    run = env.copy_run(env.tiny_run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, **changes}))
    return run


def _typed(env: Env, name: str, text=lambda t: t, label=lambda v: v) -> Path:
    """Real rows in a typed file, with texts or labels of another kind."""
    df = balanced(10)
    df = pd.DataFrame({"text": [text(t) for t in df["text"]], "label": [label(int(v)) for v in df["label"]]})
    f = env.work / name
    df.to_parquet(f) if name.endswith(".parquet") else df.to_json(f, orient="records", lines=True)
    return f


READ_ONLY = Path("/sys/newslora-out")  # sysfs: no new files or folders, even for root

CASES += [
    Case("export-non-finite-weights", lambda e: ["export", _nan_run(e), "--output", e.work / "m"],
         ["not finite", "NaN", "lower train.lr"]),
    Case("predict-non-finite-weights", lambda e: ["predict", _nan_merged(e), "-i", _texts(e), "-o", "s.csv"],
         ["not finite", "lower train.lr"]),
    Case("serve-non-finite-weights", lambda e: ["serve", _nan_merged(e), "--port", _free_port()], ["not finite"]),
    Case("predict-batch-size-negative", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o", "s.csv",
                                                   "--batch-size", "-1"], ["--batch-size -1", "at least 1"]),
    Case("predict-batch-size-zero", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o", "s.csv",
                                               "--batch-size", "0"], ["--batch-size 0", "at least 1"]),
    Case("distill-with-class-weights", lambda e: ["train", *tiny_overrides(**{"train.class_weights": "balanced",
                                                   "distill.teachers": "[x]"})], ["class_weights does not combine"]),
    Case("predict-id-column-on-txt", lambda e: ["predict", e.tiny_run, "-i", _file(e, "in.txt", "one\ntwo\n"),
                                                "--id-column", "id", "-o", "s.csv"], ["--id-column id", "no ID column"]),
    Case("serve-batch-wait-inf", lambda e: ["serve", e.merged, "--batch-wait-ms", "inf", "--port", _free_port()],
         ["batch-wait-ms must be a finite number", "inf"]),
    Case("serve-port-out-of-range", lambda e: ["serve", e.merged, "--port", "70000"], ["--port 70000", "0..65535"]),
    Case("serve-port-busy", lambda e: ["serve", _dir(e, "no-model-needed"), "--port", _busy_port()],
         ["cannot listen on 127.0.0.1", "in use", "another --port"], check=lambda e: _release_ports()),
    Case("brackets-in-messages-are-kept", lambda e: ["budget", "lora.target_modules=[]"],
         ["e.g. ['query', 'value']"]),
    Case("brackets-in-a-path-are-kept", lambda e: train_args(e, e.work / "a[/x].csv"), ["a[/x].csv"]),
    Case("predict-read-only-output", lambda e: ["predict", e.tiny_run, "-i", _texts(e), "-o", READ_ONLY / "s.csv"],
         ["/sys/newslora-out"]),
    Case("evaluate-read-only-output", lambda e: ["evaluate", e.tiny_run, "--data", write_csv(
        e.work / "d.csv", balanced(2)), "--output", READ_ONLY / "m.json"], ["/sys/newslora-out"]),
    Case("export-read-only-output", lambda e: ["export", e.tiny_run, "--output", READ_ONLY / "merged"],
         ["/sys/newslora-out"]),
    Case("report-read-only-output", lambda e: ["report", e.tiny_run, "--output", READ_ONLY / "rep"],
         ["/sys/newslora-out"]),
    Case("train-read-only-run-dir", lambda e: train_args(e, TRAIN_CSV)[:-1] + [READ_ONLY / "r"],
         ["/sys/newslora-out"]),
    Case("baseline-read-only-output", lambda e: ["baseline", *tiny_overrides(), "--output", READ_ONLY / "b.json"],
         ["/sys/newslora-out"]),
    Case("predict-disk-full", lambda e: _disk_full(e, "predict", e.tiny_run, "-i", _texts(e), "-o", "s.csv"),
         ["No space left on device", "free some space"]),
    Case("evaluate-disk-full", lambda e: _disk_full(e, "evaluate", e.tiny_run, "--data", write_csv(
        e.work / "d.csv", balanced(2)), "--output", "m.json"), ["No space left on device"]),
    Case("export-disk-full", lambda e: _disk_full(e, "export", e.tiny_run, "--output", e.work / "m"),
         ["No space left on device"]),
    Case("baseline-disk-full", lambda e: _disk_full(e, "baseline", *tiny_overrides(), "--output", "b.json"),
         ["No space left on device"]),
    Case("report-disk-full", lambda e: _disk_full(e, "report", e.tiny_run, "--output", e.work / "rep"),
         ["No space left on device"], changes=["rep"]),
    Case("resume-only-a-foreign-checkpoint-folder", lambda e: ["train", "--resume", _cut_foreign_checkpoint(e)],
         ["no checkpoint saved yet"]),
    Case("predict-bad-max-length", lambda e: ["predict", _merged_meta(e, {"max_length": "long"}), "-i", _texts(e),
                                              "-o", "s.csv"], ["max_length 'long'", "positive whole number"]),
    Case("predict-negative-max-length", lambda e: ["predict", _merged_meta(e, {"max_length": -5}), "-i", _texts(e),
                                                   "-o", "s.csv"], ["max_length -5", "positive whole number"]),
    Case("distill-teacher-dangling-weights-link", lambda e: ["distill", "--teacher", _merged_dangling(e)],
         ["model.safetensors cannot be read", "link to a missing file"]),
    Case("search-storage-is-a-text-file", lambda e: ["search", *tiny_overrides(), "--space", Path(
        __file__).parents[1] / "configs" / "search-space.yaml", "--storage", f"sqlite:///{_file(e, 'notes.txt')}",
        "--output", e.work / "study"], ["cannot open study storage", "not a database"]),
    Case("predict-wrong-label-names", lambda e: ["predict", _run_info(e, label_names=["a", "b", "c"]), "-i",
                                                 _texts(e), "-o", "s.csv"], ["label_names", "3 classes"]),
    Case("predict-future-schema", lambda e: ["predict", _run_info(e, schema=99), "-i", _texts(e), "-o", "s.csv"],
         ["schema 99", "upgrade newslora"]),
    Case("parquet-list-text", lambda e: train_args(e, _typed(e, "d.parquet", text=lambda t: [t])),
         ["column 'text' holds a list", "must be a string"]),
    Case("parquet-struct-text", lambda e: train_args(e, _typed(e, "d.parquet", text=lambda t: {"title": t})),
         ["column 'text' holds a record", "must be a string"]),
    Case("parquet-list-labels", lambda e: train_args(e, _typed(e, "d.parquet", label=lambda v: [v])),
         ["column 'label' holds a list", "integer or a class name"]),
    Case("jsonl-boolean-label", lambda e: train_args(e, _typed(e, "d.jsonl", label=lambda v: v == 1)),
         ["column 'label' holds a boolean", "row 0"]),
    Case("predict-parquet-list-text", lambda e: ["predict", e.tiny_run, "-i", _typed(e, "in.parquet", text=lambda t: [t]),
                                                 "-o", "s.csv"], ["column 'text' holds a list", "must be a string"]),
    Case("predict-jsonl-record-text", lambda e: ["predict", e.tiny_run, "-i", _typed(e, "in.jsonl",
                                                 text=lambda t: {"title": t}), "-o", "s.csv"],
         ["column 'text' holds a record", "must be a string"]),
    Case("train-disk-full", lambda e: _disk_full(e, *train_args(e, TRAIN_CSV)), ["No space left on device"],
         changes=["runs", "../cache"]),
]


def test_corpus_is_large_enough():
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus(case, env):
    run_case(case, env)


# ----------------------------------------------------------------------------- what the corpus cannot show


def test_kaggle_header_is_read_like_the_classic_form(tmp_path):
    """The Kaggle copy of AG News (header ``Class Index,Title,Description``, classes 1-4) reads as title +
    description with labels 0-3 and the AG News names; pointed at one of its columns, labels still shift."""
    from newslora.config import DataConfig
    from newslora.data import load_splits
    from newslora.readers import read_table

    df = balanced()
    f = write_csv(tmp_path / "train.csv", pd.DataFrame({"Class Index": df["label"] + 1, "Title": "T",
                                                        "Description": df["text"]}))
    got = read_table(f)
    assert got["label"].tolist() == df["label"].tolist()
    assert got["text"].tolist() == ("T " + df["text"].str.strip()).tolist()
    s = load_splits(DataConfig(source=str(f), validation_size=8))
    assert s.label_names == AG and sorted(pd.concat([s.train, s.validation])["label"].unique()) == [0, 1, 2, 3]
    s = load_splits(DataConfig(source=str(f), validation_size=8, text_column="Description",
                               label_column="Class Index"))
    assert s.label_names == AG and set(s.train["text"]) <= set(df["text"].str.strip())


def test_classic_ag_news_still_reads(tmp_path):
    from newslora.readers import read_table

    df = read_table(TEST_CSV)
    assert len(df) == 7600 and sorted(df["label"].unique()) == [0, 1, 2, 3]
