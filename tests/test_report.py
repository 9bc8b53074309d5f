"""Tests for newslora.report on synthetic run folders (no training)."""

from __future__ import annotations

import base64
import json
import logging
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import openpyxl
import pandas as pd
import pytest
import yaml

from newslora.errors import NewsloraError
from newslora.report import compare_runs, finalize_run, plot_run, write_model_card, write_workbook

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
BASE_PLOTS = {"loss.png", "accuracy.png", "prf.png", "confusion_test.png", "per_class_f1.png",
              "label_distribution.png"}
SHEETS = {"summary", "epochs", "steps", "per_class", "confusion"}
ADALORA_MODULES = [f"roberta.encoder.layer.{i}.{m}" for i in range(12) for m in (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense")]


# --------------------------------------------------------------------------- synthetic runs

def _split_metrics(rng: np.random.Generator, per_class: int, accuracy: float) -> dict:
    """Metrics dict as eval.json stores it, derived from a random confusion matrix."""
    k = len(LABELS)
    cm = np.zeros((k, k), dtype=int)
    for i in range(k):
        correct = int(round(per_class * min(0.99, accuracy + rng.normal(0, 0.02))))
        wrong = rng.multinomial(per_class - correct, np.ones(k - 1) / (k - 1))
        cm[i] = np.insert(wrong, i, correct)
    tp, pred, true = np.diag(cm), cm.sum(0), cm.sum(1)
    prec, rec = tp / pred, tp / true
    f1 = 2 * prec * rec / (prec + rec)
    return {
        "accuracy": float(tp.sum() / cm.sum()), "macro_precision": float(prec.mean()),
        "macro_recall": float(rec.mean()), "macro_f1": float(f1.mean()), "n": int(cm.sum()),
        "labels": LABELS,
        "per_class": {lab: {"precision": float(prec[i]), "recall": float(rec[i]),
                            "f1": float(f1[i]), "support": int(true[i])}
                      for i, lab in enumerate(LABELS)},
        "confusion_matrix": cm.tolist(),
    }


def make_run(root: Path, name: str, *, method: str = "lora", accuracy: float = 0.9,
             total_steps: int = 600, eval_every: int = 100, seed: int = 0,
             interrupted: bool = False, single_eval: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    recipe = {
        "name": name, "method": method, "model": {"backbone": "roberta-base"},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "adalora": {"init_r": 12, "target_r": 4},
        "budget": {"max_params": 1_000_000},
        "data": {"source": "ag_news", "max_train_samples": 20000},
        "train": {"epochs": 2, "learning_rate": 5e-4, "batch_size": 32, "seed": seed},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    val = _split_metrics(rng, 500, accuracy)
    evals = {"validation": val}
    if not interrupted:
        evals["test"] = _split_metrics(rng, 1900, accuracy - 0.005)
    (run / "eval.json").write_text(json.dumps(evals, indent=2))

    (run / "run.json").write_text(json.dumps({
        "name": name, "method": method, "backbone": "roberta-base", "label_names": LABELS,
        "trainable": {"total": 890_000, "head": 592_900, "adapter": 297_100,
                      "budget": 1_000_000},
        "device": "cuda:0 (NVIDIA H100)",
        "versions": {"torch": "2.5.1", "transformers": "4.46.0", "peft": "0.13.2",
                     "newslora": "0.1.0"},
        "started": "2024-11-26T08:00:00+00:00",
        "finished": None if interrupted else "2024-11-26T08:12:31+00:00",
        "status": "interrupted" if interrupted else "completed",
        "train_runtime_s": None if interrupted else 751.25,
        "train_samples_per_second": None if interrupted else 53.2,
        "target_modules": ["query", "value"], "rank": 4 if method == "adalora" else 8,
    }))

    def eval_row(step: int, frac: float, final: bool = False) -> dict:
        acc = val["accuracy"] if final else accuracy - 0.25 * (1 - frac) ** 2
        return {"step": step, "epoch": 2 * step / total_steps, "eval_loss": 1.4 - acc,
                "eval_accuracy": acc, "eval_macro_precision": acc + 0.003,
                "eval_macro_recall": acc - 0.002,
                "eval_macro_f1": val["macro_f1"] if final else acc - 0.004}

    if single_eval:
        steps = pd.DataFrame([eval_row(total_steps, 1.0, final=True)])
    else:
        rows = []
        for step in range(10, total_steps + 1, 10):
            frac = step / total_steps
            rows.append({"step": step, "epoch": 2 * frac,
                         "loss": 1.4 * np.exp(-4 * frac) + 0.25 + rng.normal(0, 0.03),
                         "learning_rate": 5e-4 * (1 - frac)})
            if step % eval_every == 0:
                rows.append(eval_row(step, frac, final=step == total_steps))
        steps = pd.DataFrame(rows)
    text = steps.to_csv(index=False)
    if interrupted:  # killed mid-write: cut in the middle of a line
        text = text[: int(len(text) * 0.55)]
    (run / "metrics_steps.csv").write_text(text)

    if not interrupted:
        epochs = pd.DataFrame([{"epoch": e, "step": e * total_steps // 2,
                                "train_loss": 0.6 / e, **{k: v for k, v in eval_row(
                                    e * total_steps // 2, e / 2, final=e == 2).items()
                                    if k.startswith("eval_")}} for e in (1, 2)])
        epochs.to_csv(run / "metrics_epochs.csv", index=False)

    if method == "adalora":
        final = {m: int(rng.integers(0, 10)) for m in ADALORA_MODULES}
        rank_rows = [{"step": step, "module": m,
                      "rank": 12 if step <= 100 else
                      round(12 + (final[m] - 12) * min(1.0, (step - 100) / 400))}
                     for step in range(0, total_steps + 1, 50) for m in ADALORA_MODULES]
        pd.DataFrame(rank_rows).to_csv(run / "adalora_ranks.csv", index=False)
    return run


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    return {
        "lora": make_run(tmp_path, "lora-r8", accuracy=0.91, seed=1),
        "adalora": make_run(tmp_path, "adalora-r4", method="adalora", accuracy=0.93, seed=2),
        "interrupted": make_run(tmp_path, "lora-interrupted", accuracy=0.85, seed=3,
                                interrupted=True),
        "single": make_run(tmp_path, "single-eval", accuracy=0.88, seed=4, single_eval=True),
    }


def _eval(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text())


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
    ("interrupted", BASE_PLOTS),  # confusion/label plots fall back to validation
    ("single", BASE_PLOTS),
])
def test_plot_run_writes_readable_pngs(runs, kind, expected):
    paths = plot_run(runs[kind])
    assert all(p.parent == runs[kind] / "plots" for p in paths)
    _assert_pngs(paths, expected)


def test_plot_run_skips_missing_data(tmp_path):
    run = make_run(tmp_path, "bare", seed=5)
    for f in ("eval.json", "metrics_steps.csv", "metrics_epochs.csv"):
        (run / f).unlink()
    assert plot_run(run) == []
    (run / "metrics_steps.csv").write_text("")  # empty file: still no crash
    assert plot_run(run) == []


def test_plot_run_falls_back_to_epoch_metrics(tmp_path):
    run = make_run(tmp_path, "epochs-only", seed=6)
    (run / "metrics_steps.csv").unlink()
    names = {p.name for p in plot_run(run)}
    assert {"loss.png", "accuracy.png", "prf.png"} <= names


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
    assert summary["trainable_total"] == 890_000 and summary["budget"] == 1_000_000
    assert summary["recipe.lora.target_modules"] == "query, value"
    assert summary["recipe.train.learning_rate"] == 5e-4

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
    (run / "run.json").write_text(json.dumps({"name": "empty-run", "status": "running"}))
    wb = openpyxl.load_workbook(write_workbook(run))
    assert set(wb.sheetnames) == SHEETS
    assert _sheet_rows(wb["epochs"])[0][:3] == ("epoch", "step", "train_loss")
    assert len(_sheet_rows(wb["epochs"])) == 1
    assert _sheet_rows(wb["steps"])[0][0] == "step" and len(_sheet_rows(wb["steps"])) == 1
    assert len(_sheet_rows(wb["per_class"])) == 1
    summary = dict(_sheet_rows(wb["summary"])[1:])
    assert summary["status"] == "running" and summary["test_accuracy"] is None


def test_workbook_interrupted_run(runs):
    wb = openpyxl.load_workbook(write_workbook(runs["interrupted"]))
    summary = dict(_sheet_rows(wb["summary"])[1:])
    assert summary["validation_accuracy"] == _eval(runs["interrupted"])["validation"]["accuracy"]
    assert summary["test_accuracy"] is None and summary["status"] == "interrupted"
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
    by_val = sorted(runs.values(), key=lambda r: -_eval(r)["validation"]["accuracy"])
    names = [r.name for r in by_val]

    parser = _ReportParser()
    parser.feed(out["html"].read_text())
    assert parser.tables == 1
    assert [row[0] for row in parser.body_rows] == names
    assert len(parser.imgs) >= 4 * len(runs)
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
    assert [r[col] for r in rows[1:]] == [_eval(r)["validation"]["accuracy"] for r in by_val]
    test_col = header.index("test_accuracy")
    interrupted = rows[1 + names.index("lora-interrupted")]
    assert interrupted[test_col] is None
    assert rows[1 + names.index("adalora-r4")][header.index("rank")] == 4


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
    ev = _eval(run)
    assert meta["base_model"] == "roberta-base"
    assert meta["datasets"] == ["ag_news"] and meta["pipeline_tag"] == "text-classification"
    assert "newslora" in meta["tags"] and "lora" in meta["tags"] and "license" not in meta
    result = meta["model-index"][0]["results"][0]
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert result["dataset"]["split"] == "test"
    assert metrics == {"accuracy": ev["test"]["accuracy"], "f1": ev["test"]["macro_f1"]}
    for needle in ('pipeline("text-classification"', "newslora predict", "load_classifier",
                   "## Training recipe", "target_modules", "## Limitations", "89.0%"):
        assert needle in text, needle
    for label in LABELS:  # per-class table lists every class for both splits
        assert text.count(f"| {label} |") == 2


def test_model_card_without_test_split_uses_validation(runs, tmp_path):
    meta = _front_matter(write_model_card(tmp_path / "exp", runs["interrupted"]).read_text())
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["split"] == "validation"
    assert result["metrics"][0]["value"] == _eval(runs["interrupted"])["validation"]["accuracy"]


# --------------------------------------------------------------------------- finalize

def test_finalize_run_writes_outputs(runs):
    finalize_run(runs["single"])
    assert (runs["single"] / "metrics.xlsx").is_file()
    assert {p.name for p in (runs["single"] / "plots").iterdir()} == BASE_PLOTS


def test_finalize_run_never_raises(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="newslora.report"):
        finalize_run(tmp_path / "missing")
    assert "finalize_run" in caplog.text
    run = make_run(tmp_path, "broken", seed=7)
    (run / "eval.json").write_text('{"validation": {"accuracy": 0.9, "confusion_matrix": [[1')
    (run / "adalora_ranks.csv").write_text("step,module\n1,x\n")
    finalize_run(run)
    assert (run / "metrics.xlsx").is_file() and (run / "plots" / "loss.png").is_file()
