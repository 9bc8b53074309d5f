"""The core pipeline end to end on a tiny random-init RoBERTa with the real tokenizer and real AG News rows."""
import csv
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from openpyxl import load_workbook
from typer.testing import CliRunner

from conftest import ROBERTA, TEST_CSV, TRAIN_CSV, ctrl_c_after, tiny_overrides
from newslora.cli import app
from newslora.config import load_recipe
from newslora.readers import read_table
from newslora.predict import load_classifier
from newslora.train import cpu_has_bf16, resolve_precision, train
from newslora.trainer import BF16_MIN_SPEEDUP

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_run_folder_is_complete(tiny_run):
    d = tiny_run.run_dir
    for f in ("recipe.yaml", "run.json", "metrics_steps.csv", "metrics_epochs.csv", "metrics.xlsx", "eval.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (d / f).is_file(), f
    info = json.loads((d / "run.json").read_text())
    assert info["status"] == "completed" and info["trainable"]["total"] == tiny_run.trainable.total
    assert info["versions"]["transformers"] and info["device"].startswith(("cpu", "cuda"))
    # what "auto" resolved to: on a CPU, bf16 where native bf16 measured >= BF16_MIN_SPEEDUP x fp32 (the ratio is
    # recorded), else fp32; TF32 on an Ampere+ GPU, fp16 on an older one
    if not info["device"].startswith("cpu"):
        assert info["precision"] == resolve_precision("auto")
    elif cpu_has_bf16():
        assert info["precision"] == ("bf16" if info["cpu_bf16_speedup"] >= BF16_MIN_SPEEDUP else "fp32")
    else:
        assert info["precision"] == "fp32" and "cpu_bf16_speedup" not in info
    assert load_recipe(d / "recipe.yaml").data.max_train_samples == 256
    ev = json.loads((d / "eval.json").read_text())
    for split, n in (("validation", 64), ("test", 128)):
        m = ev[split]
        assert m["n"] == n and 0 <= m["accuracy"] <= 1
        assert set(m["per_class"]) == {"World", "Sports", "Business", "Sci/Tech"}
        assert np.array(m["confusion_matrix"]).sum() == n
        assert m["accuracy"] == pytest.approx(np.trace(m["confusion_matrix"]) / n)
    steps = pd.read_csv(d / "metrics_steps.csv")
    assert steps["eval_accuracy"].notna().sum() >= 2 and steps["loss"].notna().sum() >= 2
    epochs = pd.read_csv(d / "metrics_epochs.csv")
    assert list(epochs["epoch"]) == [1]
    wb = load_workbook(d / "metrics.xlsx")
    assert "epochs" in wb.sheetnames


def test_eval_json_matches_an_independent_evaluation(tiny_run):
    """The reported test accuracy is what the saved adapter really gives on the test rows."""
    clf = load_classifier(tiny_run.run_dir)
    test = read_table(TEST_CSV)
    ev = json.loads((tiny_run.run_dir / "eval.json").read_text())["test"]
    from newslora.data import _stratified_head

    rows = _stratified_head(test, 128, 42)
    pred = clf.predict_proba(rows["text"].tolist()).argmax(-1)
    assert np.mean(pred == rows["label"].to_numpy()) == pytest.approx(ev["accuracy"])


def test_export_merged_equals_adapter(tiny_run, tmp_path):
    # --overwrite: another test (the ONNX export) may have merged the shared run already
    r = cli("export", tiny_run.run_dir, "--overwrite")
    assert r.exit_code == 0, r.output
    merged = tiny_run.run_dir / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    texts = read_table(TEST_CSV)["text"].tolist()[:200]
    a = load_classifier(tiny_run.run_dir).predict_proba(texts)
    b = load_classifier(merged).predict_proba(texts)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert (a.argmax(-1) == b.argmax(-1)).all()
    # a plain transformers user can load it
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(merged)
    assert m.config.id2label[1] == "Sports"
    card = (merged / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["pipeline_tag"] == "text-classification"


def _check_submission(path, n):
    rows = list(csv.reader(open(path)))
    assert rows[0][:2] == ["ID", "Label"]
    assert [int(r[0]) for r in rows[1:]] == list(range(n))
    assert {int(r[1]) for r in rows[1:]} <= {0, 1, 2, 3}


def _test_rows(tmp_path, rows):
    """The shared AG News test file, or (rows given) its first ``rows`` rows in a copy, and how many rows it has."""
    if rows is None:
        return TEST_CSV, 7600
    read_table(TEST_CSV).head(rows).to_csv(tmp_path / "test-head.csv", index=False)
    return tmp_path / "test-head.csv", rows


# the whole 7,600-row test file costs about a minute of CPU per command: a 400-row head in the fast loop
WHOLE_TEST_FILE = pytest.param(None, marks=pytest.mark.slow, id="all-7600")


@pytest.mark.parametrize("rows", [400, WHOLE_TEST_FILE])
def test_predict_formats(tiny_run, tmp_path, rows):
    out = tmp_path / "submission.csv"
    data, n = _test_rows(tmp_path, rows)
    r = cli("predict", tiny_run.run_dir, "--input", data, "--output", out)
    assert r.exit_code == 0, r.output
    _check_submission(out, n)
    texts = ["Stocks fall on oil", "Team wins the cup", "New chip is fast"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    pd.DataFrame({"text": texts}).to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "in.parquet")
    for name in ("in.txt", "in.jsonl", "in.parquet"):
        o = tmp_path / f"{name}.csv"
        r = cli("predict", tiny_run.run_dir, "-i", tmp_path / name, "-o", o, "--extra-columns")
        assert r.exit_code == 0, r.output
        _check_submission(o, 3)
        df = pd.read_csv(o)
        assert set(df["label_name"]) <= {"World", "Sports", "Business", "Sci/Tech"}
        np.testing.assert_allclose(df.filter(like="p_").sum(axis=1), 1, atol=1e-4)


def test_pickle_needs_explicit_trust(tiny_run, tmp_path):
    import datasets

    pkl = tmp_path / "test.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(datasets.Dataset.from_dict({"text": ["Stocks fall", "Team wins"]}), f)
    out = tmp_path / "sub.csv"
    r = cli("predict", tiny_run.run_dir, "-i", pkl, "-o", out)
    assert r.exit_code == 2 and "--trust-pickle" in r.output and not out.exists()
    r = cli("predict", tiny_run.run_dir, "-i", pkl, "-o", out, "--trust-pickle")
    assert r.exit_code == 0, r.output
    _check_submission(out, 2)


def test_classify_api(tiny_run):
    from newslora import load_classifier as top_level

    clf = top_level(tiny_run.run_dir)
    one = clf.classify("Oil prices climb")
    assert one["label"] in clf.label_names and sum(one["scores"].values()) == pytest.approx(1, abs=1e-5)
    many = clf.classify(["Oil prices climb", "Cup final tonight"])
    assert isinstance(many, list) and len(many) == 2


@pytest.mark.parametrize("rows", [400, WHOLE_TEST_FILE])
def test_evaluate_command(tiny_run, tmp_path, rows):
    out = tmp_path / "m.json"
    data, n = _test_rows(tmp_path, rows)
    r = cli("evaluate", tiny_run.run_dir, "--data", data, "--output", out)
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["n"] == n and len(m["confusion_matrix"]) == 4


def test_serve(tiny_run):
    from fastapi.testclient import TestClient

    from newslora.serve import create_app

    c = TestClient(create_app(tiny_run.run_dir))
    assert c.get("/health").json()["status"] == "ok"
    res = c.post("/classify", json={"texts": ["Stocks fall", "Team wins"]}).json()["results"]
    assert len(res) == 2 and res[0]["label"] in c.get("/labels").json()["labels"]
    assert c.post("/classify", json={"texts": [" "]}).status_code == 422
    assert c.post("/classify", json={"texts": []}).status_code == 422


def test_resume_continues_an_interrupted_run(tmp_path):
    recipe = load_recipe(None, tiny_overrides(**{"train.epochs": 2, "data.max_train_samples": 128}))
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(recipe, run_dir=run_dir, extra_callbacks=[ctrl_c_after(5)])  # after the step-4 checkpoint
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert not (run_dir / "eval.json").exists()
    assert (run_dir / "metrics_steps.csv").is_file()  # curves of the partial run are kept
    r = cli("train", "--resume", run_dir)
    assert r.exit_code == 0, r.output
    state = json.loads(sorted((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                              key=lambda p: int(p.parent.name.split("-")[1]))[-1].read_text())
    assert state["global_step"] == 8  # 2 epochs x 128/32 batches
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == sorted(set(steps)) and steps[0] == 1  # one continuous history, no restart
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_early_stopping_stops(tmp_path):
    recipe = load_recipe(None, tiny_overrides(**{"train.lr": 1e-12, "train.epochs": 3, "train.eval_steps": 2,
                                                 "train.early_stopping_patience": 1, "train.metric": "loss"}))
    res = train(recipe, run_dir=tmp_path / "es")
    steps = pd.read_csv(res.run_dir / "metrics_steps.csv")
    assert steps["step"].max() < 24  # 3 epochs would be 24 steps


@pytest.mark.parametrize("args, words", [
    (["lora.rr=2"], ["unknown recipe key"]),
    (["budget.max_params=1000"], ["over budget", "head", "adapter", "budget.max_params=1,000"]),
    ([f"data.source={TRAIN_CSV.parent / 'nope.csv'}"], ["data file not found"]),
    (["data.text_column=body"], ["column 'body' not found"]),
    (["lora.target_modules=[qkv]"], ["lora.target_modules", "query"]),
    (["lora.layers=[0,9]"], ["lora.layers", "0..1"]),
    pytest.param(["train.precision=tf32"], ["train.precision=tf32 needs an NVIDIA GPU", "train.precision=auto"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine tf32 may be valid")),
])
def test_bad_train_inputs_leave_nothing(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    r = cli("train", *tiny_overrides(), *args)
    assert r.exit_code == 2, r.output
    msg = " ".join(r.output.split())
    for w in words:
        assert w in msg, (w, msg)
    assert not (tmp_path / "runs").exists()


def test_predict_bad_inputs(tiny_run, tmp_path):
    out = tmp_path / "sub.csv"
    r = cli("predict", tiny_run.run_dir, "-i", tmp_path / "missing.csv", "-o", out)
    assert r.exit_code == 2 and "not found" in r.output and not out.exists()
    (tmp_path / "empty.txt").write_text("\n\n")
    r = cli("predict", tiny_run.run_dir, "-i", tmp_path / "empty.txt", "-o", out)
    assert r.exit_code == 2 and "no rows" in r.output and not out.exists()
    r = cli("predict", tmp_path, "-i", TEST_CSV, "-o", out)
    assert r.exit_code == 2 and "neither" in r.output and not out.exists()


def test_offline_hub_model_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("train", *tiny_overrides(**{"model.backbone": "roberta-base", "model.random_init": "false"}))
    assert r.exit_code == 2
    msg = " ".join(r.output.split())
    assert "hub is unreachable" in msg and "model.backbone=" in msg and "Traceback" not in r.output


@pytest.mark.parametrize("extra, count", [
    (["lora.r=4"], 741_124), (["lora.r=8"], 888_580), (["lora.r=6", "lora.target_modules=[query,key,value]"], 925_444),
])
def test_roberta_base_counts_from_the_cli(extra, count):
    r = cli("budget", f"model.backbone={ROBERTA}", *extra, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["trainable"] == count


def test_gradient_accumulation_averages_the_loss(tmp_path):
    """grad_accum=2 with half the batch logs the same loss scale as one full batch (not 2x)."""
    first = {}
    for accum, bs in ((1, 32), (2, 16)):
        recipe = load_recipe(None, tiny_overrides(**{"train.grad_accum": accum, "train.batch_size": bs,
                                                     "train.max_steps": 1, "train.group_by_length": "false"}))
        res = train(recipe, run_dir=tmp_path / f"ga{accum}")
        first[accum] = pd.read_csv(res.run_dir / "metrics_steps.csv")["loss"].dropna().iloc[0]
    assert first[2] == pytest.approx(first[1], rel=0.1), first


class ForwardSpy:
    """Records every training forward's loss and correct predictions with a forward hook on the model, apart from
    the trainer's own bookkeeping: (epoch, optimizer step, loss x rows, correct, rows)."""

    def __init__(self):
        from transformers import TrainerCallback

        spy = self
        self.rows, self.epoch, self.step = [], 0, 0

        class _CB(TrainerCallback):
            def on_train_begin(cb, args, state, control, model=None, **kw):  # noqa: N805
                def hook(module, a, kwargs, output):
                    if module.training and kwargs.get("labels") is not None:
                        y = kwargs["labels"]
                        spy.rows.append((spy.epoch, spy.step, float(output.loss) * y.numel(),
                                         int((output.logits.argmax(-1) == y).sum()), y.numel()))
                model.register_forward_hook(hook, with_kwargs=True)

            def on_epoch_begin(cb, args, state, control, **kw):  # noqa: N805
                spy.epoch += 1

            def on_step_begin(cb, args, state, control, **kw):  # noqa: N805
                spy.step = state.global_step + 1

        self.cb = _CB()


def test_epoch_train_loss_and_accuracy_are_exact_means(tmp_path):
    """metrics_epochs.csv: each epoch's training loss and accuracy are the means over all its training rows (not a
    mean of logged windows, which counts the one-step first window as a whole one and misses the steps after the
    last log); metrics_steps.csv: each log's training accuracy covers the steps since the previous log; both
    appear in the workbook and the accuracy plot."""
    spy = ForwardSpy()
    recipe = load_recipe(None, tiny_overrides(**{"train.epochs": 2, "train.logging_steps": 3,
                                                 "data.max_train_samples": 240}))  # 8 batches, the last of 16 rows
    res = train(recipe, run_dir=tmp_path / "run", extra_callbacks=[spy.cb])
    rows = pd.DataFrame(spy.rows, columns=["epoch", "step", "loss_sum", "correct", "n"])
    assert set(rows["epoch"]) == {1, 2} and rows["n"].sum() == 2 * 240
    epochs = pd.read_csv(res.run_dir / "metrics_epochs.csv")
    for e, g in rows.groupby("epoch"):
        row = epochs.set_index("epoch").loc[e]
        assert row["train_loss"] == pytest.approx(g["loss_sum"].sum() / g["n"].sum(), abs=2e-6)
        assert row["train_accuracy"] == pytest.approx(g["correct"].sum() / g["n"].sum(), abs=2e-6)
    steps = pd.read_csv(res.run_dir / "metrics_steps.csv").dropna(subset=["loss"])
    assert steps["train_accuracy"].notna().all()
    prev = 0
    for _, log in steps.iterrows():
        window = rows[(rows["step"] > prev) & (rows["step"] <= log["step"])]
        assert log["train_accuracy"] == pytest.approx(window["correct"].sum() / window["n"].sum(), abs=1e-4)
        prev = log["step"]
    wb = load_workbook(res.run_dir / "metrics.xlsx")
    assert "train_accuracy" in [c.value for c in wb["epochs"][1]]
    assert (res.run_dir / "plots" / "accuracy.png").is_file()
