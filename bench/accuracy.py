"""Accuracy under the budget: newslora recipes beside the baselines, on one fixed protocol.

    HF_HUB_OFFLINE=1 python bench/accuracy.py                         # the default table (see RECIPES)
    HF_HUB_OFFLINE=1 python bench/accuracy.py --recipes tfidf,plain,all-r24 --seeds 2
    HF_HUB_OFFLINE=1 python bench/accuracy.py --list                  # the recipes it knows
    # base size (after `bash scripts/install_mpnet.sh`), its own rows and table:
    HF_HUB_OFFLINE=1 python bench/accuracy.py --recipes mpnet-qv-r8,mpnet-all-lorahead,mpnet-qkv-r6,mpnet-all-r2 --rows 6000 \
        --val-rows 1000 --workdir runs/accuracy-mpnet --reference mpnet-qv-r8 --table mpnet
    HF_HUB_OFFLINE=1 python bench/accuracy.py --recipes mpnet-qv-r8,mpnet-all-r2-ep2 --rows 6000 --val-rows 1000 \
        --workdir runs/accuracy-mpnet --reference mpnet-qv-r8 --table mpnet2     # the best base-size recipe, 2 epochs
    # the bf16 decision: all-r24 in fp32 and in bf16 autocast, 6,000 rows, 2 seeds, paired on validation
    HF_HUB_OFFLINE=1 python bench/accuracy.py --recipes all-fp32,all-bf16 --rows 6000 --seeds 2 --workdir runs/accuracy-bf16 \
        --reference all-fp32 --table bf16
    # base size on every row (after `bash scripts/install_mpnet.sh`; hours each on 2 cores, resumable):
    HF_HUB_OFFLINE=1 python bench/accuracy.py --recipes mpfull-all-r2-ep2,mpfull-qv-r8,mpfull-qv-r8-ep2 --reference mpfull-qv-r8 --table mpnet-full
    # the ceiling (full fine-tuning of MiniLM, lr chosen on validation) on all rows:
    HF_HUB_OFFLINE=1 python bench/accuracy.py --recipes ceil-lr5e-5,ceil-lr1e-4,ceiling --reference ceil-lr5e-5 --table ceiling
    # unlabelled text: 3,000 labelled rows, the other training texts without labels
    HF_HUB_OFFLINE=1 python bench/accuracy.py --recipes tfidf,plain,unl-teacher,unl-w0.5,unl-w1,unl-chosen,unl6k-w1 --rows 3000 \
        --workdir runs/accuracy-unl --reference unl-teacher --table unlabelled
    # the fast variant on all rows (fast-full: fast-ep1 read on test only if it trained within plain's time):
    HF_HUB_OFFLINE=1 python bench/accuracy.py --recipes tfidf,plain,fast-ep1,fast-full --workdir runs/accuracy --reference plain --table fast-full

Protocol (the same rows for every recipe, baselines included):
- train: ``../shared/data/ag_news/train_sample.csv`` minus every row whose text also appears in the test set
  (normalised: case and whitespace), minus a seeded, stratified 2,000-row validation split, minus training rows
  whose text appears in that validation split. ``--rows N`` keeps a stratified N-row subset for quick runs.
- validation: the 2,000 rows; every choice (checkpoint, hyper-parameter, lever) is made on it.
- test: the official 7,600 rows, evaluated only for recipes marked ``final`` (the baselines and the shipped
  recipes). Lever recipes report validation only.
The split is written once to ``WORKDIR/data/{train,validation,test}.csv`` (with a manifest); every recipe reads
those files, so the baselines and newslora see the same rows.

Recipes:
- ``tfidf``: ``newslora.baseline`` (TF-IDF words + characters, logistic regression), one fixed configuration.
- ``plain``: what a user writes by hand: HF ``Trainer`` + PEFT LoRA r=8 on query/value, lr 1e-3, batch 32,
  max_length 128, 1 epoch, ``DataCollatorWithPadding``, the Trainer's defaults otherwise.
- everything else: ``newslora train --config ... overrides`` in a subprocess, read back from its run folder
  (run.json, eval.json), then ``newslora predict`` on the validation file for paired comparisons.

A finished recipe/seed is never retrained (its result file is reused); an interrupted newslora run continues
with ``--resume``. The table goes to stdout and between the markers of ``bench/ACCURACY.md``.

Paired comparison: for every newslora recipe and seed, the validation predictions are compared row by row
with those of ``--reference`` (same seed): the difference in accuracy and its standard error (the spread of
the per-row differences). A lever counts when the difference is >= 0.5 pt and >= 2 standard errors.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
TRAIN_CSV = SHARED / "data" / "ag_news" / "train_sample.csv"
TEST_CSV = SHARED / "data" / "ag_news" / "test.csv"


def markers(table: str) -> tuple[str, str]:
    """The comment pair around one table of bench/ACCURACY.md: ``main`` is the MiniLM sweep, others are named."""
    tag = "accuracy-table" if table == "main" else f"accuracy-table-{table}"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ----------------------------------------------------------------------------- recipes

# MiniLM, LoRA on all six linear kinds at the largest rank that fits (r=24: 996,868), 1 epoch: the reference
# every lever is compared against (one change at a time). Validation (and a checkpoint) every 160 steps, four
# times an epoch: an interrupted run resumes from its last checkpoint instead of from the start.
ALL = ["model.backbone=minilm", "model.max_length=128", "lora.target_modules=[query,key,value,attention.output.dense,"
       "intermediate.dense,output.dense]", "lora.r=24", "lora.alpha=48", "lora.dropout=0.1", "train.lr=5e-4",
       "train.epochs=1", "train.batch_size=32", "train.eval_batch_size=256", "train.eval_steps=160",
       "train.early_stopping_patience=null", "train.logging_steps=50"]

# mpnet-base, 1 epoch at batch 16; validation and a checkpoint three times an epoch on 6,000 rows. fp32 whatever the
# CPU, so every mpnet-base row of ACCURACY.md trains in the same precision.
MP = ["model.backbone=mpnet-base", "model.max_length=128", "lora.dropout=0.1", "train.lr=5e-4", "train.epochs=1",
      "train.precision=fp32", "train.batch_size=16", "train.eval_batch_size=128", "train.eval_steps=125",
      "train.early_stopping_patience=null", "train.logging_steps=25"]

ALL3 = [*ALL, "train.epochs=3"]
FAST = [*ALL, "model.max_length=64", "train.lr=1e-3", "train.eval_steps=null"]

# mpnet-base on a GPU: 3 epochs at batch 32 over the whole training split, validation twice an epoch
MPG = ["model.backbone=mpnet-base", "model.max_length=128", "lora.dropout=0.1", "train.lr=5e-4", "train.epochs=3",
       "train.batch_size=32", "train.eval_batch_size=256", "train.eval_steps=320",
       "train.early_stopping_patience=null", "train.logging_steps=50"]

# protocol smoke tests (tests/test_accuracy_bench.py): a 2-layer random-init roberta, 4 steps
TINY = ["model.backbone=../shared/models/roberta-base", "model.random_init=true",
        "model.config_overrides={num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2}",
        "model.max_length=32", "train.max_steps=4", "train.eval_steps=null", "train.early_stopping_patience=null",
        "train.logging_steps=2", "train.batch_size=8", "train.eval_batch_size=64"]

# one change each, applied to the 1-epoch reference (``all-<lever>``, against all-r24) and to the 3-epoch recipe
# (``ep3-<lever>``, against all-ep3: the GPU sweep's levers, judged at the schedule they would ship with)
LEVERS = {
    "lr1e-3": (["train.lr=1e-3"], "lr 1e-3"),
    "lr2e-3": (["train.lr=2e-3"], "lr 2e-3"),
    "lr2.5e-4": (["train.lr=2.5e-4"], "lr 2.5e-4"),
    "loraplus": (["method=loraplus"], "LoRA+ (lr of B = 16 x lr of A)"),
    "rslora": (["method=rslora"], "rsLoRA (scale alpha/sqrt(r))"),
    "dora": (["method=dora", "budget.auto_fit=true"], "DoRA (magnitude vectors; rank auto-fitted)"),
    "pissa": (["method=pissa"], "PiSSA init"),
    "bias": (["lora.bias=all", "budget.auto_fit=true"], "biases trained (rank auto-fitted)"),
    "alpha96": (["lora.alpha=96"], "alpha 96 (4 r)"),
    "ls0.1": (["train.label_smoothing=0.1"], "label smoothing 0.1"),
    "warmup0.1": (["train.warmup=0.1"], "10% warmup"),
    "cosine": (["train.scheduler=cosine"], "cosine decay"),
    "ml64": (["model.max_length=64"], "max_length 64"),
    # the precision decision (issue: bf16 on CPUs that have it): both explicit, so neither follows ``auto``
    "fp32": (["train.precision=fp32"], "fp32"),
    "bf16": (["train.precision=bf16"], "bf16 autocast"),
}

# mpnet-base (all-mpnet-base-v2: 12 layers x 768, head of roberta-base's exact shape, so every count is
# roberta-base's): the seeds' query/value recipe, q/k/v, and all six linear kinds with the full head (r=2, the
# largest that fits beside it) or with the head's 593,668 parameters freed for the adapters (LoRA head, r=5).
# ``mpnet-<layout>``: the CPU schedule (MP, run with --rows 6000 --val-rows 1000 --table mpnet);
# ``mpg-<layout>``: the GPU schedule on the whole training split (MPG).
LAYOUTS = {
    "qv-r8": (["lora.target_modules=[q,v]", "lora.r=8", "lora.alpha=16"], "the seeds' LoRA r=8 on q,v, full head"),
    "qkv-r6": (["lora.target_modules=[q,k,v]", "lora.r=6", "lora.alpha=12"], "LoRA r=6 on q,k,v, full head"),
    "all-lorahead": (["lora.target_modules=[q,k,v,o,ffn_in,ffn_out]", "lora.r=5", "lora.alpha=10", "head.type=lora"],
                     "LoRA r=5 (largest that fits) on all six linear kinds, LoRA head"),
    "all-r2": (["lora.target_modules=[q,k,v,o,ffn_in,ffn_out]", "lora.r=2", "lora.alpha=4"],
               "LoRA r=2 on all six linear kinds, full head"),
}

RECIPES: dict[str, dict] = {
    "tfidf": {"kind": "tfidf", "final": True, "what": "TF-IDF words 1-2 + chars 2-5, logistic regression"},
    "plain": {"kind": "plain", "final": True, "what": "HF Trainer + PEFT: LoRA r=8 query/value, lr 1e-3, 1 epoch"},
    "qv-r8": {"config": "configs/demo.yaml", "what": "newslora, the plain recipe's settings (r=8 query/value, "
              "lr 1e-3, 1 epoch, max_length 128)",
              "overrides": ["model.backbone=minilm", "model.max_length=128", "lora.target_modules=[query,value]",
                            "lora.r=8", "lora.alpha=16", "lora.dropout=0.1", "train.lr=1e-3", "train.epochs=1",
                            "train.batch_size=32", "train.eval_steps=null", "train.early_stopping_patience=null",
                            "train.eval_batch_size=256", "train.logging_steps=50"]},
    "all-r24": {"config": "configs/demo.yaml", "overrides": ALL, "what": "all six linear kinds, r=24, alpha 48, "
                "lr 5e-4, 1 epoch"},
    "all-ep2": {"config": "configs/demo.yaml", "overrides": [*ALL, "train.epochs=2"], "what": "2 epochs"},
    "all-ep3": {"config": "configs/demo.yaml", "overrides": [*ALL, "train.epochs=3"], "what": "3 epochs"},
    # configs/minilm-best.yaml: the lever run with the best validation accuracy, read once on the test set
    "minilm-best": {"test_of": "all-ep2", "final": True,
                    "what": "configs/minilm-best.yaml: all six linear kinds, r=24, 2 epochs (the all-ep2 run)"},
    "qv-autofit": {"config": "configs/demo.yaml", "overrides": [*ALL, "lora.target_modules=[query,value]",
                                                                "budget.auto_fit=true"],
                   "what": "query/value only, rank auto-fitted"},
    "all-ep5": {"config": "configs/demo.yaml", "overrides": [*ALL, "train.epochs=5"], "what": "5 epochs"},
    # the recipe with the best validation accuracy among the MiniLM runs of the GPU sweep, read on the test set
    "minilm-best-gpu": {"best_of": ["all-r24", "all-ep2", "all-ep3", "all-ep5", "ep3-loraplus", "ep3-dora",
                                    "ep3-rslora", "ep3-ls0.1", "ep3-lr1e-3", "ep3-lr2.5e-4", "ep3-cosine",
                                    "ep3-alpha96", "ep3-bias"], "final": True,
                        "what": "the GPU sweep's best MiniLM recipe on validation, read once on the test set"},
    # distillation: the 3-epoch recipe taught by mpg-all-r2 (an mpnet-base run, seed 42, of the same workdir);
    # the setting is chosen on the mean validation accuracy of seeds 42-44, and compared with all-ep3 on test
    **{f"kd-t2-a{a}": {"config": "configs/demo.yaml", "teacher": "mpg-all-r2",
                       "overrides": [*ALL3, "distill.temperature=2", f"distill.alpha={a}"],
                       "what": f"3 epochs, distilled from mpg-all-r2, T=2, alpha {a}"} for a in ("0.5", "0.2")},
    "kd-chosen": {"best_of": ["kd-t2-a0.5", "kd-t2-a0.2"], "choose_seeds": 3, "final": True,
                  "what": "the distillation setting with the best mean validation (seeds 42-44), on the test set"},
    "ep3-test": {"test_of": "all-ep3", "final": True,
                 "what": "all-ep3 (no distillation) on the test set, beside kd-chosen"},
    # distillation on 2 CPU cores (--rows 6000): the 1-epoch reference taught by an mpnet-base run of the same rows
    # (all-r2 layout, the CPU schedule, validated once at the end); alpha (0.5 or 0.2, T=2) chosen on seed 42's validation, then
    # the chosen setting and all-r24 over seeds 42-44, both read on the test set
    "mpnet-teacher": {"config": "configs/demo.yaml", "overrides": [*MP, *LAYOUTS["all-r2"][0], "train.eval_steps=null"],
                      "what": "mpnet-base teacher: LoRA r=2 on all six linear kinds, full head, 1 epoch"},
    **{f"kd1-a{a}": {"config": "configs/demo.yaml", "teacher": "mpnet-teacher",
                     "overrides": [*ALL, "distill.temperature=2", f"distill.alpha={a}"],
                     "what": f"all-r24 distilled from mpnet-teacher, T=2, alpha {a}"} for a in ("0.5", "0.2")},
    "kd1-chosen": {"best_of": ["kd1-a0.5", "kd1-a0.2"], "final": True,
                   "what": "the distillation setting with the better validation (seed 42), on the test set"},
    "r24-test": {"test_of": "all-r24", "final": True, "what": "all-r24 (no distillation) on the test set"},
    # the fast variant: the two levers that saved time or gained at 1 epoch (max_length 64, lr 1e-3), validated
    # once at the end; the best on validation among those that train no longer than the plain recipe
    **{f"fast-ep{e}": {"config": "configs/demo.yaml", "overrides": [*FAST, f"train.epochs={e}"],
                       "what": f"max_length 64, lr 1e-3, {e} epoch{'' if e == '1' else 's'}, validated at the end"} for e in ("1", "1.5", "2")},
    "fast": {"best_of": ["fast-ep2", "fast-ep1.5", "fast-ep1"], "within_time_of": "plain", "final": True,
             "what": "the fast variant: the best fast-ep* on validation that trains within plain's time, on the test set"},
    # base size, 2 epochs: the all-r2 layout (configs/roberta-best.yaml's) on the CPU schedule, validated (and
    # checkpointed) twice an epoch, read on the test set
    "mpnet-all-r2-ep2": {"config": "configs/demo.yaml", "final": True,
                         "overrides": [*MP, *LAYOUTS["all-r2"][0], "train.epochs=2", "train.eval_steps=188"],
                         "what": "mpnet-base, LoRA r=2 on all six linear kinds, full head, 2 epochs"},
    # base size on every row (20,490): validation and a checkpoint three times an epoch (1,281 steps at batch 16), so
    # a run of hours continues from its last checkpoint after an interruption; each read once on the test set
    "mpfull-all-r2-ep2": {"config": "configs/demo.yaml", "final": True,
                          "overrides": [*MP, *LAYOUTS["all-r2"][0], "train.epochs=2", "train.eval_steps=427"],
                          "what": "mpnet-base, all rows, LoRA r=2 on all six linear kinds, full head, 2 epochs"},
    **{f"mpfull-qv-r8{sfx}": {"config": "configs/demo.yaml", "final": True,
                              "overrides": [*MP, *LAYOUTS["qv-r8"][0], f"train.epochs={ep}", "train.eval_steps=427"],
                              "what": f"mpnet-base, all rows, the seeds' LoRA r=8 on q,v, {ep} epoch{'s' if ep > 1 else ''}"}
       for sfx, ep in (("", 1), ("-ep2", 2))},
    # the fast variant on all rows: fast-ep1 alone (the candidate chosen at 6,000 rows), read on the test set only
    # if it trained within plain's time
    "fast-full": {"best_of": ["fast-ep1"], "within_time_of": "plain", "final": True,
                  "what": "the fast variant (fast-ep1) if it trains within plain's time, on the test set"},
    # the ceiling: every weight of MiniLM trains (over the budget: the reference the budget is measured against),
    # 2 epochs, validation (4 times an epoch) keeps the best checkpoint; the learning rate is chosen on validation
    # between 5e-5 and 1e-4 (the usual range for a 6-layer encoder; 2e-5 is there to extend it downwards)
    **{f"ceil-lr{lr}": {"kind": "full", "lr": float(lr), "epochs": 2, "what": f"full fine-tuning of MiniLM (every "
                        f"weight, over the budget), lr {lr}, 2 epochs, best validation checkpoint"}
       for lr in ("2e-5", "5e-5", "1e-4")},
    "ceiling": {"best_of": ["ceil-lr5e-5", "ceil-lr1e-4"], "final": True,
                "what": "the ceiling: the full fine-tuning run with the best validation, read once on the test set"},
    "tiny-full": {"kind": "full", "lr": 1e-3, "epochs": 1, "tiny": True,
                  "what": "protocol smoke test: full fine-tuning of a 2-layer random-init roberta"},
    "tiny-ceiling": {"best_of": ["tiny-full"], "final": True,
                     "what": "protocol smoke test: tiny-full's best checkpoint, read on the test set"},
    # unlabelled text (run with --rows 3000, the demo's labelled rows): the teacher is the demo's recipe on the labelled
    # rows; the student (the same recipe, 1 epoch over labelled + unlabelled rows) learns the teacher's soft labels
    # on the texts --rows left out (labels dropped) or 6,000 of them; the weight of an unlabelled row is chosen on
    # validation, and the choice is read on the test set beside the teacher (the same recipe on labelled rows alone)
    "unl-teacher": {"config": "configs/demo.yaml", "final": True, "overrides": ALL3,
                    "what": "the demo's recipe (all six kinds r=24, 3 epochs) on the labelled rows alone"},
    **{f"unl-w{w}": {"config": "configs/demo.yaml", "teacher": "unl-teacher", "unlabelled": "unlabelled.csv",
                     "overrides": [*ALL, "distill.temperature=2", "distill.alpha=0.5", f"distill.unlabelled_weight={w}"],
                     "what": f"1 epoch over labelled + all unlabelled rows, taught by unl-teacher, unlabelled weight {w}"}
       for w in ("0.5", "1")},
    "unl-chosen": {"best_of": ["unl-w0.5", "unl-w1"], "final": True,
                   "what": "the unlabelled weight with the better validation, on the test set"},
    "unl-w1-test": {"test_of": "unl-w1", "final": True,
                    "what": "unl-w1 (unlabelled weight 1, fixed, not chosen), on the test set"},
    "unl6k-w1": {"config": "configs/demo.yaml", "teacher": "unl-teacher", "unlabelled": "unlabelled-6000.csv",
                 "final": True, "overrides": [*ALL, "distill.temperature=2", "distill.alpha=0.5",
                                              "distill.unlabelled_weight=1"],
                 "what": "1 epoch over labelled + 6,000 unlabelled rows, taught by unl-teacher, unlabelled weight 1"},
    "tiny-unl": {"config": "configs/demo.yaml", "teacher": "tiny", "unlabelled": "unlabelled.csv", "overrides": TINY,
                 "what": "protocol smoke test: tiny taught by tiny on the unlabelled rows"},
    "tiny": {"config": "configs/demo.yaml", "what": "protocol smoke test: 2-layer random-init roberta",
             "overrides": TINY},
    "tiny-chosen": {"test_of": "tiny", "final": True, "what": "protocol smoke test: tiny's run, read on the test set"},
    "tiny-lr": {"config": "configs/demo.yaml", "what": "protocol smoke test: tiny at lr 1e-3",
                "overrides": [*TINY, "train.lr=1e-3"]},
    "tiny-best": {"best_of": ["tiny", "tiny-lr"], "final": True,
                  "what": "protocol smoke test: the better of tiny and tiny-lr on validation, on the test set"},
    "tiny-kd": {"config": "configs/demo.yaml", "teacher": ["tiny", "tiny-lr"], "overrides": TINY,
                "what": "protocol smoke test: tiny taught by tiny and tiny-lr, averaged"},
}
for _layout, (_changes, _what) in LAYOUTS.items():
    for _prefix, _schedule in (("mpnet", MP), ("mpg", MPG)):
        RECIPES[f"{_prefix}-{_layout}"] = {"config": "configs/demo.yaml", "final": True,
                                           "overrides": [*_schedule, *_changes], "what": f"mpnet-base, {_what}"}
for _lever, (_changes, _what) in LEVERS.items():
    RECIPES[f"all-{_lever}"] = {"config": "configs/demo.yaml", "overrides": [*ALL, *_changes], "what": _what}
    RECIPES[f"ep3-{_lever}"] = {"config": "configs/demo.yaml", "overrides": [*ALL3, *_changes],
                                "what": f"3 epochs, {_what}"}
DEFAULT = ["tfidf", "plain", "all-r24", "all-lr1e-3", "all-loraplus", "all-rslora", "all-ep2", "all-ls0.1",
           "all-dora", "all-ml64", "qv-r8"]


# ----------------------------------------------------------------------------- the split


def normalise(texts):
    return texts.astype(str).str.lower().str.replace(r"\s+", " ", regex=True).str.strip()


def prepare_data(workdir: Path, source: Path, test: Path, rows: int | None, val_rows: int, test_rows: int | None,
                 seed: int = 42) -> dict:
    """Write the protocol's three files once; later calls with the same options reuse them."""
    from sklearn.model_selection import train_test_split

    from newslora.data import encode_labels
    from newslora.readers import read_table

    out = workdir / "data"
    key = {"source": str(source.resolve()), "test": str(test.resolve()), "rows": rows, "val_rows": val_rows,
           "test_rows": test_rows, "seed": seed}
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text())["key"] == key:
        return json.loads(manifest.read_text())
    pool, _ = encode_labels(read_table(source), None, str(source))
    test_df, _ = encode_labels(read_table(test), None, str(test))
    pool, test_df = pool[["text", "label"]], test_df[["text", "label"]]
    if test_rows and test_rows < len(test_df):
        test_df, _ = train_test_split(test_df, train_size=test_rows, random_state=seed, stratify=test_df["label"])
    in_test = normalise(pool["text"]).isin(set(normalise(test_df["text"])))
    pool = pool[~in_test]
    train, val = train_test_split(pool, test_size=val_rows, random_state=seed, stratify=pool["label"])
    in_val = normalise(train["text"]).isin(set(normalise(val["text"])))
    train = train[~in_val]
    unlabelled = train.iloc[:0]
    if rows and rows < len(train):
        train, unlabelled = train_test_split(train, train_size=rows, random_state=seed, stratify=train["label"])
    check_disjoint(train, val, test_df)
    unlabelled = unlabelled[~normalise(unlabelled["text"]).isin(set(normalise(train["text"])))]
    unlabelled = unlabelled[~normalise(unlabelled["text"]).duplicated()]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, df in (("train", train), ("validation", val), ("test", test_df)):
        df.to_csv(tmp / f"{name}.csv", index=False)
    # the training rows --rows left out, labels dropped: the unlabelled-text lever's files (all, and 6,000 of them)
    unlabelled[["text"]].to_csv(tmp / "unlabelled.csv", index=False)
    unlabelled[["text"]].sample(n=min(6000, len(unlabelled)), random_state=seed).to_csv(tmp / "unlabelled-6000.csv",
                                                                                        index=False)
    info = {"key": key, "rows": {"train": len(train), "validation": len(val), "test": len(test_df)},
            "dropped": {"train_in_test": int(in_test.sum()), "train_in_validation": int(in_val.sum())}}
    (tmp / "manifest.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def check_disjoint(train, val, test) -> None:
    """No text may be in two splits; a leak is a bug in the protocol, so it stops the bench."""
    sets = {n: set(normalise(df["text"])) for n, df in (("train", train), ("validation", val), ("test", test))}
    for a, b in (("train", "test"), ("validation", "test"), ("train", "validation")):
        common = sets[a] & sets[b]
        if common:
            raise SystemExit(f"error: {len(common)} text(s) in both {a} and {b}, e.g. {sorted(common)[0][:80]!r}")


# ----------------------------------------------------------------------------- running one recipe


def newslora_cli() -> list[str]:
    exe = Path(sys.executable).with_name("newslora")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "newslora.cli"]


def choose(spec: dict, workdir: Path) -> tuple[str, dict]:
    """The candidate of ``spec["best_of"]`` with the highest mean validation accuracy over seeds 42 ..
    42 + ``choose_seeds`` - 1 (ties: the first listed), from the stored results; every candidate must be finished.
    With ``within_time_of``, only candidates whose training took no longer than that recipe's compete."""
    n, means, seconds = spec.get("choose_seeds", 1), {}, {}
    limit = spec.get("within_time_of")
    for cand in spec["best_of"] + ([limit] if limit else []):
        files = [workdir / "results" / f"{cand}-s{s}.json" for s in range(42, 42 + n)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise RuntimeError(f"cannot choose among {spec['best_of']}: {', '.join(missing)} not finished")
        runs = [json.loads(f.read_text()) for f in files]
        means[cand] = statistics.mean(r["validation"]["accuracy"] for r in runs)
        if limit:
            seconds[cand] = statistics.mean(r["train_seconds"] for r in runs)
    # within_time_of: only candidates that trained in no more seconds (mean over the seeds) than that recipe
    ok = [c for c in spec["best_of"] if not limit or seconds[c] <= seconds[limit]]
    if not ok:
        raise RuntimeError(f"no candidate of {spec['best_of']} trained within {limit}'s {seconds[limit]:.0f} s: "
                           + ", ".join(f"{c} {seconds[c]:.0f} s" for c in spec["best_of"]))
    return max(ok, key=lambda c: (means[c], -spec["best_of"].index(c))), {c: means[c] for c in spec["best_of"]}


def run_chosen(name: str, spec: dict, seed: int, data: Path, workdir: Path, log) -> dict:
    """A recipe chosen on validation among the lever runs: the finished run of ``spec["test_of"]`` (or of the
    best of ``spec["best_of"]``, see :func:`choose`), same seed, is evaluated on the test set once (the result is
    kept), instead of being trained again."""
    from newslora.run import Run

    chosen, means = (choose(spec, workdir) if spec.get("best_of") else (spec["test_of"], None))
    if RECIPES[chosen].get("kind") == "full":  # its own worker keeps the best checkpoint and reads the test set
        res = run_full(chosen, RECIPES[chosen], seed, data, workdir, log)
        test = run_full(chosen, RECIPES[chosen], seed, data, workdir, log, test=True)["test"]
        return {**res, "recipe": name, "chosen": chosen, **({"choice_validation": means} if means else {}),
                "test": test}
    src = workdir / "runs" / f"{chosen}-s{seed}"
    if not (src.is_dir() and Run(src).status() == "completed"):
        raise RuntimeError(f"{name} is the test of {chosen}'s run, which is not finished: run --recipes "
                           f"{chosen} first")
    out = workdir / "results" / f"{name}-s{seed}.test.json"
    if not out.is_file():
        call([*newslora_cli(), "evaluate", str(src), "--data", str(data / "test.csv"), "--output", str(out),
              "--overwrite"], log)
    stored = workdir / "results" / f"{chosen}-s{seed}.json"  # the lever's row, if the sweep wrote it
    res = (json.loads(stored.read_text()) if stored.is_file()
           else run_newslora(chosen, RECIPES[chosen], seed, data, workdir, log))
    return {**res, "recipe": name, "chosen": chosen, **({"choice_validation": means} if means else {}),
            "test": brief(json.loads(out.read_text()))}


def teachers_of(spec: dict) -> list[str]:
    """The recipes whose seed-42 runs teach this one: ``teacher`` is one recipe name or a list of them."""
    t = spec.get("teacher") or []
    return [t] if isinstance(t, str) else list(t)


def run_newslora(name: str, spec: dict, seed: int, data: Path, workdir: Path, log) -> dict:
    run_dir = workdir / "runs" / f"{name}-s{seed}"
    final = spec.get("final", False)
    overrides = [*spec.get("overrides", []), f"name={name}", f"data.source={data / 'train.csv'}",
                 f"data.validation={data / 'validation.csv'}",
                 f"data.test={data / 'test.csv'}" if final else "data.test=null",
                 "data.max_train_samples=null", "data.max_test_samples=null", f"train.seed={seed}"]
    from newslora.run import Run

    if spec.get("teacher"):  # other recipes' seed-42 runs of this workdir (several: their probabilities averaged)
        teachers = []
        for t in teachers_of(spec):
            teachers.append(workdir / "runs" / f"{t}-s42")
            if not (teachers[-1].is_dir() and Run(teachers[-1]).status() == "completed"):
                raise RuntimeError(f"{name} is taught by {t}'s run, which is not finished: run --recipes {t} first")
        overrides.append(f"distill.teachers=[{','.join(map(str, teachers))}]")
    if spec.get("unlabelled"):
        overrides.append(f"distill.unlabelled={data / spec['unlabelled']}")

    run = Run(run_dir)
    if run.path.is_dir() and run.status() == "completed" and run.read_eval():
        pass  # trained before the result file was written
    elif run.path.is_dir() and run.checkpoints():  # interrupted or dead: continue from its last checkpoint
        call([*newslora_cli(), "train", "--resume", str(run_dir)], log)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        call([*newslora_cli(), "train", "--config", str(REPO / spec["config"]), *overrides, "--run-dir", str(run_dir)],
             log)
    info, ev = run.read_info(), run.read_eval()
    preds = workdir / "preds" / f"{name}-s{seed}.csv"
    call([*newslora_cli(), "predict", str(run_dir), "--input", str(data / "validation.csv"), "--output", str(preds),
          "--overwrite"], log)
    return {"recipe": name, "seed": seed, "backbone": info.get("backbone"), "trainable": info["trainable"]["total"],
            "train_rows": info["rows"]["train"], "epochs": read_epochs(run), "steps": info.get("optimizer_steps"),
            "train_seconds": info.get("train_runtime_s"), "samples_per_second": info.get("train_samples_per_second"),
            "validation": brief(ev.get("validation")), "test": brief(ev.get("test")),
            "val_pred": load_preds(preds), "run_dir": str(run_dir)}


def read_epochs(run):
    t = run.read_recipe_dict().get("train", {})
    return t.get("epochs") if t.get("max_steps", -1) <= 0 else f"{t['max_steps']} steps"


def run_tfidf(seed: int, data: Path, log) -> dict:
    from newslora.baseline import tfidf_baseline
    import pandas as pd

    from newslora.data import AG_NEWS_LABELS, Splits

    frames = {s: pd.read_csv(data / f"{s}.csv") for s in ("train", "validation", "test")}
    splits = Splits(frames["train"], frames["validation"], frames["test"], list(AG_NEWS_LABELS), str(data))
    res = tfidf_baseline(splits, seed=seed, keep_predictions=True)
    pred = res["predictions"]["validation"]
    return {"recipe": "tfidf", "seed": seed, "backbone": "-", "trainable": None, "train_rows": res["train_rows"],
            "epochs": "-", "train_seconds": res["train_seconds"], "samples_per_second": res["train_samples_per_second"],
            "validation": brief(res["validation"]), "test": brief(res["test"]), "val_pred": pred}


def run_plain(seed: int, data: Path, workdir: Path, log) -> dict:
    out = workdir / "results" / f"plain-s{seed}.raw.json"
    call([sys.executable, __file__, "--plain-worker", json.dumps({"data": str(data), "seed": seed,
                                                                   "out": str(out), "workdir": str(workdir)})], log)
    return json.loads(out.read_text())


def run_full(name: str, spec: dict, seed: int, data: Path, workdir: Path, log, test: bool = False) -> dict:
    """Full fine-tuning in a subprocess (``--full-worker``): trains (resuming its last checkpoint) and predicts
    validation; with ``test``, the kept best checkpoint predicts the test set instead (nothing trains)."""
    out = workdir / "results" / f"{name}-s{seed}.{'test' if test else 'raw'}.json"
    if not out.is_file():
        call([sys.executable, __file__, "--full-worker", json.dumps(
            {"name": name, "data": str(data), "seed": seed, "out": str(out), "workdir": str(workdir), "test": test,
             "lr": spec["lr"], "epochs": spec["epochs"], "tiny": spec.get("tiny", False)})], log)
    return json.loads(out.read_text())


def full_worker(spec: dict) -> None:
    """Every weight of the backbone trains with the HF Trainer (no PEFT, no budget): the accuracy ceiling of the
    backbone on the protocol's rows, in length-grouped batches (the Trainer's own sampler: little padding, still
    shuffled). The best validation checkpoint is kept as ``RUN/best`` for the test read."""
    import numpy as np
    import pandas as pd
    from datasets import Dataset
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments, set_seed)
    from transformers.trainer_utils import get_last_checkpoint

    from newslora.evaluate import classification_metrics
    from newslora.families import resolve_backbone
    from newslora.trainer import resolve_precision

    data, seed, labels = Path(spec["data"]), spec["seed"], ["World", "Sports", "Business", "Sci/Tech"]
    run_dir = Path(spec["workdir"]) / "runs" / f"{spec['name']}-s{seed}"
    name = str(SHARED / "models" / "roberta-base") if spec["tiny"] else resolve_backbone("minilm")
    tok = AutoTokenizer.from_pretrained(name)
    max_length = 32 if spec["tiny"] else 128
    splits = ("test",) if spec["test"] else ("train", "validation")
    ds = {s: Dataset.from_pandas(pd.read_csv(data / f"{s}.csv")).map(
        lambda b: tok(b["text"], truncation=True, max_length=max_length), batched=True, remove_columns=["text"])
        for s in splits}
    res = {"recipe": spec["name"], "seed": seed, "backbone": "tiny" if spec["tiny"] else "minilm"}

    def predict_best(split):
        """Predictions of the kept best checkpoint on ``split``, in row order. A Trainer of its own: one that groups
        by length also samples its evaluation rows by length (transformers 5), out of the split's order."""
        model = AutoModelForSequenceClassification.from_pretrained(run_dir / "best")
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(run_dir / "predict"), report_to="none",
                                                              per_device_eval_batch_size=256),
                          data_collator=DataCollatorWithPadding(tok))
        return np.asarray(trainer.predict(ds[split]).predictions).argmax(-1)

    if spec["test"]:  # the kept best checkpoint on the test set
        res["test"] = brief(classification_metrics(np.asarray(ds["test"]["label"]), predict_best("test"), labels))
    else:
        set_seed(seed)
        if spec["tiny"]:
            cfg = AutoConfig.from_pretrained(name, num_labels=len(labels), num_hidden_layers=2, hidden_size=32,
                                             intermediate_size=64, num_attention_heads=2)
            model = AutoModelForSequenceClassification.from_config(cfg)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=len(labels))
        steps = -(-len(ds["train"]) // 32)  # optimizer steps per epoch
        every = max(1, steps // 4)
        bf16 = resolve_precision("auto") == "bf16" and not spec["tiny"]  # what newslora's own runs pick
        args = TrainingArguments(output_dir=str(run_dir), learning_rate=spec["lr"], per_device_train_batch_size=32,
                                 per_device_eval_batch_size=256, num_train_epochs=spec["epochs"], warmup_steps=0.06,
                                 weight_decay=0.01, eval_strategy="steps", eval_steps=every, save_strategy="steps",
                                 save_steps=every, save_total_limit=2, load_best_model_at_end=True,
                                 metric_for_best_model="accuracy", logging_steps=50, report_to="none", seed=seed,
                                 bf16=bf16, use_cpu=True, train_sampling_strategy="group_by_length")

        def accuracy(p):
            return {"accuracy": float((np.asarray(p.predictions).argmax(-1) == p.label_ids).mean())}

        trainer = Trainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["validation"],
                          data_collator=DataCollatorWithPadding(tok), processing_class=tok, compute_metrics=accuracy)
        last = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
        m = trainer.train(resume_from_checkpoint=last).metrics
        trainer.save_model(str(run_dir / "best"))
        pred = predict_best("validation")
        res.update({"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "train_rows": len(ds["train"]), "epochs": spec["epochs"], "precision": "bf16" if bf16 else "fp32",
                    "train_seconds": round(m["train_runtime"], 2), "samples_per_second": m["train_samples_per_second"],
                    "best_checkpoint": trainer.state.best_model_checkpoint, "best_metric": trainer.state.best_metric,
                    "validation": brief(classification_metrics(np.asarray(ds["validation"]["label"]), pred, labels)),
                    "test": None, "val_pred": pred.tolist()})
    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".tmp").write_text(json.dumps(res))
    out.with_name(out.name + ".tmp").replace(out)


def plain_worker(spec: dict) -> None:
    """The hand-written recipe, as a user would write it from the HF and PEFT docs."""
    import numpy as np
    import pandas as pd
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from newslora.evaluate import classification_metrics
    from newslora.families import resolve_backbone

    data, seed = Path(spec["data"]), spec["seed"]
    labels = ["World", "Sports", "Business", "Sci/Tech"]
    name = resolve_backbone("minilm")
    tok = AutoTokenizer.from_pretrained(name)
    ds = {s: Dataset.from_pandas(pd.read_csv(data / f"{s}.csv")).map(
        lambda b: tok(b["text"], truncation=True, max_length=128), batched=True, remove_columns=["text"])
        for s in ("train", "validation", "test")}
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "value"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = TrainingArguments(output_dir=str(Path(spec["workdir"]) / "runs" / f"plain-s{seed}"), learning_rate=1e-3,
                             per_device_train_batch_size=32, per_device_eval_batch_size=256, num_train_epochs=1,
                             eval_strategy="no", save_strategy="no", logging_steps=50, report_to="none", seed=seed)
    trainer = Trainer(model=model, args=args, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok),
                      processing_class=tok)
    m = trainer.train().metrics
    res = {"recipe": "plain", "seed": seed, "backbone": "minilm", "trainable": trainable,
           "train_rows": len(ds["train"]), "epochs": 1, "train_seconds": round(m["train_runtime"], 2),
           "samples_per_second": m["train_samples_per_second"]}
    for s in ("validation", "test"):
        pred = np.asarray(trainer.predict(ds[s]).predictions).argmax(-1)
        res[s] = brief(classification_metrics(np.asarray(ds[s]["label"]), pred, labels))
        if s == "validation":
            res["val_pred"] = pred.tolist()
    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".tmp").write_text(json.dumps(res))
    out.with_name(out.name + ".tmp").replace(out)
    print(f"plain: threads {torch.get_num_threads()}")


# ----------------------------------------------------------------------------- helpers


def call(argv: list[str], log) -> None:
    log.write(f"\n$ {' '.join(argv)}\n")
    log.flush()
    rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {' '.join(argv[:3])} ... (see the log)")


def brief(m: dict | None) -> dict | None:
    return None if not m else {k: m[k] for k in ("accuracy", "macro_f1", "n")}


def load_preds(path: Path) -> list[int]:
    import pandas as pd

    return pd.read_csv(path)["Label"].astype(int).tolist()


def paired(a: list[int], b: list[int], truth: list[int]) -> tuple[float, float]:
    """Accuracy of a minus accuracy of b on the same rows, in points, and its standard error."""
    import numpy as np

    t = np.asarray(truth)
    d = (np.asarray(a) == t).astype(float) - (np.asarray(b) == t).astype(float)
    return 100 * d.mean(), 100 * d.std(ddof=1) / np.sqrt(len(d))


def stat(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mean = statistics.mean(vals)
    return f"{100 * mean:.2f}" + (f" ± {100 * statistics.stdev(vals):.2f}" if len(vals) > 1 else "")


def table(results: list[dict], reference: str, truth: list[int]) -> str:
    by = {}
    for r in results:
        by.setdefault(r["recipe"], []).append(r)
    ref = {r["seed"]: r for r in by.get(reference, [])}
    lines = ["| recipe | what | backbone | trainable | rows | epochs | seeds | test acc % | test macro-F1 % | "
             f"val acc % | Δval vs {reference} (pt ± se) | train s | samples/s |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in by.items():
        diffs = [paired(r["val_pred"], ref[r["seed"]]["val_pred"], truth) for r in rs
                 if r.get("val_pred") and r["seed"] in ref and ref[r["seed"]].get("val_pred") and name != reference]
        delta = "; ".join(f"{d:+.2f} ± {se:.2f}" for d, se in diffs) or "-"
        secs = [r["train_seconds"] for r in rs if r.get("train_seconds")]
        sps = [r["samples_per_second"] for r in rs if r.get("samples_per_second")]
        trainable = f"{rs[0]['trainable']:,}" if rs[0].get("trainable") else "-"
        cells = [name, RECIPES.get(name, {}).get("what", ""), rs[0]["backbone"], trainable,
                 f"{rs[0]['train_rows']:,}", str(rs[0]["epochs"]), str(len(rs)),
                 stat([r["test"]["accuracy"] if r.get("test") else None for r in rs]),
                 stat([r["test"]["macro_f1"] if r.get("test") else None for r in rs]),
                 stat([r["validation"]["accuracy"] for r in rs]), delta,
                 f"{statistics.mean(secs):.0f}" if secs else "-", f"{statistics.mean(sps):.1f}" if sps else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, body: str, table: str = "main") -> None:
    begin, end = markers(table)
    text = path.read_text() if path.is_file() else "# Accuracy\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{body}\n{end}", text, flags=re.S)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() or "?"
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default=",".join(DEFAULT), help="comma-separated names (see --list)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per recipe: --first-seed, +1, ...")
    p.add_argument("--first-seed", type=int, default=42)
    p.add_argument("--log", type=Path, default=None, help="subprocess output (default WORKDIR/bench.log)")
    p.add_argument("--rows", type=int, default=None, help="training rows (stratified subset; default all)")
    p.add_argument("--val-rows", type=int, default=2000)
    p.add_argument("--test-rows", type=int, default=None, help="test rows (default: all 7,600)")
    p.add_argument("--source", type=Path, default=TRAIN_CSV)
    p.add_argument("--test", type=Path, default=TEST_CSV)
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "accuracy")
    p.add_argument("--reference", default="all-r24", help="recipe the paired validation differences are taken against")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "ACCURACY.md", help="'-' for stdout only")
    p.add_argument("--table", default="main", help="which table of --output to rewrite (main: the MiniLM sweep)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--plain-worker", help=argparse.SUPPRESS)
    p.add_argument("--full-worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.plain_worker:
        plain_worker(json.loads(a.plain_worker))
        return 0
    if a.full_worker:
        full_worker(json.loads(a.full_worker))
        return 0
    if a.list:
        for n, s in RECIPES.items():
            print(f"{n:15s} {'final ' if s.get('final') else ''}{s['what']}")
        return 0
    names = [n.strip() for n in a.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"error: unknown recipe(s) {unknown}; --list shows the {len(RECIPES)} known ones", file=sys.stderr)
        return 2
    a.workdir.mkdir(parents=True, exist_ok=True)
    manifest = prepare_data(a.workdir, a.source, a.test, a.rows, a.val_rows, a.test_rows)
    data = a.workdir / "data"
    import pandas as pd

    truth = pd.read_csv(data / "validation.csv")["label"].astype(int).tolist()
    print(f"protocol: {manifest['rows']} rows; dropped {manifest['dropped']}; workdir {a.workdir}", flush=True)
    results, failed = [], []

    def publish() -> str:  # after every finished recipe, so an interrupted sweep still leaves its rows
        body = (f"Command: `python bench/accuracy.py --recipes {','.join(names)} --seeds {a.seeds}"
                + (f" --first-seed {a.first_seed}" if a.first_seed != 42 else "")
                + (f" --rows {a.rows}" if a.rows else "") + (f" --val-rows {a.val_rows}" if a.val_rows != 2000 else "")
                + (f" --workdir {a.workdir.relative_to(REPO) if a.workdir.is_relative_to(REPO) else a.workdir}"
                   if a.workdir != REPO / "runs" / "accuracy" else "")
                + (f" --reference {a.reference}" if a.reference != "all-r24" else "")
                + (f" --table {a.table}" if a.table != "main" else "") + f"` · commit {commit()} · "
                f"{datetime.now(timezone.utc):%Y-%m-%d} · rows {manifest['rows']} (dropped {manifest['dropped']})\n\n"
                + table(results, a.reference, truth))
        if str(a.output) != "-":
            write_markdown(a.output, body, a.table)
        return body

    log_path = a.log or a.workdir / "bench.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        seeds = range(a.first_seed, a.first_seed + a.seeds)
        # recipes chosen among others (best_of, test_of) after every training seed: a choice over several seeds
        # needs them all
        chooses = [n for n in names if RECIPES[n].get("best_of") or RECIPES[n].get("test_of")]
        order = [(s, n) for s in seeds for n in names if n not in chooses] + [(s, n) for s in seeds for n in chooses]
        for seed, name in order:
            spec, res_path = RECIPES[name], a.workdir / "results" / f"{name}-s{seed}.json"
            if res_path.is_file():
                results.append(json.loads(res_path.read_text()))
                continue
            t0 = time.time()
            print(f"[{datetime.now():%H:%M:%S}] {name} seed {seed} ...", flush=True)
            try:
                if spec.get("kind") == "tfidf":
                    res = run_tfidf(seed, data, log)
                elif spec.get("kind") == "plain":
                    res = run_plain(seed, data, a.workdir, log)
                elif spec.get("kind") == "full":
                    res = run_full(name, spec, seed, data, a.workdir, log)
                elif spec.get("test_of") or spec.get("best_of"):
                    res = run_chosen(name, spec, seed, data, a.workdir, log)
                else:
                    res = run_newslora(name, spec, seed, data, a.workdir, log)
            except RuntimeError as e:  # one failed recipe must not cost the others' figures
                failed.append(f"{name} seed {seed}: {e}")
                print(f"  FAILED: {e}", flush=True)
                continue
            res["wall_seconds"] = round(time.time() - t0, 1)
            res_path.parent.mkdir(parents=True, exist_ok=True)
            res_path.with_name(res_path.name + ".tmp").write_text(json.dumps(res))
            res_path.with_name(res_path.name + ".tmp").replace(res_path)
            results.append(res)
            print(f"  validation {res['validation']['accuracy']:.4f}"
                  + (f", test {res['test']['accuracy']:.4f}" if res.get("test") else "")
                  + f" ({res['wall_seconds']:.0f} s)", flush=True)
            publish()
    print(publish())
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
