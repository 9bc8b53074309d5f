"""Every PEFT method end to end on a tiny random-init RoBERTa: train a few steps, save, reload, merge/export with
the same logits; AdaLoRA's schedule and rank allocation; resuming (LoRA+, AdaLoRA); the LoRA head; PiSSA."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, TrainerCallback

from conftest import ROBERTA, TINY, ctrl_c_after, tiny_overrides

from newslora import methods
from newslora.config import load_recipe
from newslora.errors import NewsloraError
from newslora.export import CHECK_TEXTS, export
from newslora.predict import load_classifier
from newslora.train import train

METHODS = list(methods.names())  # every registered method: a new one is tested without editing this file
FAST = {"train.max_steps": 8, "train.batch_size": 16, "train.eval_steps": 4, "train.logging_steps": 2,
        "data.max_train_samples": 96, "data.validation_size": 32, "data.max_test_samples": 16, "vera.r": 16}
ADALORA = {"adalora.init_r": 6, "adalora.target_r": 2, "adalora.tinit": 1, "adalora.tfinal": 3, "adalora.deltaT": 1}


def recipe_for(method: str, **extra):
    return load_recipe(None, tiny_overrides(method=method, **{**FAST, **ADALORA, **extra}))


class Grab(TrainerCallback):
    """Keeps the model the Trainer ends with (after loading the best checkpoint, if it does), its forward freed from
    the Trainer's autocast wrapper (bf16 autocast on a CPU with native bf16), so it runs in fp32 as a reloaded model
    does."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from accelerate.utils import extract_model_from_parallel

        self.model = extract_model_from_parallel(model, keep_fp32_wrapper=False)


@torch.inference_mode()
def logits(model, tokenizer):
    model.eval()
    return model(**tokenizer(CHECK_TEXTS, padding=True, return_tensors="pt")).logits.float()


@pytest.fixture(scope="module", autouse=True)
def one_thread_no_plots():
    """Tiny models run fastest on one thread (the CPUs are shared); plots are tested once (AdaLoRA's), not per run."""
    import newslora.train as tr

    threads, finalize = torch.get_num_threads(), tr.finalize
    torch.set_num_threads(1)
    tr.finalize = lambda run_dir: finalize(run_dir) if (run_dir / "adalora_ranks.csv").is_file() else None
    yield
    torch.set_num_threads(threads)
    tr.finalize = finalize


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(method, head)`` -> (run_dir, in-memory model at the end of training); each trained once per module."""
    done = {}

    def get(method: str, head: str = "full"):
        if (method, head) not in done:
            grab = Grab()
            run_dir = tmp_path_factory.mktemp("runs") / f"{method}-{head}"
            train(recipe_for(method, **{"head.type": head}), run_dir=run_dir, extra_callbacks=[grab])
            done[method, head] = run_dir, grab.model
        return done[method, head]

    return get


# ----------------------------------------------------------------------------- round trip


# the fast loop keeps one plain LoRA, AdaLoRA (its runs are shared by the rank and resume tests), PiSSA (shared by
# the PiSSA test) and the LoRA head (shared by the head test); the other methods run with -m slow (CI runs all)
FAST_ROUND_TRIPS = {("lora", "full"), ("adalora", "full"), ("pissa", "full"), ("lora", "lora")}


@pytest.mark.parametrize("method, head", [
    pytest.param(m, h, marks=() if (m, h) in FAST_ROUND_TRIPS else pytest.mark.slow)
    for m, h in [(m, "full") for m in METHODS] + [("lora", "lora"), ("adalora", "lora"), ("pissa", "lora"),
                                                   ("vera", "lora")]])
def test_train_save_reload_export(runs, method, head):
    run_dir, trained = runs(method, head)
    clf = load_classifier(run_dir)
    tok = clf.tokenizer
    want = logits(trained, tok)
    with trained.disable_adapter():  # the adapter (and head) trained: the round trip below compares something
        assert (logits(trained, tok) - want).abs().max() > 1e-3
    assert torch.allclose(logits(clf.model, tok), want, atol=1e-5), "reloaded adapter model differs"

    merged_dir = export(run_dir)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    assert not any(k in n for n, _ in merged.named_parameters() for k in ("lora_", "vera_", "modules_to_save"))
    assert torch.allclose(logits(merged, tok), want, atol=1e-4), "merged model differs"
    assert json.loads((merged_dir / "newslora.json").read_text())["merge_max_logit_diff"] < 1e-4
    m = load_classifier(merged_dir)
    assert [r["label"] for r in m.classify(CHECK_TEXTS)] == [r["label"] for r in clf.classify(CHECK_TEXTS)]


def test_pissa_saves_a_plain_lora_with_the_head(runs):
    run_dir, _ = runs("pissa")
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 2 * 8  # PiSSA -> LoRA: [A | A0], [B | -B0]
    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"base_model.model.classifier.dense.weight", "base_model.model.classifier.out_proj.weight"} <= keys


def test_head_lora_trains_the_head_dense_lora_and_out_proj(runs):
    run_dir, model = runs("lora", "lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.dense.lora_A" in n for n in trainable)
    assert any("classifier.out_proj" in n for n in trainable)
    assert not any("classifier.dense" in n and "lora_" not in n for n in trainable)  # dense base stays frozen
    info = json.loads((run_dir / "run.json").read_text())
    assert info["trainable"]["head"] == 8 * (64 + 64) + 64 * 4 + 4


def test_head_lora_on_a_pretrained_backbone_reloads_exactly(tmp_path):
    """A pretrained backbone has no head weights: the head's dense base is drawn at load time and must be saved."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(ROBERTA)
    for k, v in TINY.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "pretrained")  # encoder only, like roberta-base
    grab = Grab()
    recipe = recipe_for("lora", **{"head.type": "lora", "model.random_init": "false", "model.config_overrides": "{}",
                                   "model.backbone": tmp_path / "pretrained", "model.tokenizer": ROBERTA})
    run_dir = train(recipe, run_dir=tmp_path / "run", extra_callbacks=[grab]).run_dir
    tok = load_classifier(run_dir).tokenizer
    want = logits(grab.model, tok)
    assert torch.allclose(logits(load_classifier(run_dir).model, tok), want, atol=1e-5)
    merged = AutoModelForSequenceClassification.from_pretrained(export(run_dir))
    assert torch.allclose(logits(merged, tok), want, atol=1e-4)
    (run_dir / "head_init.safetensors").unlink()  # without the saved head base, a reload draws another head
    assert not torch.allclose(logits(load_classifier(run_dir).model, tok), want, atol=1e-3)


# ----------------------------------------------------------------------------- AdaLoRA


def read_ranks(run_dir):
    by_step = defaultdict(dict)
    with open(run_dir / "adalora_ranks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["step", "module", "rank"]
    for r in rows:
        by_step[int(r["step"])][r["module"]] = int(r["rank"])
    return dict(sorted(by_step.items()))


def test_adalora_ranks_change_and_the_final_pattern_is_saved(runs):
    run_dir, model = runs("adalora")
    ranks = read_ranks(run_dir)
    first, last = ranks[0], ranks[max(ranks)]
    assert len(first) == 4 and set(first.values()) == {6}  # 2 layers x (query, value) at init_r
    assert max(ranks) == 8 and last != first and len({tuple(v.values()) for v in ranks.values()}) >= 3
    assert sum(last.values()) <= 2 * len(last)  # pruned to target_r on average
    saved = json.loads((run_dir / "adalora_rank_pattern.json").read_text())
    assert saved["ranks"] == last and saved["total_rank"] == sum(last.values())
    assert {k: sum(v) for k, v in saved["rank_pattern"].items()} == {f"{m}.lora_E.default": n for m, n in last.items()}
    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:  # the adapter is shrunk
        shapes = {k.removeprefix("base_model.model.").split(".lora_E")[0]: f.get_slice(k).get_shape()[0]
                  for k in f.keys() if ".lora_E" in k}
    assert shapes == last
    assert (run_dir / "plots" / "adalora_ranks.png").is_file()


@pytest.mark.parametrize("extra", [{}, pytest.param({"train.max_steps": -1, "train.epochs": 2, "train.grad_accum": 2,
                                                    "data.max_train_samples": 112, "adalora.tfinal": 2},
                                                   marks=pytest.mark.slow)])  # epochs + grad_accum: 2 more runs
def test_adalora_allocates_once_per_optimizer_step(extra, tmp_path, monkeypatch):
    from peft.tuners.adalora.model import AdaLoraModel

    seen, micro = [], []
    original = AdaLoraModel.update_and_allocate
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate",
                        lambda self, step: (seen.append(step), original(self, step))[1])

    class Micro(TrainerCallback):
        def on_substep_end(self, args, state, control, **kw):
            micro.append(state.global_step)

        def on_train_end(self, args, state, control, **kw):
            self.max_steps, self.global_step = state.max_steps, state.global_step

    cb = Micro()
    run_dir = train(recipe_for("adalora", **extra), run_dir=tmp_path / "run", extra_callbacks=[cb]).run_dir
    info = json.loads((run_dir / "run.json").read_text())
    n, t = info["rows"]["train"], load_recipe(run_dir / "recipe.yaml").train
    batches = math.ceil(n / t.batch_size)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * math.ceil(batches / t.grad_accum))
    assert steps == info["optimizer_steps"] == info["trainer_max_steps"] == cb.max_steps == cb.global_step
    assert info["adalora"]["total_step"] == steps
    assert seen == list(range(steps)) and info["adalora"]["optimizer_step_calls"] == steps
    assert len(seen) + len(micro) == (t.epochs * batches if t.max_steps <= 0 else steps * t.grad_accum)
    if t.grad_accum > 1:  # micro-batches ran but did not allocate; the odd batch makes a short last step
        assert batches % t.grad_accum == 1 and len(micro) == t.epochs * (batches // t.grad_accum) > 0


def test_adalora_schedule_checked_before_the_run_folder(tmp_path):
    recipe = recipe_for("adalora", **{"adalora.tinit": 5, "adalora.tfinal": 3})  # 5 + 3 >= 8 steps
    from newslora.errors import NewsloraError

    with pytest.raises(NewsloraError, match="no pruning phase"):
        train(recipe, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_adalora_recipe_rules():
    from newslora.errors import NewsloraError

    with pytest.raises(NewsloraError, match="below adalora.init_r"):
        recipe_for("adalora", **{"adalora.target_r": 6})
    with pytest.raises(NewsloraError, match="early_stopping"):
        recipe_for("adalora", **{"train.early_stopping_patience": 2})


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", [pytest.param("loraplus", marks=pytest.mark.slow), "adalora"])  # slow: 2 more runs
def test_resume_matches_an_uninterrupted_run(runs, method, tmp_path):
    full_dir, full_model = runs(method)
    run_dir = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(recipe_for(method), run_dir=run_dir, extra_callbacks=[ctrl_c_after(6)])  # checkpoint-4 exists
    res = train(resume=run_dir)
    a, b = load_classifier(full_dir), load_classifier(res.run_dir)
    assert torch.allclose(logits(a.model, a.tokenizer), logits(b.model, b.tokenizer), atol=1e-5)
    # the per-epoch training loss/accuracy sums survive the interruption (saved in the checkpoint)
    full, cut = (list(csv.DictReader(open(d / "metrics_epochs.csv"))) for d in (full_dir, run_dir))
    assert [(r["epoch"], r["train_accuracy"]) for r in full] == [(r["epoch"], r["train_accuracy"]) for r in cut]
    assert [float(r["train_loss"]) for r in cut] == pytest.approx([float(r["train_loss"]) for r in full], abs=1e-5)
    if method == "adalora":
        assert read_ranks(run_dir) == read_ranks(full_dir)
        info = json.loads((run_dir / "run.json").read_text())["adalora"]
        assert info["optimizer_step_calls"] == 8


def test_loraplus_optimizer_gives_b_a_larger_lr(tiny_recipe):
    from newslora import methods
    from newslora.model import build_model

    recipe = tiny_recipe(method="loraplus", **{"loraplus.ratio": 8})
    model, _ = build_model(recipe, ["a", "b", "c", "d"])
    opt = methods.get("loraplus").optimizer(model, recipe)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    a = {lr for n, lr in lr_of.items() if "lora_A" in n}
    b = {lr for n, lr in lr_of.items() if "lora_B" in n}
    assert a == {recipe.train.lr} and b == {8 * recipe.train.lr}
    assert set(lr_of) == {n for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- the registry


def test_a_new_method_is_one_class_registered_nowhere_else(tmp_path):
    """What a method module does (newslora/methods/<name>.py): subclass Method and register it. Nothing else
    changes, yet the method validates, counts exactly, trains, reloads, appears in the error of a wrong name, and
    writes its own file into the run folder and its own plot into the run's report."""
    from newslora.methods.lora import Lora
    from newslora.model import build_model, count_trainable
    from newslora.report import plot_run

    def plot_norms(run, path, title, figure):
        norms = json.loads(run.file("b_norms.json").read_text())
        fig, ax = figure()
        ax.bar(range(len(norms)), list(norms.values()))
        ax.set(title=f"lora_B norms — {title}")
        fig.savefig(path, bbox_inches="tight")
        return path

    class OrthogonalLora(Lora):  # LoRA whose A and B start orthogonal (PEFT's init_lora_weights="orthogonal")
        name, display, order = "orthogonal-lora", "orthogonal LoRA", 50
        artifacts = ("b_norms.json",)
        plots = (methods.MethodPlot("b_norms.png", "b_norms.json", plot_norms),)

        def init_weights(self, for_count):
            return True if for_count else "orthogonal"

        def after_train(self, model, run, global_step, callbacks):
            run.write_record("b_norms.json", {n: float(p.norm()) for n, p in model.named_parameters()
                                              if "lora_B" in n})

    methods.register(OrthogonalLora())
    try:
        with pytest.raises(NewsloraError, match="choose one of: .*orthogonal-lora"):
            load_recipe(None, tiny_overrides(method="orthogonal-lorax"))
        recipe = load_recipe(None, tiny_overrides(method="orthogonal-lora", **{"lora.r": 4}))
        names = ["World", "Sports", "Business", "Sci/Tech"]
        model, built = build_model(recipe, names)
        assert count_trainable(recipe, names).total == built.total
        b = model.base_model.model.roberta.encoder.layer[0].attention.self.query.lora_B["default"].weight
        assert b.abs().sum() > 0  # orthogonal start, not LoRA's zero B
        grab = Grab()
        run_dir = train(recipe, run_dir=tmp_path / "run", extra_callbacks=[grab]).run_dir
        clf = load_classifier(run_dir)
        assert torch.allclose(logits(clf.model, clf.tokenizer), logits(grab.model, clf.tokenizer), atol=1e-5)
        assert methods.get("orthogonal-lora").display == "orthogonal LoRA"
        norms = json.loads((run_dir / "b_norms.json").read_text())
        assert len(norms) == 4 and all(v > 0 for v in norms.values())  # q and v of 2 layers, trained
        assert methods.artifacts()["b_norms.json"] == "orthogonal-lora"
        assert run_dir / "plots" / "b_norms.png" in plot_run(run_dir)
        assert (run_dir / "plots" / "b_norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        methods.unregister("orthogonal-lora")
    assert "orthogonal-lora" not in methods.names()