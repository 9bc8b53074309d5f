"""Budget engine: exact counts on roberta-base (meta device, no weights), recipe == built model, refusals, auto_fit.

Expected counts are derived here from the layer shapes, independently of PEFT (and, where a seed prints its count,
checked against that number):
a LoRA of rank r on a d_in x d_out linear layer trains r * (d_in + d_out) parameters.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, ROBERTA, tiny_overrides

from newslora import methods
from newslora.cli import app
from newslora.config import load_recipe
from newslora.errors import NewsloraError
from newslora.model import (build_model, check_budget, count_trainable, fit_rank, with_rank)

RB = f"model.backbone={ROBERTA}"
H, FF, LAYERS, LABELS = 768, 3072, 12, 4
HEAD = H * H + H + H * LABELS + LABELS  # RoBERTa head: dense 768x768 + out_proj 768x4 = 593,668
SHAPES = {"query": (H, H), "key": (H, H), "value": (H, H), "attention.output.dense": (H, H),
          "intermediate.dense": (H, FF), "output.dense": (FF, H)}  # (d_in, d_out)
METHODS = list(methods.names())  # every registered method: a new one is tested without editing this file
RECIPES = ["seed-000-adalora", "seed-001-lora-r4", "seed-002-lora-r10", "seed-003-teacher", "seed-003-student",
           "seed-003-tuned", "seed-003-reduced", "seed-004-lora-r6-qkv", "targeted", "competition-starter"]
PUBLISHED = {"seed-003-student": 888_580, "seed-003-tuned": 888_580,  # seed 003's "LoRA only" and "Tuned" rows
             "seed-004-lora-r6-qkv": 925_444}  # the only counts a seed prints that a recipe reproduces


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; the CPUs are shared
    yield
    torch.set_num_threads(threads)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def per_module(method: str, r: int, d_in: int, d_out: int) -> int:
    """Trainable parameters one adapted d_in x d_out layer adds, by method (PEFT's parametrisations)."""
    if method == "adalora":
        return r * (d_in + d_out + 1)  # A (r x d_in), B (d_out x r), singular values E (r)
    if method == "dora":
        return r * (d_in + d_out) + d_out  # LoRA + magnitude vector
    if method == "vera":
        return r + d_out  # lambda_b (r) and lambda_d (d_out); the random projections are frozen
    return r * (d_in + d_out)


def expected(recipe) -> int:
    r = {"adalora": recipe.adalora.init_r, "vera": recipe.vera.r}.get(recipe.method, recipe.lora.r)
    layers = len(recipe.lora.layers) if recipe.lora.layers is not None else LAYERS
    modules = {m for t in recipe.lora.target_modules for m in SHAPES if m == t or m.endswith("." + t)}
    total = layers * sum(per_module(recipe.method, r, *SHAPES[m]) for m in modules)
    if recipe.head.type == "lora":
        hr = r if recipe.method in ("adalora", "vera") else recipe.head.r
        return total + per_module(recipe.method, hr, H, H) + H * LABELS + LABELS
    return total + HEAD


# ----------------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("overrides, count", [
    (["lora.r=4"], 741_124), (["lora.r=8"], 888_580), (["lora.r=6", "lora.target_modules=[query,key,value]"], 925_444),
    (["lora.r=6"], 814_852), (["lora.r=10"], 962_308),
])
def test_roberta_base_counts(overrides, count):
    assert count_trainable(load_recipe(None, [RB, *overrides])).total == count


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head", ["full", "lora"])
def test_every_method_counts_exactly_on_roberta_base(method, head):
    recipe = load_recipe(None, [RB, f"method={method}", f"head.type={head}", "budget.max_params=10000000",
                                "adalora.init_r=5", "adalora.target_r=2", "vera.r=64", "lora.r=3",
                                "lora.target_modules=[query,value,output.dense]", "lora.layers=[0,3,11]"])
    b = count_trainable(recipe)
    assert b.total == expected(recipe)
    assert b.total == b.head + b.adapter == sum(b.by_layer.values())
    assert b.adapter == sum(b.by_module.values())
    assert set(b.by_layer) == {"0", "3", "11", "head"}
    assert set(b.by_module) == {"attention.self.query", "attention.self.value", "attention.output.dense",
                                "output.dense"}


def test_adalora_counts_at_init_r():
    b = count_trainable(load_recipe(None, [RB, "method=adalora", "adalora.init_r=7", "adalora.target_r=3"]))
    assert b.adapter == 24 * 1_537 * 7 and b.head == HEAD


def test_head_lora_counts_dense_lora_and_out_proj():
    b = count_trainable(load_recipe(None, [RB, "head.type=lora", "head.r=8"]))
    assert b.head == 8 * (H + H) + H * LABELS + LABELS  # 15,364: LoRA on classifier.dense, out_proj in full
    assert b.adapter == 24 * 8 * (H + H)


# ----------------------------------------------------------------------------- seed recipes


def _recipe_counts() -> dict:
    out = {}
    for name in RECIPES:
        r = cli("budget", "--config", REPO / "configs" / f"{name}.yaml", RB, "--json")
        assert r.exit_code == 0, r.output
        out[name] = json.loads(r.stdout)
    return out


@pytest.fixture(scope="module")
def seed_counts():
    return _recipe_counts()


def test_seed_recipes_count_exactly(seed_counts):
    for name in RECIPES:
        d = seed_counts[name]
        assert isinstance(d["trainable"], int) and d["fits"], name
        recipe = load_recipe(REPO / "configs" / f"{name}.yaml", [RB])
        assert d["trainable"] == expected(recipe), name
        assert d["trainable"] == PUBLISHED.get(name, d["trainable"]), name
        raw = (REPO / "configs" / f"{name}.yaml").read_text()
        assert re.search(r"^\s+backbone: roberta-base\b", raw, re.M) and re.search(r"^\s+source: ag_news\b", raw, re.M)


def test_readme_lists_the_exact_counts(seed_counts):
    readme = (REPO / "configs" / "README.md").read_text()
    for name in RECIPES:
        line = next((ln for ln in readme.splitlines() if f"{name}.yaml" in ln and "|" in ln), None)
        assert line is not None, f"{name}.yaml missing from configs/README.md"
        assert f"{seed_counts[name]['trainable']:,}" in line, (name, line)


def test_every_value_of_a_seed_recipe_names_its_source():
    """Each value in configs/seed-*.yaml says where it comes from: ``# seed N`` (stated by that seed) or ``# ours``."""
    for path in sorted((REPO / "configs").glob("seed-*.yaml")):
        seed = re.match(r"seed-(\d{3})", path.name).group(1)
        for line in path.read_text().splitlines():
            if line.startswith(("#", "name:")) or not line.strip() or re.match(r"^\s*[\w.]+:\s*$", line):
                continue  # comments, blank lines, section headers, the run name
            comment = line.split("#", 1)[1] if "#" in line else ""
            assert re.search(rf"\bseed {seed}\b|\bours\b", comment), f"{path.name}: {line.strip()}"


def test_seed_003_targeted_count_is_reached_only_on_all_layers(seed_counts):
    """Seed 003 prints 796,420 for its targeted layout: not reachable on its five layers with the full head (the
    adapter would be 264 * 768, and five identical layers give a multiple of 5 * 768), exact on all 12 layers
    with the targeted modules at r=2 (configs/seed-003-reduced.yaml explains)."""
    assert (796_420 - HEAD) % (5 * 768) != 0 and seed_counts["seed-003-reduced"]["trainable"] != 796_420
    r = cli("budget", "--config", REPO / "configs" / "targeted.yaml", RB, "lora.layers=null", "lora.r=2",
            "budget.auto_fit=false", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["trainable"] == 796_420
    assert "796,420" in (REPO / "configs" / "seed-003-reduced.yaml").read_text()


def test_fp16_seed_recipe_on_a_cpu_names_the_precision_override(tmp_path, monkeypatch):
    """Seeds 000 and 002 train in fp16 (CUDA); a CPU refuses before reading data, naming the override the docs
    give (train.precision=fp32), and nothing is written."""
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on this machine")
    monkeypatch.chdir(tmp_path)
    r = cli("train", "--config", REPO / "configs" / "seed-000-adalora.yaml", RB)
    assert r.exit_code != 0 and "train.precision=fp16 needs a GPU" in r.output and "fp32" in r.output
    assert not list(tmp_path.iterdir())
    assert "train.precision=fp32" in (REPO / "configs" / "README.md").read_text()


def test_roberta_best_is_all_six_kinds_at_the_largest_rank_that_fits_beside_the_full_head():
    """configs/roberta-best.yaml: LoRA on all six linear kinds with the full head, the rank chosen by auto_fit."""
    r = cli("budget", "--config", REPO / "configs" / "roberta-best.yaml", RB, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    per_layer = lambda rank: rank * sum(a + b for a, b in SHAPES.values())  # noqa: E731
    full_head = H * H + H + H * LABELS + LABELS  # dense 768x768 and out_proj, biases included
    assert d["rank"] == {"lora.r": 2} and d["trainable"] == LAYERS * per_layer(2) + full_head == 925_444
    assert d["auto_fit"]["next_trainable"] == LAYERS * per_layer(3) + full_head > 1_000_000  # r=2 is the largest
    assert d["head"] == full_head == 593_668
    line = next(ln for ln in (REPO / "configs" / "README.md").read_text().splitlines() if "roberta-best.yaml" in ln)
    assert "925,444" in line and "925,444" in (REPO / "configs" / "roberta-best.yaml").read_text()


def test_seed_recipe_settings():
    r = load_recipe(REPO / "configs" / "seed-002-lora-r10.yaml", [RB])
    assert (r.lora.r, r.lora.alpha, r.lora.target_modules, r.train.precision) == (10, 64, ["query", "value"], "fp16")
    one = load_recipe(REPO / "configs" / "seed-001-lora-r4.yaml", [RB])
    assert (one.lora.r, one.lora.alpha, one.lora.dropout, one.train.lr) == (4, 4, 0.2, 1e-5)
    assert one.train.early_stopping_patience  # seed 001 stops early
    zero = load_recipe(REPO / "configs" / "seed-000-adalora.yaml", [RB])
    assert (zero.method, zero.train.epochs, zero.train.precision) == ("adalora", 3, "fp16")
    for name in ("seed-003-student", "seed-003-tuned", "seed-003-reduced"):
        student = load_recipe(REPO / "configs" / f"{name}.yaml", [RB])
        assert (student.lora.r, student.lora.alpha) == (16, 8), name
    assert load_recipe(REPO / "configs" / "seed-003-reduced.yaml", [RB]).lora.layers == [0, 1, 5, 10, 11]
    assert load_recipe(REPO / "configs" / "seed-003-tuned.yaml", [RB]).distill.teachers
    s = load_recipe(REPO / "configs" / "competition-starter.yaml", [RB])
    assert (s.lora.target_modules, s.train.optimizer, s.train.max_steps, s.data.validation_size) == \
        (["query"], "sgd", 1200, 640)
    t = load_recipe(REPO / "configs" / "targeted.yaml", [RB])
    assert t.lora.layers == [0, 1, 5, 10, 11]
    teacher = load_recipe(REPO / "configs" / "seed-003-teacher.yaml", [RB])
    assert teacher.budget.max_params > 1_000_000 and (teacher.lora.r, teacher.lora.alpha) == (8, 32)


# ----------------------------------------------------------------------------- the budget command


def test_budget_table_shows_modules_layers_head_total():
    r = cli("budget", RB, "lora.layers=[2,7]", "lora.r=4")
    assert r.exit_code == 0, r.output
    text = r.stdout
    for words in ("adapter: attention.self.query", "adapter: attention.self.value", "layer 2", "layer 7",
                  "classification head", "593,668", "total", f"{593_668 + 2 * 2 * 4 * 1_536:,}"):
        assert words in text, words
    assert "layer 3" not in text


def test_budget_json_and_exit_code_when_over():
    r = cli("budget", RB, "lora.r=64", "--json")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["trainable"] == HEAD + 24 * 64 * 1_536 and d["fits"] is False


def test_budget_loads_no_weights(monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", boom)
    assert count_trainable(load_recipe(None, [RB])).total == 888_580


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("method", METHODS)
def test_over_budget_refused_before_training(method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("train", *tiny_overrides(method=method, **{"budget.max_params": 3000, "adalora.init_r": 4,
                                                         "adalora.target_r": 2}))
    assert r.exit_code == 2, r.output
    msg = " ".join(r.output.split())
    for words in ("over budget", "budget.max_params=3,000", f"method={method}", "head 4,420", "adapter",
                  "attention.self.query", "attention.self.value"):
        assert words in msg, (words, msg)
    assert not (tmp_path / "runs").exists()


def test_check_budget_message_has_the_breakdown():
    recipe = load_recipe(None, [RB, "method=adalora"])
    b = count_trainable(recipe)
    with pytest.raises(NewsloraError) as e:
        check_budget(b, recipe)
    assert f"{b.total:,}" in str(e.value) and "head 593,668 + adapter 442,656" in str(e.value)
    assert "attention.self.query 221,328" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantization_refused_on_cpu_before_anything_is_written(mode, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("train", *tiny_overrides(**{"model.random_init": "false", "model.quantization": mode}))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "CUDA" in lines[0] and f"model.quantization={mode}" in lines[0], r.output
    assert list(tmp_path.iterdir()) == []


def test_head_lora_needs_a_dense_head():
    from conftest import minilm_path

    if minilm_path() is None:
        pytest.skip("the packaged MiniLM is not installed")
    r = cli("budget", "model.backbone=minilm", "head.type=lora")
    assert r.exit_code == 2 and "single linear layer" in " ".join(r.output.split()), r.output
    assert cli("budget", "model.backbone=minilm", "head.type=full").exit_code == 0


def test_quantization_with_random_init_is_a_recipe_error():
    with pytest.raises(NewsloraError, match="random_init"):
        load_recipe(None, tiny_overrides(**{"model.quantization": "4bit"}))


# ----------------------------------------------------------------------------- auto_fit


@pytest.mark.parametrize("overrides", [
    [],
    ["budget.max_params=900000"],
    ["lora.target_modules=[query,key,attention.output.dense,output.dense]", "lora.layers=[0,1,5,10,11]"],
    ["head.type=lora", "lora.layers=[0,1,2,3,4,5]"],
    ["method=dora", "lora.target_modules=[value]"],
    ["method=adalora", "adalora.target_r=4"],
    ["method=vera", "budget.max_params=620000"],
])
def test_auto_fit_picks_the_largest_rank_that_fits(overrides):
    recipe = load_recipe(None, [RB, "budget.auto_fit=true", *overrides])
    fit = fit_rank(recipe)
    count = lambda r: count_trainable(with_rank(recipe, r), fit=False).total  # noqa: E731
    assert fit.total == count(fit.chosen) <= recipe.budget.max_params
    assert count(fit.chosen + 1) > recipe.budget.max_params  # r + 1 would not fit
    assert fit.next_total == count(fit.chosen + 1) and not fit.capped
    # and the arithmetic, independently of the counting code
    b = expected(with_rank(recipe, fit.chosen))
    assert b == fit.total and expected(with_rank(recipe, fit.chosen + 1)) > recipe.budget.max_params


def test_auto_fit_values():
    fit = fit_rank(load_recipe(None, [RB, "budget.auto_fit=true"]))
    assert (fit.requested, fit.chosen) == (8, 11)  # (1,000,000 - 593,668) // (24 * 1,536) = 11
    fit = fit_rank(load_recipe(None, [RB, "budget.auto_fit=true", "budget.max_params=800000"]))
    assert fit.chosen == 5 and fit.total == 593_668 + 5 * 36_864


def test_auto_fit_caps_at_the_layer_width():
    recipe = load_recipe(None, [RB, "budget.auto_fit=true", "head.type=lora", "lora.layers=[0]",
                                "lora.target_modules=[value]", "budget.max_params=100000000"])
    fit = fit_rank(recipe)
    assert fit.chosen == fit.limit == H and fit.capped and fit.next_total is None


def test_auto_fit_refuses_when_nothing_fits():
    with pytest.raises(NewsloraError, match="over budget even at lora.r=1"):
        fit_rank(load_recipe(None, [RB, "budget.auto_fit=true", "budget.max_params=600000"]))
    with pytest.raises(NewsloraError, match="adalora.target_r=8"):
        fit_rank(load_recipe(None, [RB, "budget.auto_fit=true", "method=adalora", "budget.max_params=900000"]))


def test_auto_fit_in_the_budget_command():
    r = cli("budget", RB, "budget.auto_fit=true", "budget.max_params=900000", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["rank"] == {"lora.r": 8} and d["trainable"] == 888_580
    assert d["auto_fit"]["requested"] == 8 and d["auto_fit"]["chosen"] == 8 and d["auto_fit"]["next_trainable"] == 925_444
    r = cli("budget", RB, "budget.auto_fit=true", "lora.r=2")
    assert r.exit_code == 0 and "budget.auto_fit: lora.r 2 -> 11" in " ".join(r.stdout.split())


def test_auto_fit_is_applied_before_training(tiny_recipe, tmp_path):
    from newslora.train import train

    recipe = tiny_recipe(**{"budget.auto_fit": "true", "budget.max_params": 20_000, "lora.r": 1,
                            "train.max_steps": 2, "train.eval_steps": 2, "data.max_train_samples": 64,
                            "data.max_test_samples": 16})
    expect = fit_rank(recipe)
    res = train(recipe, run_dir=tmp_path / "fit")
    info = json.loads((res.run_dir / "run.json").read_text())
    assert info["auto_fit"]["chosen"] == expect.chosen == info["rank"] > 1
    assert info["trainable"]["total"] == expect.total <= 20_000
    assert load_recipe(res.run_dir / "recipe.yaml").lora.r == expect.chosen


# ----------------------------------------------------------------------------- recipe count == built model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head", ["full", "lora"])
def test_recipe_count_equals_built_model(method, head, tiny_recipe):
    recipe = tiny_recipe(method=method, **{"head.type": head, "head.r": 3, "lora.r": 5, "vera.r": 8,
                                           "adalora.init_r": 6, "adalora.target_r": 2, "lora.layers": "[1]",
                                           "lora.target_modules": "[query,value,intermediate.dense]"})
    names = ["World", "Sports", "Business", "Sci/Tech"]
    counted = count_trainable(recipe, names)
    model, b = build_model(recipe, names, total_steps=20)
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted.total == b.total == built
    assert counted.by_module == b.by_module and counted.by_layer == b.by_layer
    assert set(counted.by_layer) == {"1", "head"}


def test_built_count_follows_auto_fit(tiny_recipe):
    recipe = tiny_recipe(**{"budget.auto_fit": "true", "budget.max_params": 12_000})
    names = ["a", "b", "c", "d"]
    counted = count_trainable(recipe, names)  # counts the fitted rank, leaves the recipe alone
    assert recipe.lora.r == 8 and counted.fit["chosen"] != 8
    model, b = build_model(recipe, names)
    assert recipe.lora.r == counted.fit["chosen"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counted.total == b.total <= 12_000
