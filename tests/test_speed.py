"""Speed levers keep results: the fast inference path equals a plain one-by-one forward; the length-grouped
training batches cover every row once per epoch, reshuffle each epoch and hold rows of similar length."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TEST_CSV, tiny_overrides


def newslora_trainer(tmp_path, **overrides):
    """The Trainer newslora would train the tiny recipe with (``setup``: built, not trained)."""
    from newslora.config import load_recipe
    from newslora.train import setup

    return setup(load_recipe(None, tiny_overrides(**overrides)), tmp_path / "run").trainer


def texts_of_varied_length(n: int) -> list[str]:
    from newslora.readers import read_table

    df = read_table(TEST_CSV).head(400)
    lengths = df["text"].str.len()
    picked = df.iloc[np.argsort(lengths.to_numpy())[np.linspace(0, len(df) - 1, n).astype(int)]]
    return picked.sample(frac=1, random_state=0)["text"].tolist()  # unsorted: short and long mixed


def varied_tiny_classifier():
    """A tiny random RoBERTa + LoRA (random B, so the adapter changes the output) whose predictions vary by text."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from conftest import ROBERTA, TINY

    config = AutoConfig.from_pretrained(ROBERTA, num_labels=4, initializer_range=0.5, **TINY)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"],
                                            init_lora_weights=False))
    return model, AutoTokenizer.from_pretrained(ROBERTA)


def test_predict_proba_matches_one_by_one_forward():
    """Fast path (tokenize once, sort by length, padded batches, inference_mode) vs the plain path (one unpadded
    text at a time, in input order): same argmax, probabilities equal to float32 rounding."""
    from newslora.predict import Classifier

    model, tok = varied_tiny_classifier()
    texts = texts_of_varied_length(40)
    fast = Classifier(model, tok, ["a", "b", "c", "d"], max_length=48).predict_proba(texts, batch_size=16)

    model.eval()
    with torch.no_grad():
        plain = np.stack([torch.softmax(model(**tok(t, truncation=True, max_length=48, return_tensors="pt"))
                                        .logits[0], -1).numpy() for t in texts])
    lengths = [len(tok(t, truncation=True, max_length=48)["input_ids"]) for t in texts]
    assert max(lengths) - min(lengths) > 20  # batches really are padded, and sorted differently from the input
    assert len(set(plain.argmax(-1))) >= 3 and np.ptp(plain, axis=0).min() > 0.1  # a mixed-up order would show
    assert fast.shape == plain.shape == (len(texts), 4)
    np.testing.assert_array_equal(fast.argmax(-1), plain.argmax(-1))
    np.testing.assert_allclose(fast, plain, atol=1e-5)


def batch_spread(lengths: np.ndarray, order: list[int], batch_size: int) -> float:
    """Mean over batches of (longest - shortest row)."""
    order = np.asarray(order)
    return float(np.mean([np.ptp(lengths[order[i:i + batch_size]]) for i in range(0, len(order), batch_size)]))


def test_length_grouped_sampler_covers_reshuffles_and_groups(tmp_path):
    trainer = newslora_trainer(tmp_path, **{"data.max_train_samples": 2000, "train.batch_size": 16, "model.max_length": 128})
    assert trainer.args.train_sampling_strategy == "group_by_length"
    ds = trainer.train_dataset
    n, bs = len(ds), trainer.args.per_device_train_batch_size
    lengths = np.asarray(ds["length"])
    sampler = trainer._get_train_sampler()
    epoch1, epoch2 = list(sampler), list(sampler)
    assert sorted(epoch1) == list(range(n)) and sorted(epoch2) == list(range(n))  # every row exactly once
    assert epoch1 != epoch2  # a new order each epoch
    random_spread = np.mean([batch_spread(lengths, np.random.default_rng(s).permutation(n).tolist(), bs)
                             for s in range(5)])
    assert batch_spread(lengths, epoch1, bs) < 0.25 * random_spread
    assert batch_spread(lengths, epoch2, bs) < 0.25 * random_spread

    # the DataLoader the Trainer trains from pads far less than random batches would
    real = padded = rows = 0
    for batch in trainer.get_train_dataloader():
        m = batch["attention_mask"]
        real, padded, rows = real + int(m.sum()), padded + m.numel(), rows + m.shape[0]
        assert "length" not in batch
    assert rows == n
    order = np.random.default_rng(0).permutation(n)
    random_padded = sum(int(lengths[order[i:i + bs]].max()) * len(order[i:i + bs]) for i in range(0, n, bs))
    assert padded < 0.8 * random_padded
    assert real == int(lengths.sum())


def test_random_batches_when_grouping_is_off(tmp_path):
    from torch.utils.data import RandomSampler

    trainer = newslora_trainer(tmp_path, **{"train.group_by_length": "false"})
    assert trainer.args.train_sampling_strategy == "random"
    assert isinstance(trainer._get_train_sampler(), RandomSampler)


@pytest.mark.parametrize("multiple", [None, 8])
def test_fast_collator_equals_datacollatorwithpadding(multiple):
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from conftest import ROBERTA
    from newslora.data import tokenize
    from newslora.train import Collator

    tok = AutoTokenizer.from_pretrained(ROBERTA)
    df = pd.DataFrame({"text": texts_of_varied_length(24), "label": [i % 4 for i in range(24)]})
    ds = tokenize(df, tok, 48, cache=False)
    features = [ds[i] for i in range(len(ds))]
    fast = Collator(tok, pad_to_multiple_of=multiple)(features)
    plain = DataCollatorWithPadding(tok, pad_to_multiple_of=multiple)(
        [{k: v for k, v in f.items() if k != "length"} for f in features])
    assert set(fast) == set(plain) == {"input_ids", "attention_mask", "labels"}
    for k in plain:
        assert fast[k].dtype == plain[k].dtype, k
        assert torch.equal(fast[k], plain[k]), k
    assert len(set(ds["length"])) > 1  # rows really needed padding
    # an extra column (e.g. distillation's teacher_probs) falls back to DataCollatorWithPadding
    extra = Collator(tok)([{**f, "weight": 1.0} for f in features[:4]])
    assert "weight" in extra and torch.equal(extra["input_ids"], Collator(tok)(features[:4])["input_ids"])


def test_cpu_bf16_needs_native_support(monkeypatch):
    from newslora.errors import NewsloraError
    from newslora import trainer as train_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_mod.resolve_precision("fp32") == "fp32"
    assert train_mod.precision_flags("fp32") == {"bf16": False, "fp16": False}
    with pytest.raises(NewsloraError, match="fp16"):
        train_mod.resolve_precision("fp16")
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: False)
    with pytest.raises(NewsloraError, match="bf16"):
        train_mod.resolve_precision("bf16")
    assert train_mod.resolve_precision("auto") == "fp32"  # no native bf16 (AMX or AVX512-BF16): fp32
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: True)
    assert train_mod.resolve_precision("bf16") == "bf16"
    assert train_mod.precision_flags("bf16") == {"bf16": True, "use_cpu": True}
    # native bf16 that measures faster: autocast (its accuracy measured equal); native but slower: fp32
    monkeypatch.setattr(train_mod, "cpu_bf16_speedup", lambda threads=None: 2.0)
    assert train_mod.resolve_precision("auto") == "bf16"
    assert train_mod.cpu_precision_probe("auto") == {"cpu_bf16_speedup": 2.0}
    assert train_mod.cpu_precision_probe("fp32") == {}
    monkeypatch.setattr(train_mod, "cpu_bf16_speedup", lambda threads=None: 0.7)
    assert train_mod.resolve_precision("auto") == "fp32"
    assert train_mod.resolve_precision("bf16") == "bf16"  # asked for by name: still allowed


def test_cpu_bf16_probe_times_real_matmuls(monkeypatch):
    """The probe: 0.0 without native bf16 (nothing timed); with it, a plausible measured ratio, rounded as run.json
    records it, measured once per thread count."""
    from newslora import trainer as train_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: False)
    assert train_mod.cpu_bf16_speedup() == 0.0 and train_mod.cpu_precision_probe("auto") == {}
    train_mod.measure_bf16_speedup.cache_clear()
    torch_threads = torch.get_num_threads()
    ratio = train_mod.measure_bf16_speedup(1)
    assert 0.05 < ratio < 50 and ratio == round(ratio, 2)
    assert torch.get_num_threads() == torch_threads  # measured at 1 thread, this process's count restored
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: True)
    # at a thread count given (the one a search's workers train at): the same cached measurement
    assert train_mod.cpu_bf16_speedup(1) == ratio
    assert train_mod.resolve_precision("auto", 1) == ("bf16" if ratio >= train_mod.BF16_MIN_SPEEDUP else "fp32")
    try:
        torch.set_num_threads(1)
        assert train_mod.cpu_bf16_speedup() == ratio  # the cached measurement at 1 thread
        assert train_mod.cpu_precision_probe("auto") == {"cpu_bf16_speedup": ratio}
        assert train_mod.resolve_precision("auto") == ("bf16" if ratio >= train_mod.BF16_MIN_SPEEDUP else "fp32")
    finally:
        torch.set_num_threads(torch_threads)
    assert train_mod.measure_bf16_speedup.cache_info().currsize == 1


def test_tf32_needs_an_ampere_gpu_and_is_auto_there(monkeypatch):
    from newslora.errors import NewsloraError
    from newslora import trainer as train_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NewsloraError, match="tf32 needs an NVIDIA GPU of the Ampere"):
        train_mod.resolve_precision("tf32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # Turing: no TF32
    with pytest.raises(NewsloraError, match="Ampere"):
        train_mod.resolve_precision("tf32")
    assert train_mod.resolve_precision("auto") == "fp16"  # before Ampere: fp16 autocast
    assert train_mod.precision_flags("fp16") == {"bf16": False, "fp16": True}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    # Ampere or newer: auto is TF32, not autocast (a host-bound step pays for autocast's casts)
    assert train_mod.resolve_precision("auto") == "tf32"
    assert train_mod.precision_flags("tf32") == {"bf16": False, "fp16": False}  # no autocast; no global TF32 switch
    assert train_mod.precision_flags("bf16") == {"bf16": True, "fp16": False}


def test_tf32_is_scoped_to_the_block():
    """TF32 is on for CUDA matmuls inside ``tf32_matmuls`` and back to what it was after it, also after an error,
    so an export in the same process compares the merged model in full fp32."""
    from newslora.train import tf32_matmuls

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with pytest.raises(RuntimeError, match="inside"):
        with tf32_matmuls(True):
            assert matmul.fp32_precision == "tf32"
            raise RuntimeError("inside")
    assert matmul.fp32_precision == before != "tf32"
    with tf32_matmuls(False):
        assert matmul.fp32_precision == before


def test_compile_mode_reaches_the_trainer_only_with_compile_on(tmp_path):
    from newslora.config import load_recipe
    from newslora.errors import NewsloraError

    off = newslora_trainer(tmp_path / "off", **{"train.compile_mode": "reduce-overhead"})
    assert off.args.torch_compile is False and off.args.torch_compile_mode is None
    on = newslora_trainer(tmp_path / "on", **{"train.torch_compile": "true", "train.compile_mode": "reduce-overhead"})
    assert on.args.torch_compile is True and on.args.torch_compile_mode == "reduce-overhead"
    # regional compilation (each encoder block compiled once) with symbolic sizes, scoped to that Trainer
    plugin = on.accelerator.state.dynamo_plugin
    assert plugin.use_regional_compilation is True and plugin.dynamic is True and plugin.mode == "reduce-overhead"
    assert not any(k.startswith("ACCELERATE_DYNAMO_") for k in os.environ)
    whole = newslora_trainer(tmp_path / "whole", **{"train.torch_compile": "true", "train.compile_regions": "false"})
    assert whole.accelerator.state.dynamo_plugin.use_regional_compilation is False
    with pytest.raises(NewsloraError, match="train.compile_mode='fast' is not valid; choose one of: default"):
        load_recipe(None, ["train.compile_mode=fast"])


@pytest.mark.slow  # trains twice; the option's plumbing is covered in the fast loop by the recipe tests
def test_dataloader_workers_train_the_same_run(tmp_path):
    """Batches fetched and padded in a worker process: same batches, same losses as in the main process."""
    from newslora.config import load_recipe
    from newslora.errors import NewsloraError
    from newslora.train import train

    losses = {}
    for workers in (0, 1):
        recipe = load_recipe(None, tiny_overrides(**{"train.max_steps": 6, "train.logging_steps": 1,
                                                     "train.eval_steps": 6, "train.dataloader_workers": workers,
                                                     "data.max_test_samples": 32}))
        run = train(recipe, run_dir=tmp_path / f"w{workers}")
        steps = pd.read_csv(run.run_dir / "metrics_steps.csv").dropna(subset=["loss"])
        losses[workers] = steps["loss"].tolist()
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert newslora_trainer(tmp_path / "dl", **{"train.dataloader_workers": 1}).get_train_dataloader().num_workers == 1
    with pytest.raises(NewsloraError, match="train.dataloader_workers=-1 must be at least 0"):
        load_recipe(None, ["train.dataloader_workers=-1"])


def test_trainer_bookkeeping_shortcuts_keep_flops_and_clipping(tmp_path):
    """NewsloraTrainer's cached FLOP count and trainable-only clipping give the stock Trainer's numbers."""
    from transformers import Trainer

    trainer = newslora_trainer(tmp_path, **{"train.batch_size": "8"})
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    for width in (batch["input_ids"], batch["input_ids"][:, :5]):  # cached per token: any batch shape
        inputs = {**batch, "input_ids": width}
        assert trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(trainer, inputs) > 0

    model.train()
    loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert grads and not frozen_with_grad
    full = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    trainer.args.max_grad_norm = float(full) / 4  # forces clipping by 4x
    norm = trainer._clip_grad_norm(model)
    assert float(norm) == pytest.approx(float(full), rel=1e-6)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n] / 4, rtol=1e-5, atol=1e-8)


def test_resumed_auto_run_keeps_its_precision(tmp_path, monkeypatch):
    """``auto`` is decided once per run folder: a resume keeps the precision run.json recorded (with its probe), even
    where this machine's probe would now choose another; one this machine cannot run is decided again."""
    from newslora import trainer as train_mod
    from newslora.run import Run
    from newslora.train import choose_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(train_mod, "cpu_bf16_speedup", lambda threads=None: 1.8)
    run = Run(tmp_path / "r")
    run.path.mkdir()
    assert choose_precision("auto", run, resuming=False) == ("bf16", {"cpu_bf16_speedup": 1.8})
    run.write_info({"precision": "fp32", "cpu_bf16_speedup": 0.9})
    assert choose_precision("auto", run, resuming=True) == ("fp32", {"cpu_bf16_speedup": 0.9})
    assert choose_precision("fp32", run, resuming=True) == ("fp32", {})  # a named precision is the recipe's
    run.write_info({"precision": "tf32"})  # a GPU run resumed on this CPU
    assert choose_precision("auto", run, resuming=True) == ("bf16", {"cpu_bf16_speedup": 1.8})
