"""Tests for newslora.report on real run folders from tiny trainings (and damaged copies of them)."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
from html.parser import HTMLParser
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import openpyxl
import pandas as pd
import pytest
import yaml
from conftest import ctrl_c_after, tiny_overrides

from newslora.errors import NewsloraError
from newslora.report import compare_runs, finalize_run, plot_run, write_model_card, write_workbook

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
BASE_PLOTS = {"loss.png", "loss_epochs.png", "accuracy.png", "prf.png", "confusion_test.png", "per_class_f1.png",
              "label_distribution.png"}
SHEETS = {"summary", "epochs", "steps", "per_class", "confusion"}
CURVES = {"loss.png", "loss_epochs.png", "accuracy.png", "prf.png"}  # the epoch row written at the interruption


# --------------------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """Real run folders from tiny trainings: a LoRA run (the session's tiny run), an AdaLoRA run, a run evaluated
    once (at its only epoch end), one without a test split (validation only, as a search trial) and one
    interrupted by Ctrl-C."""
    from newslora.config import load_recipe
    from newslora.train import train

    root = tmp_path_factory.mktemp("report-runs")

    def run(name: str, callbacks=(), evaluate_test=True, **extra) -> Path:
        recipe = load_recipe(None, tiny_overrides(**{"name": name, "data.max_train_samples": 128, **extra}))
        return train(recipe, run_dir=root / name, extra_callbacks=callbacks, evaluate_test=evaluate_test).run_dir

    out = {"lora": tiny_run.run_dir,
           "adalora": run("adalora-r4", method="adalora", **{"adalora.init_r": 6, "adalora.target_r": 2,
                                                               "adalora.deltaT": 1}),
           "single": run("single-eval", **{"train.eval_steps": "null"}),
           "validation-only": run("validation-only", evaluate_test=False)}
    with pytest.raises(KeyboardInterrupt):
        run("lora-interrupted", callbacks=[ctrl_c_after(3)], **{"train.eval_steps": 2})
    out["interrupted"] = root / "lora-interrupted"
    return out


@pytest.fixture
def runs(trained, tmp_path: Path) -> dict[str, Path]:
    """Fresh copies of the trained run folders (tests write plots and workbooks into them)."""
    return {k: Path(shutil.copytree(p, tmp_path / p.name, ignore=shutil.ignore_patterns("checkpoints")))
            for k, p in trained.items()}


def _eval(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}


def _info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _assert_pngs(paths: list[Path], expected: set[str]) -> None:
    assert {p.name for p in paths} == expected
    for p in paths:
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 200, p
        assert img[..., :3].std() > 0.01, f"{p} looks blank"


# --------------------------------------------------------------------------- plots

@pytest.mark.parametrize("kind, expected", [
    ("lora", BASE_PLOTS),
    ("adalora", BASE_PLOTS | {"adalora_ranks.png"}),
    ("validation-only", BASE_PLOTS),  # confusion/label plots fall back to validation
    ("single", BASE_PLOTS),
    ("interrupted", CURVES),  # no evaluation results yet: the curves only
])
def test_plot_run_writes_readable_pngs(runs, kind, expected):
    paths = plot_run(runs[kind])
    assert all(p.parent == runs[kind] / "plots" for p in paths)
    _assert_pngs(paths, expected)


def test_plot_run_skips_missing_data(runs):
    run = runs["lora"]
    for f in ("eval.json", "metrics_steps.csv", "metrics_epochs.csv"):
        (run / f).unlink()
    assert plot_run(run) == []
    (run / "metrics_steps.csv").write_text("")  # empty file: still no crash
    assert plot_run(run) == []


def test_plot_run_falls_back_to_epoch_metrics(runs):
    run = runs["lora"]
    (run / "metrics_steps.csv").unlink()
    names = {p.name for p in plot_run(run)}
    assert {"loss.png", "accuracy.png", "prf.png"} <= names


def test_loss_per_epoch_plot_reads_the_epoch_file(runs):
    """loss_epochs.png: training and validation loss against epochs, from metrics_epochs.csv alone."""
    run = runs["lora"]
    (run / "metrics_steps.csv").unlink()
    (run / "metrics_epochs.csv").write_text("epoch,step,train_loss,eval_loss,eval_accuracy\n"
                                            "1,10,1.30,1.20,0.40\n2,20,0.90,1.00,0.60\n3,30,0.60,0.95,0.70\n")
    _assert_pngs([p for p in plot_run(run) if p.name == "loss_epochs.png"], {"loss_epochs.png"})
    (run / "metrics_epochs.csv").write_text("epoch,step,eval_accuracy\n1,10,0.4\n")  # no loss columns: no plot
    assert "loss_epochs.png" not in {p.name for p in plot_run(run)}


# --------------------------------------------------------------------------- workbook

def _sheet_rows(ws) -> list[tuple]:
    return list(ws.iter_rows(values_only=True))


def test_workbook_values_match_eval_json_exactly(runs):
    run = runs["adalora"]
    path = write_workbook(run)
    assert path == run / "metrics.xlsx"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    wb = openpyxl.load_workbook(path)
    assert set(wb.sheetnames) == SHEETS
    ev = _eval(run)
    summary = {k: v for k, v in _sheet_rows(wb["summary"])[1:]}
    for split in ("validation", "test"):
        assert summary[f"{split}_accuracy"] == ev[split]["accuracy"]
        assert summary[f"{split}_macro_f1"] == ev[split]["macro_f1"]
    info = _info(run)
    assert summary["trainable_total"] == info["trainable"]["total"] and summary["budget"] == 1_000_000
    assert summary["method"] == "adalora" and summary["recipe.adalora.init_r"] == 6
    assert summary["recipe.lora.target_modules"] == "query, value"
    assert summary["recipe.train.lr"] == 3e-3

    per_class = _sheet_rows(wb["per_class"])
    assert per_class[0] == ("split", "class", "precision", "recall", "f1", "support")
    for split, cls, p, r, f1, support in per_class[1:]:
        expected = ev[split]["per_class"][cls]
        assert (p, r, f1, support) == (expected["precision"], expected["recall"],
                                       expected["f1"], expected["support"])
    assert len(per_class) == 1 + 2 * len(LABELS)

    confusion = _sheet_rows(wb["confusion"])
    test_at = next(i for i, row in enumerate(confusion) if str(row[0]).startswith("test"))
    assert confusion[test_at + 1][1:5] == tuple(LABELS)
    assert [list(r[1:5]) for r in confusion[test_at + 2: test_at + 6]] == \
        ev["test"]["confusion_matrix"]

    steps = pd.read_csv(run / "metrics_steps.csv")
    assert len(_sheet_rows(wb["steps"])) == len(steps) + 1


def test_workbook_missing_inputs_keeps_headers(tmp_path):
    run = tmp_path / "empty-run"
    run.mkdir()
    # running, by this live process (pid and host recorded as a training attempt records them)
    attempt = {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": "2026-01-01T00:00:00+00:00"}
    (run / "run.json").write_text(json.dumps({"name": "empty-run", "status": "running", "attempts": [attempt]}))
    wb = openpyxl.load_workbook(write_workbook(run))
    assert set(wb.sheetnames) == SHEETS
    assert _sheet_rows(wb["epochs"])[0][:3] == ("epoch", "step", "train_loss")
    assert len(_sheet_rows(wb["epochs"])) == 1
    assert _sheet_rows(wb["steps"])[0][0] == "step" and len(_sheet_rows(wb["steps"])) == 1
    assert len(_sheet_rows(wb["per_class"])) == 1
    summary = dict(_sheet_rows(wb["summary"])[1:])
    assert summary["status"] == "running" and summary["test_accuracy"] is None
    # "running" with no process recorded (or a process that is gone) is shown as dead
    (run / "run.json").write_text(json.dumps({"name": "empty-run", "status": "running"}))
    assert dict(_sheet_rows(openpyxl.load_workbook(write_workbook(run))["summary"])[1:])["status"] == "dead"


def test_workbook_interrupted_and_validation_only_runs(runs):
    wb = openpyxl.load_workbook(write_workbook(runs["interrupted"]))
    summary = dict(_sheet_rows(wb["summary"])[1:])
    assert summary["status"] == "interrupted" and summary["validation_accuracy"] is None
    assert len(_sheet_rows(wb["per_class"])) == 1  # header only: nothing was evaluated
    assert len(_sheet_rows(wb["steps"])) > 1  # the curves of the partial run are kept
    wb = openpyxl.load_workbook(write_workbook(runs["validation-only"]))
    summary = dict(_sheet_rows(wb["summary"])[1:])
    assert summary["validation_accuracy"] == _eval(runs["validation-only"])["validation"]["accuracy"]
    assert summary["test_accuracy"] is None and summary["status"] == "completed"
    assert {r[0] for r in _sheet_rows(wb["per_class"])[1:]} == {"validation"}


# --------------------------------------------------------------------------- comparison

class _ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.body_rows, self.imgs = 0, [], []
        self._in_body = self._in_cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables += 1
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.body_rows.append([])
        elif tag == "td" and self._in_body:
            self._in_cell = True
            self.body_rows[-1].append("")
        elif tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.body_rows[-1][-1] += data


def test_compare_runs_reports(runs, tmp_path):
    out = compare_runs(list(runs.values()), tmp_path / "cmp")
    assert set(out) == {"md", "html", "xlsx"} and all(p.is_file() for p in out.values())
    val = {r: _eval(r).get("validation", {}).get("accuracy") for r in runs.values()}
    by_val = sorted(runs.values(), key=lambda r: (val[r] is None, -(val[r] or 0)))  # unevaluated last
    names = [r.name for r in by_val]

    parser = _ReportParser()
    parser.feed(out["html"].read_text())
    assert parser.tables == 1
    assert [row[0] for row in parser.body_rows] == names
    assert len(parser.imgs) >= 4 * (len(runs) - 1) + 2  # the interrupted run has its curves only
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"

    md_rows = [line for line in out["md"].read_text().splitlines() if line.startswith("| ")]
    assert md_rows[0].startswith("| name | method |")
    assert [row.split("|")[1].strip() for row in md_rows[1:]] == names

    ws = openpyxl.load_workbook(out["xlsx"])["comparison"]
    rows = _sheet_rows(ws)
    header = rows[0]
    assert [r[0] for r in rows[1:]] == names
    col = header.index("val_accuracy")
    assert [r[col] for r in rows[1:]] == [val[r] for r in by_val]
    test_col = header.index("test_accuracy")
    assert rows[1 + names.index("validation-only")][test_col] is None
    assert rows[1 + names.index("lora-interrupted")][col] is None
    assert rows[1 + names.index("adalora-r4")][header.index("rank")] == 6  # adalora.init_r: the rank counted


def test_compare_runs_rejects_non_run_folder(runs, tmp_path):
    stray = tmp_path / "not-a-run"
    stray.mkdir()
    (stray / "notes.txt").write_text("hello")
    with pytest.raises(NewsloraError, match="not-a-run.*not a newslora run folder"):
        compare_runs([runs["lora"], stray], tmp_path / "cmp")
    assert not (tmp_path / "cmp" / "report.md").exists()


# --------------------------------------------------------------------------- model card

def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    front, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(front)


def test_model_card(runs, tmp_path):
    run = runs["lora"]
    card = write_model_card(tmp_path / "export", run)
    assert card == tmp_path / "export" / "README.md"
    text = card.read_text()
    meta = _front_matter(text)
    ev, info = _eval(run), _info(run)
    assert "base_model" not in meta  # a local backbone folder is not a hub model
    assert meta["datasets"] == ["ag_news"] and meta["pipeline_tag"] == "text-classification"
    assert "newslora" in meta["tags"] and "lora" in meta["tags"] and "license" not in meta
    result = meta["model-index"][0]["results"][0]
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert result["dataset"]["split"] == "test"
    assert metrics == {"accuracy": ev["test"]["accuracy"], "f1": ev["test"]["macro_f1"]}
    for needle in ('pipeline("text-classification"', "newslora predict", "load_classifier",
                   "## Training recipe", "target_modules", "## Limitations",
                   f"{100 * info['trainable']['total'] / 1_000_000:.1f}%",
                   f"{info['rows']['train']:,} training examples"):
        assert needle in text, needle
    for label in LABELS:  # per-class table lists every class for both splits
        assert text.count(f"| {label} |") == 2


def test_model_card_names_the_hub_model_of_a_packaged_backbone(runs, tmp_path):
    from newslora.run import Run

    Run(runs["lora"]).update_info(backbone="minilm")  # the recipe name of the packaged MiniLM
    text = write_model_card(tmp_path / "export", runs["lora"]).read_text()
    assert _front_matter(text)["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "huggingface.co/sentence-transformers/all-MiniLM-L6-v2" in text


def test_model_card_without_test_split_uses_validation(runs, tmp_path):
    meta = _front_matter(write_model_card(tmp_path / "exp", runs["validation-only"]).read_text())
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["split"] == "validation"
    assert result["metrics"][0]["value"] == _eval(runs["validation-only"])["validation"]["accuracy"]


# --------------------------------------------------------------------------- finalize

def test_finalize_run_writes_outputs(runs):
    finalize_run(runs["single"])
    assert (runs["single"] / "metrics.xlsx").is_file()
    assert {p.name for p in (runs["single"] / "plots").iterdir()} == BASE_PLOTS


def test_finalize_run_never_raises(runs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="newslora.report"):
        finalize_run(tmp_path / "missing")
    assert "finalize_run" in caplog.text
    run = runs["adalora"]
    (run / "eval.json").write_text('{"validation": {"accuracy": 0.9, "confusion_matrix": [[1')
    (run / "adalora_ranks.csv").write_text("step,module\n1,x\n")
    finalize_run(run)
    assert (run / "metrics.xlsx").is_file() and (run / "plots" / "loss.png").is_file()


# --------------------------------------------------------------------------- many classes

MANY_CLASSES_SCRIPT = r"""
import json, sys, time
from pathlib import Path

# the peak RSS of this process alone: a forked child starts with its parent's high-water mark (a test suite's
# gigabytes), so the mark is reset first (Linux >= 4.0) and read back from VmHWM
Path("/proc/self/clear_refs").write_text("5")
import numpy as np
from newslora.evaluate import classification_metrics
from newslora.report import finalize_run

run, k = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
labels = [f"class {i} [{'x' * (i % 13)}]" for i in range(k)]
y = rng.zipf(1.3, 10 * k) % k  # a long tail, as many-class sets have
pred = np.where(rng.random(len(y)) < 0.7, y, rng.integers(0, k, len(y)))
m = classification_metrics(y, pred, labels)
run.mkdir()
(run / "run.json").write_text(json.dumps({"name": f"many-{k}", "status": "completed", "label_names": labels}))
(run / "eval.json").write_text(json.dumps({"validation": m, "test": m}))
(run / "metrics_epochs.csv").write_text("epoch,step,train_loss,eval_loss\n1,2,1.6,1.4\n")
(run / "metrics_steps.csv").write_text("step,epoch,loss,eval_loss,eval_accuracy,eval_macro_f1\n"
                                        "1,0.5,2.0,,,\n2,1.0,1.5,1.4,0.6,0.5\n")
t0 = time.time()
failures = finalize_run(run)
hwm = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
print(json.dumps({"failures": failures, "seconds": time.time() - t0, "maxrss_mb": int(hwm.split()[1]) / 1024}))
"""


@pytest.mark.parametrize("k", [200, 2000])
def test_many_classes_plots_and_workbook_stay_bounded(tmp_path, k):
    """A 200- and a 2,000-class evaluation (synthetic predictions): every plot and metrics.xlsx are written, quickly,
    in bounded memory; the heat map and the bars show the top classes by support; the workbook keeps every class."""
    import subprocess
    import sys

    run = tmp_path / f"many-{k}"
    proc = subprocess.run([sys.executable, "-c", MANY_CLASSES_SCRIPT, str(run), str(k)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["failures"] == []
    assert res["seconds"] < 90 and res["maxrss_mb"] < 1500, res  # a 2,000-class run: ~10 s, 0.5 GB
    plots = sorted((run / "plots").iterdir())
    _assert_pngs(plots, BASE_PLOTS)
    for p in plots:
        h, w = mpimg.imread(p).shape[:2]
        assert h * w < 6000 * 6000, (p.name, h, w)  # 200 classes drew a 31,000-pixel square before
    wb = openpyxl.load_workbook(run / "metrics.xlsx", read_only=True)
    per_class = _sheet_rows(wb["per_class"])
    assert len(per_class) == 1 + 2 * k  # both splits, every class
    ev = _eval(run)["test"]
    confusion = _sheet_rows(wb["confusion"])
    assert confusion[1] == ("true", "predicted", "count")
    cells = {(t, p): c for t, p, c in confusion[2:2 + np.count_nonzero(ev["confusion_matrix"])]}
    labels = ev["labels"]
    cm = np.asarray(ev["confusion_matrix"])
    assert sum(cells.values()) == ev["n"]
    t, p = np.unravel_index(cm.argmax(), cm.shape)
    assert cells[(labels[t], labels[p])] == cm.max() == confusion[2][2]


def test_plot_without_eval_json_removes_stale_plots(runs):
    run = runs["lora"]
    assert {"confusion_test.png", "per_class_f1.png"} <= {p.name for p in plot_run(run)}
    (run / "eval.json").unlink()
    names = {p.name for p in plot_run(run)}
    assert {p.name for p in (run / "plots").iterdir()} == names == CURVES  # no plot of results the run lost


def test_a_failed_report_is_recorded_and_said(runs, capsys):
    from newslora.train import finalize

    run = runs["single"]
    ev = _eval(run)
    ev["test"]["confusion_matrix"] = [[1, 2], [3]]  # ragged: the confusion plots cannot be drawn
    (run / "eval.json").write_text(json.dumps(ev))
    finalize(run)
    errors = _info(run)["report_errors"]
    assert any(e.startswith("confusion_test.png: ") for e in errors), errors
    assert "report is incomplete" in capsys.readouterr().err
    assert not (run / "plots" / "confusion_test.png").exists() and (run / "plots" / "loss.png").is_file()
