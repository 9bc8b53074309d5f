"""A local Hugging Face cache laid out as a download leaves it, for the hub path without a network.

``build(root)`` writes, under ``root``:

- ``hub/models--FacebookAI--roberta-base``: ``blobs/``, ``refs/main`` and ``snapshots/<sha>/`` (relative symlinks
  into ``blobs/``, as ``huggingface_hub`` writes them) with the shared roberta-base tokenizer, its config shrunk to
  a tiny model (2 layers, hidden size 64) and that tiny model's random weights as ``model.safetensors``;
- ``hub/datasets--fancyzhx--ag_news``: the data set repository as the hub serves it: ``README.md`` (its card, the
  ``dataset_info`` features and ``configs`` data files) and ``data/{train,test}-00000-of-00001.parquet`` made from
  a few hundred rows of the shared AG News CSVs;
- ``datasets/fancyzhx___ag_news/default/0.0.0/<sha>/``: the Arrow cache ``datasets.load_dataset`` prepares from
  those parquet files on a first, connected load (what it reads again with ``HF_HUB_OFFLINE=1``).

``env(root)`` gives the environment variables (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_DATASETS_CACHE``, offline
switches) under which ``model.backbone: roberta-base`` and ``data.source: ag_news`` resolve to that cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd

SHARED = Path(os.environ.get("NEWSLORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODEL_ID = "FacebookAI/roberta-base"
DATASET_ID = "fancyzhx/ag_news"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
CARD = """---
language:
- en
task_categories:
- text-classification
pretty_name: AG News
dataset_info:
  features:
  - name: text
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': World
          '1': Sports
          '2': Business
          '3': Sci/Tech
  splits:
  - name: train
    num_examples: {train}
  - name: test
    num_examples: {test}
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
# AG News (a few hundred rows, for tests)
"""


def env(root: Path) -> dict[str, str]:
    root = Path(root)
    return {"HF_HOME": str(root), "HF_HUB_CACHE": str(root / "hub"), "HF_DATASETS_CACHE": str(root / "datasets"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _repo(hub: Path, kind: str, repo_id: str, files: dict[str, bytes]) -> Path:
    """One cached repository: each file a blob named by its hash, linked from ``snapshots/<sha>/``."""
    folder = hub / f"{kind}--{repo_id.replace('/', '--')}"
    sha = hashlib.sha1(b"".join(hashlib.sha1(f.encode() + b).digest() for f, b in sorted(files.items()))).hexdigest()
    snapshot = folder / "snapshots" / sha
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(sha)
    return snapshot


def _model_files(tmp: Path) -> dict[str, bytes]:
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    src = SHARED / "models" / "roberta-base"
    config = json.loads((src / "config.json").read_text())
    config.update(TINY)
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(AutoConfig.for_model(**config)).save_pretrained(tmp)  # model.safetensors
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.name != "config.json"}
    files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    files["model.safetensors"] = (tmp / "model.safetensors").read_bytes()
    return files


def _ag_news_frames(rows: int) -> dict[str, pd.DataFrame]:
    train = pd.read_csv(SHARED / "data" / "ag_news" / "train_sample.csv").sample(rows, random_state=0)
    test = pd.read_csv(SHARED / "data" / "ag_news" / "test.csv", header=None, names=["label", "title", "text"])
    test = test.head(rows // 4)
    test = pd.DataFrame({"text": test["title"] + " " + test["text"], "label": test["label"] - 1})
    return {"train": train[["text", "label"]].reset_index(drop=True), "test": test}


def _prepare_arrow(cache: Path, snapshot: Path, sha: str) -> None:
    """The Arrow cache a connected ``load_dataset("fancyzhx/ag_news")`` leaves: the parquet builder over the
    snapshot's files, under the repository's name, config ``default`` and the snapshot's commit."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=LABELS)})
    files = {s: [str(p) for p in sorted((snapshot / "data").glob(f"{s}-*.parquet"))] for s in ("train", "test")}
    builder = datasets.load_dataset_builder("parquet", data_files=files, features=features,
                                            cache_dir=str(cache / "build"))
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    target = cache / f"{DATASET_ID.replace('/', '___')}" / "default" / "0.0.0" / sha
    target.mkdir(parents=True)
    for f in built.iterdir():  # parquet-<split>.arrow -> ag_news-<split>.arrow, as the hub builder names them
        shutil.copy(f, target / f.name.replace("parquet-", "ag_news-"))
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(builder_name="parquet", dataset_name="ag_news", config_name="default")
    (target / "dataset_info.json").write_text(json.dumps(info))
    shutil.rmtree(cache / "build")


def build(root: Path, rows: int = 400) -> Path:
    """Write the cache under ``root`` (see the module docstring); returns ``root``."""
    root = Path(root)
    hub = root / "hub"
    _repo(hub, "models", MODEL_ID, _model_files(root / "tmp-model"))
    shutil.rmtree(root / "tmp-model")
    frames = _ag_news_frames(rows)
    files = {"README.md": CARD.replace("{train}", str(len(frames["train"]))).replace("{test}", str(len(frames["test"])))
             .encode()}
    for split, df in frames.items():
        path = root / f"tmp-{split}.parquet"
        df.to_parquet(path, index=False)
        files[f"data/{split}-00000-of-00001.parquet"] = path.read_bytes()
        path.unlink()
    snapshot = _repo(hub, "datasets", DATASET_ID, files)
    _prepare_arrow(root / "datasets", snapshot, snapshot.name)
    return root
