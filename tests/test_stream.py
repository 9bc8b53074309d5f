"""Streaming prediction: ``newslora predict`` reads, classifies and writes chunk by chunk into a temp file that
replaces the output only at the end. A multi-chunk run writes exactly what a one-chunk run writes, in every input
format; a failure half-way (a malformed row, a missing text, Ctrl-C, SIGTERM) leaves neither output nor temp file.
Runs on the tiny random-init classifier folder (no training)."""
from __future__ import annotations

import csv
import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import TEST_CSV
from newslora.cli import app
from newslora.readers import iter_texts, read_table
from newslora.errors import NewsloraError, Terminated
from newslora.predict import Classifier, load_classifier, predict, submission_frame

runner = CliRunner()
N = 45  # rows per input: 7 chunks of 7 (the last one short) against one chunk


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny model's batch-of-one forwards are ~50x slower with two threads on a busy
    2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows():
    """Real AG News rows: title and description (the Kaggle form's columns) and their joined text."""
    df = pd.read_csv(TEST_CSV, header=None, names=["cls", "title", "description"], dtype=str).head(N)
    df["text"] = (df["title"].str.strip() + " " + df["description"].str.strip()).str.strip()
    return df


@pytest.fixture(scope="module")
def whole_file(tiny_model_dir, rows, tmp_path_factory):
    """The submission of the rows classified all at once (batches of one text: the chunking cannot change a
    single logit), as one frame written whole, and the probabilities."""
    clf = load_classifier(tiny_model_dir)
    probs = clf.predict_proba(rows["text"].tolist(), batch_size=1)
    path = tmp_path_factory.mktemp("whole") / "whole.csv"
    submission_frame(probs, clf.label_names, extra=True).to_csv(path, index=False)
    return path.read_bytes(), probs


def write_input(folder, fmt: str, rows: pd.DataFrame):
    """``rows`` in one input format; returns the file. The texts read back are ``rows["text"]`` in every form."""
    path = folder / f"in.{fmt.split('-')[0]}"
    if fmt == "csv":
        rows[["text"]].assign(source="x").to_csv(path, index=False)
    elif fmt == "csv-kaggle":
        k = pd.DataFrame({"Class Index": rows["cls"], "Title": rows["title"], "Description": rows["description"]})
        k.to_csv(path, index=False)
    elif fmt == "csv-classic":
        rows[["cls", "title", "description"]].to_csv(path, index=False, header=False)
    elif fmt == "tsv":
        rows[["text"]].to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        rows[["text"]].to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "parquet":
        rows[["text"]].to_parquet(path, row_group_size=10)  # row groups that do not line up with the chunks
    elif fmt == "txt":
        path.write_text("\n\n".join(rows["text"]) + "\n", encoding="utf-8")  # blank lines are skipped
    return path


def submission(path) -> pd.DataFrame:
    return pd.read_csv(path)


@pytest.mark.parametrize("fmt", ["csv", "csv-kaggle", "csv-classic", "tsv", "jsonl", "parquet", "txt"])
def test_streamed_output_equals_whole_file_output(tiny_model_dir, tmp_path, rows, whole_file, fmt):
    data = write_input(tmp_path, fmt, rows)
    assert read_table(data, label_column=None)["text"].tolist() == rows["text"].tolist()  # the form is understood
    out = tmp_path / "streamed.csv"
    r = cli("predict", tiny_model_dir, "-i", data, "-o", out, "--chunk-rows", 7, "--batch-size", 1, "--extra-columns")
    assert r.exit_code == 0, r.output
    assert f"{N} rows" in r.output and "rows/s" in r.output  # the progress bar's last state
    expected, probs = whole_file
    assert out.read_bytes() == expected
    sub = submission(out)
    assert sub["ID"].tolist() == list(range(N))  # continuous across the 7 chunks
    assert sub["Label"].tolist() == probs.argmax(-1).tolist()
    np.testing.assert_allclose(sub.filter(like="p_").to_numpy(), probs, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([data.name, out.name])


def test_api_streams_and_reports_progress(tiny_model_dir, tmp_path, rows):
    """While chunks are written the output does not exist yet: they go to a temp file next to it."""
    data = write_input(tmp_path, "parquet", rows)
    out = tmp_path / "sub.csv"
    seen = []

    def progress(done, total):
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".sub.csv.") and p.name.endswith(".tmp")]
        lines = len(temps[0].read_text().splitlines()) if temps else None
        seen.append((done, total, out.exists(), lines))

    assert predict(tiny_model_dir, data, out, chunk_rows=20, progress=progress) == out
    # parquet metadata gives the total; one call when the model is ready, then one per chunk (header + rows so far)
    assert seen == [(0, N, False, 0), (20, N, False, 21), (40, N, False, 41), (N, N, False, N + 1)]
    assert submission(out)["ID"].tolist() == list(range(N))
    assert [p.name for p in tmp_path.iterdir() if p.name != data.name] == ["sub.csv"]


def _malformed_csv(folder, rows):
    """A CSV whose row 30 (file line 32) has a field too many: the first chunks are fine."""
    path = folder / "in.csv"
    lines = ["text,source"] + [f'"{t.replace(chr(34), "")}",x' for t in rows["text"]]
    lines[31] += ",extra"
    path.write_text("\n".join(lines) + "\n")
    return path


def _empty_text_csv(folder, rows):
    df = rows[["text"]].assign(source="x")  # two columns: a blank text is a row, not a blank line
    df.loc[33, "text"] = "   "
    df.to_csv(folder / "in.csv", index=False)
    return folder / "in.csv"


def _null_text_jsonl(folder, rows):
    df = rows[["text"]].astype(object)
    df.loc[40, "text"] = None
    df.to_json(folder / "in.jsonl", orient="records", lines=True)
    return folder / "in.jsonl"


def _null_text_parquet(folder, rows):
    df = rows[["text"]].astype(object)
    df.loc[22, "text"] = None
    df.to_parquet(folder / "in.parquet")
    return folder / "in.parquet"


def _bad_utf8_txt(folder, rows):
    data = ("\n".join(rows["text"][:30]) + "\n").encode()
    (folder / "in.txt").write_bytes(data + b"caf\xe9\n" + "\n".join(rows["text"][30:]).encode())
    return folder / "in.txt", len(data) + 3


@pytest.mark.parametrize("make, words", [
    (_malformed_csv, ["could not be parsed as csv", "line 32"]),
    (_empty_text_csv, ["empty text", "row 33", "in rows 28-34"]),
    (_null_text_jsonl, ["empty text", "row 40"]),
    (_null_text_parquet, ["empty text", "row 22"]),
    (lambda f, r: _bad_utf8_txt(f, r)[0], ["not UTF-8"]),
], ids=["malformed-csv-row", "blank-text", "null-jsonl-text", "null-parquet-text", "bad-utf8-txt"])
@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "overwrite"])
def test_error_in_a_later_chunk_leaves_nothing(tiny_model_dir, tmp_path, rows, make, words, existing):
    data = make(tmp_path, rows)
    out = tmp_path / "out" / "deep" / "sub.csv"
    if existing:
        out.parent.mkdir(parents=True)
        out.write_text("ID,Label\n0,1\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = cli("predict", tiny_model_dir, "-i", data, "-o", out, "--chunk-rows", 7, *(["--overwrite"] if existing else []))
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    for w in words:
        assert w in errors[0], (w, errors[0])
    # no temp file, no folder created for the output; an existing output is untouched
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if existing:
        assert out.read_text() == "ID,Label\n0,1\n"


def test_error_is_met_after_earlier_chunks_were_classified(tiny_model_dir, tmp_path, rows):
    """The malformed row is found while streaming (after three chunks were written), not by a pre-read."""
    data = _malformed_csv(tmp_path, rows)
    seen = []
    with pytest.raises(NewsloraError, match="line 32"):
        predict(tiny_model_dir, data, tmp_path / "sub.csv", chunk_rows=7, progress=lambda d, t: seen.append(d))
    assert seen and seen[0] == 0 and seen[-1] >= 14
    assert [p.name for p in tmp_path.iterdir()] == ["in.csv"]


def test_txt_undecodable_byte_is_named_by_its_offset_in_the_file(tmp_path, rows):
    data, offset = _bad_utf8_txt(tmp_path, rows)
    with pytest.raises(NewsloraError, match=f"byte {offset}\\b"):
        list(iter_texts(data, chunk_rows=7))
    with pytest.raises(NewsloraError, match=f"byte {offset}\\b"):  # the whole-file reader says the same
        read_table(data, label_column=None)


def test_txt_lines_split_as_the_whole_file_reader_splits_them(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("a\r\nb\n\n  \nc\rd\x0be\u2028f\ng".encode())
    chunks = list(iter_texts(f, chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 2, 2, 1]
    assert pd.concat(chunks)["text"].tolist() == read_table(f, label_column=None)["text"].tolist() == list("abcdefg")


def _slow_down_then(action, after_calls: int):
    """A Classifier.predict_proba that runs ``action`` on its ``after_calls``-th call (a chunk in flight)."""
    real = Classifier.predict_proba
    calls = []

    def predict_proba(self, texts, batch_size=None):
        calls.append(len(texts))
        if len(calls) == after_calls:
            action()
        return real(self, texts, batch_size)

    return predict_proba


@pytest.mark.parametrize("signal_, code, words", [
    ("ctrl-c", 130, ["interrupted"]),
    ("sigterm", 143, ["error: terminated (SIGTERM)", "nothing written to"]),
])
def test_interrupt_mid_stream_leaves_nothing(tiny_model_dir, tmp_path, rows, monkeypatch, signal_, code, words):
    def ctrl_c():
        raise KeyboardInterrupt

    action = ctrl_c if signal_ == "ctrl-c" else (lambda: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(Classifier, "predict_proba", _slow_down_then(action, after_calls=3))
    data = write_input(tmp_path, "csv", rows)
    before = signal.getsignal(signal.SIGTERM)
    r = cli("predict", tiny_model_dir, "-i", data, "-o", tmp_path / "new" / "sub.csv", "--chunk-rows", 7)
    assert r.exit_code == code, r.output
    for w in words:
        assert w in r.output, (w, r.output)
    assert [p.name for p in tmp_path.iterdir()] == [data.name]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored


def test_api_sigterm_raises_terminated(tiny_model_dir, tmp_path, rows, monkeypatch):
    monkeypatch.setattr(Classifier, "predict_proba",
                        _slow_down_then(lambda: os.kill(os.getpid(), signal.SIGTERM), after_calls=2))
    data = write_input(tmp_path, "txt", rows)
    with pytest.raises(Terminated):
        predict(tiny_model_dir, data, tmp_path / "sub.csv", chunk_rows=10)
    assert [p.name for p in tmp_path.iterdir()] == [data.name]


@pytest.mark.parametrize("chunk", [0, -5])
def test_chunk_rows_must_be_positive(tiny_model_dir, tmp_path, rows, chunk):
    data = write_input(tmp_path, "csv", rows)
    r = cli("predict", tiny_model_dir, "-i", data, "-o", tmp_path / "sub.csv", "--chunk-rows", chunk)
    assert r.exit_code == 2 and f"--chunk-rows {chunk}" in r.output, r.output
    assert not (tmp_path / "sub.csv").exists()


def test_pickled_dataset_is_sliced_into_chunks(tiny_model_dir, tmp_path, rows):
    import pickle

    import datasets

    pkl = tmp_path / "in.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(datasets.Dataset.from_dict({"text": rows["text"].tolist()}), f)
    seen = []
    predict(tiny_model_dir, pkl, tmp_path / "sub.csv", trust_pickle=True, chunk_rows=20,
            progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, N), (20, N), (40, N), (N, N)]
    rows_out = list(csv.reader(open(tmp_path / "sub.csv")))
    assert [int(r[0]) for r in rows_out[1:]] == list(range(N))
