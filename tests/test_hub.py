"""The hub path without a network: ``model.backbone: roberta-base`` and ``data.source: ag_news`` (and the ids the hub
serves them under today, ``FacebookAI/roberta-base`` and ``fancyzhx/ag_news``) load from a local Hugging Face cache
laid out as a download leaves it (tests/hubcache.py: a tiny roberta-base with the real tokenizer, a few hundred AG
News rows), through the same code a connected user runs, with ``HF_HUB_OFFLINE=1``: train, evaluate, predict."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import hubcache

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["model.max_length=48", "data.validation_size=40", "train.max_steps=4", "train.batch_size=16",
            "train.eval_batch_size=64", "train.eval_steps=2", "train.logging_steps=1", "train.lr=3e-3",
            "train.epochs=1"]


def newslora(cache: Path, cwd: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    run_env = {**os.environ, **hubcache.env(cache), "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "newslora", *map(str, args)], cwd=cwd, env=run_env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("backbone, source", [
    ("roberta-base", "ag_news"),
    pytest.param("FacebookAI/roberta-base", "fancyzhx/ag_news", marks=pytest.mark.slow)])  # same path, hub ids
def test_train_evaluate_predict_through_the_hub_cache(hub_cache, tmp_path, backbone, source):
    r = newslora(hub_cache, tmp_path, "train", f"model.backbone={backbone}", f"data.source={source}", *TINY_RUN,
                 "--run-dir", "run")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["label_names"] == hubcache.LABELS  # the hub data set's ClassLabel names
    assert info["rows"] == {"train": 360, "validation": 40, "test": 100}  # the cache's 400 train + 100 test rows
    assert info["trainable"]["total"] < 20_000  # the cache's tiny roberta-base (2 layers, hidden 64), not a download
    # the hub cache's own test split, read from its snapshot as the user's cache holds it
    snapshot = next((hub_cache / "hub" / "datasets--fancyzhx--ag_news" / "snapshots").iterdir())
    test_parquet = snapshot / "data" / "test-00000-of-00001.parquet"
    r = newslora(hub_cache, tmp_path, "evaluate", run, "--data", test_parquet, "--output", "eval.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == len(pd.read_parquet(test_parquet))
    # the competition's form: a pickled datasets.Dataset of texts, unpickled only with --trust-pickle
    import datasets

    texts = pd.read_parquet(test_parquet)["text"].head(30).tolist()
    (tmp_path / "test.pkl").write_bytes(pickle.dumps(datasets.Dataset.from_dict({"text": texts})))
    r = newslora(hub_cache, tmp_path, "predict", run, "-i", "test.pkl", "-o", "submission.csv", "--trust-pickle")
    assert r.returncode == 0, r.stderr[-3000:]
    sub = pd.read_csv(tmp_path / "submission.csv")
    assert list(sub.columns) == ["ID", "Label"] and len(sub) == 30 and sub["Label"].between(0, 3).all()


def test_the_alias_loads_the_hub_id_not_a_folder_of_that_name(hub_cache, tmp_path):
    """``roberta-base`` reads FacebookAI/roberta-base's snapshot: the tiny config the cache holds (2 layers)."""
    code = ("from newslora.families import resolve_backbone; from newslora.model import load_tokenizer;"
            " from transformers import AutoConfig;"
            "print(resolve_backbone('roberta-base'), AutoConfig.from_pretrained(resolve_backbone('roberta-base'))"
            ".num_hidden_layers, load_tokenizer('roberta-base').vocab_size)")
    env = {**os.environ, **hubcache.env(hub_cache), "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["FacebookAI/roberta-base", "2", "50265"], out.stderr[-2000:]


def test_the_hub_ids_read_the_same_cache(hub_cache, tmp_path):
    """``FacebookAI/roberta-base`` and ``fancyzhx/ag_news`` as written: the count and the data set's rows."""
    r = newslora(hub_cache, tmp_path, "budget", "model.backbone=FacebookAI/roberta-base",
                 "data.source=fancyzhx/ag_news", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["trainable"] < 20_000  # the cache's tiny model
    code = ("from newslora.config import DataConfig; from newslora.data import load_splits;"
            "s = load_splits(DataConfig(source='fancyzhx/ag_news', validation_size=40));"
            "print(len(s.train), len(s.validation), len(s.test), *s.label_names)")
    env = {**os.environ, **hubcache.env(hub_cache), "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["360", "40", "100", *hubcache.LABELS], out.stderr[-2000:]

