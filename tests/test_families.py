"""Encoder families: neutral target names resolve per family, the head of each family trains and is counted, and
``newslora budget`` (meta device) equals the built model's trainable parameters, on tiny random-init configs.

The expected module names below are the families' own layer layouts as transformers defines them (the spec the
resolver must meet); expected counts come from the layer shapes: a LoRA of rank r on a d_in x d_out linear layer
trains r * (d_in + d_out) parameters, a fully trained module all of its parameters.
"""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROBERTA, TEST_CSV, TRAIN_CSV

from newslora import families
from newslora.cli import app
from newslora.config import load_recipe
from newslora.errors import NewsloraError
from newslora.model import build_model, count_trainable, load_backbone, target_names

H, FF, LAYERS, LABELS, VOCAB = 64, 128, 2, 4, 50265  # the roberta-base tokenizer's vocabulary, for training
ALL = ["q", "k", "v", "o", "ffn_in", "ffn_out"]
BERT_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
              "o": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}
# family -> (encoder layer prefix, neutral name -> module inside a layer, head modules trained in full)
SPEC = {
    "roberta": ("roberta.encoder.layer", BERT_LAYER, {"classifier.dense", "classifier.out_proj"}),
    "xlm-roberta": ("roberta.encoder.layer", BERT_LAYER, {"classifier.dense", "classifier.out_proj"}),
    "electra": ("electra.encoder.layer", BERT_LAYER, {"classifier.dense", "classifier.out_proj"}),
    "bert": ("bert.encoder.layer", BERT_LAYER, {"classifier"}),
    "mpnet": ("mpnet.encoder.layer", {"q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v",
                                      "o": "attention.attn.o", "ffn_in": "intermediate.dense",
                                      "ffn_out": "output.dense"}, {"classifier.dense", "classifier.out_proj"}),
    "deberta-v2": ("deberta.encoder.layer", {"q": "attention.self.query_proj", "k": "attention.self.key_proj",
                                             "v": "attention.self.value_proj", "o": "attention.output.dense",
                                             "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
                   {"pooler.dense", "classifier"}),
    "distilbert": ("distilbert.transformer.layer", {"q": "attention.q_lin", "k": "attention.k_lin",
                                                    "v": "attention.v_lin", "o": "attention.out_lin",
                                                    "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2"},
                   {"pre_classifier", "classifier"}),
}
EAGER_ONLY = {"mpnet", "deberta-v2"}  # no SDPA attention in transformers


def tiny_config(kind: str):
    import transformers as T

    size = dict(num_hidden_layers=LAYERS, hidden_size=H, intermediate_size=FF, num_attention_heads=2,
                vocab_size=VOCAB, max_position_embeddings=160)
    if kind == "distilbert":
        return T.DistilBertConfig(n_layers=LAYERS, dim=H, hidden_dim=FF, n_heads=2, vocab_size=VOCAB,
                                  max_position_embeddings=160)
    if kind == "deberta-v2":  # DeBERTa-v3's layout: relative attention sharing the content key/query projections
        return T.DebertaV2Config(**size, relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True,
                                 position_buckets=32, norm_rel_ebd="layer_norm", type_vocab_size=0)
    if kind == "electra":
        return T.ElectraConfig(**size, embedding_size=32)  # with ELECTRA's embedding projection (not a target)
    cls = {"roberta": T.RobertaConfig, "xlm-roberta": T.XLMRobertaConfig, "bert": T.BertConfig,
           "mpnet": T.MPNetConfig, "albert": T.AlbertConfig}[kind]
    return cls(**size)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``folder(kind)`` -> a config-only model folder of a tiny random-init model of that family."""
    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(kind)
            tiny_config(kind).save_pretrained(made[kind])
        return made[kind]

    return get


def overrides(path, *extra) -> list[str]:
    return [f"model.backbone={path}", "model.random_init=true", "lora.r=2", f"model.tokenizer={ROBERTA}", *extra]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def trainable_modules(model) -> set[str]:
    """Names of the modules with trainable parameters, PEFT's wrappers removed (``classifier.dense``, ``...q``)."""
    out = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            module = name.rsplit(".", 1)[0]  # drop weight / bias
            out.add(module.split(".lora_")[0])
    return out


def expected_count(base, names: list[str], head: set[str], r: int) -> int:
    mods = dict(base.named_modules())
    lora = sum(r * (mods[n].in_features + mods[n].out_features) for n in names)
    return lora + sum(p.numel() for n in head for p in mods[n].parameters(recurse=False))


# ----------------------------------------------------------------------------- every family, every kind


@pytest.mark.parametrize("kind", list(SPEC))
def test_budget_equals_the_built_model_and_names_what_the_recipe_names(kind, folder):
    prefix, layout, head = SPEC[kind]
    args = overrides(folder(kind), "lora.target_modules=[" + ",".join(ALL) + "]")
    r = cli("budget", *args, "--json")
    assert r.exit_code == 0, r.output
    counted = json.loads(r.stdout)["trainable"]

    recipe = load_recipe(None, args)
    model, b = build_model(recipe, ["a", "b", "c", "d"])
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    want = {f"{prefix}.{i}.{layout[t]}" for i in range(LAYERS) for t in ALL}
    assert trainable_modules(model) == want | head
    base = load_backbone(recipe, ["a", "b", "c", "d"])
    assert counted == built == b.total == expected_count(base, sorted(want), head, r=2)
    assert b.head == expected_count(base, [], head, r=2)


@pytest.mark.parametrize("kind", list(SPEC))
def test_attention_output_and_ffn_output_are_different_modules(kind, folder):
    recipe = lambda t: load_recipe(None, overrides(folder(kind), f"lora.target_modules=[{t}]"))  # noqa: E731
    base = load_backbone(recipe("o"), ["a", "b"], meta=True)
    mods = dict(base.named_modules())
    o, ffn_out = target_names(base, recipe("o")), target_names(base, recipe("ffn_out"))
    assert len(o) == len(ffn_out) == LAYERS and not set(o) & set(ffn_out)
    assert {(mods[n].in_features, mods[n].out_features) for n in o} == {(H, H)}
    assert {(mods[n].in_features, mods[n].out_features) for n in ffn_out} == {(FF, H)}
    ffn_in = target_names(base, recipe("ffn_in"))
    assert {(mods[n].in_features, mods[n].out_features) for n in ffn_in} == {(H, FF)}


@pytest.mark.parametrize("kind, own", [("roberta", "[query,value]"), ("deberta-v2", "[query_proj,value_proj]"),
                                       ("distilbert", "[q_lin,v_lin]"), ("mpnet", "[q,v]"), ("mpnet", "[query,value]"),
                                       ("electra", "[query,value]"), ("bert", "[attention.self.query,value]")])
def test_family_names_and_synonyms_mean_the_same_modules(kind, own, folder):
    recipe = lambda t: load_recipe(None, overrides(folder(kind), f"lora.target_modules={t}"))  # noqa: E731
    base = load_backbone(recipe("[q,v]"), ["a", "b"], meta=True)
    assert target_names(base, recipe(own)) == target_names(base, recipe("[q,v]"))


@pytest.mark.parametrize("kind", list(SPEC))
def test_attention_implementation_is_one_the_family_has(kind, folder):
    base = load_backbone(load_recipe(None, overrides(folder(kind))), ["a", "b"], meta=True)
    assert base.config._attn_implementation == ("eager" if kind in EAGER_ONLY else "sdpa")
    assert families.FAMILIES[kind].sdpa == type(base)._supports_sdpa  # the table agrees with transformers
    eager = load_backbone(load_recipe(None, overrides(folder(kind), "model.attn_implementation=eager")), ["a"],
                          meta=True)
    assert eager.config._attn_implementation == "eager"


def test_mpnet_config_folder_counts_through_the_cli(folder):
    # the failure this replaces: "MPNetForSequenceClassification does not support ... scaled_dot_product_attention"
    r = cli("budget", *overrides(folder("mpnet"), "lora.target_modules=[q,k,v]"))
    assert r.exit_code == 0, r.output
    assert "attention.attn.q" in r.stdout and "classification head" in r.stdout


def test_layer_selection_with_neutral_names(folder):
    recipe = load_recipe(None, overrides(folder("distilbert"), "lora.target_modules=[o,ffn_out]", "lora.layers=[1]"))
    base = load_backbone(recipe, ["a", "b"], meta=True)
    assert target_names(base, recipe) == ["distilbert.transformer.layer.1.attention.out_lin",
                                          "distilbert.transformer.layer.1.ffn.lin2"]
    b = count_trainable(recipe)
    assert set(b.by_layer) == {"1", "head"} and b.adapter == 2 * (H + H) + 2 * (FF + H)


@pytest.mark.parametrize("kind", ["roberta", "mpnet", "deberta-v2", "electra"])
def test_head_lora_low_ranks_the_family_head_dense(kind, folder):
    recipe = load_recipe(None, overrides(folder(kind), "lora.target_modules=[q,v]", "head.type=lora", "head.r=3"))
    model, b = build_model(recipe, ["a", "b", "c", "d"])
    prefix, layout, head = SPEC[kind]
    dense, out = {"deberta-v2": ("pooler.dense", "classifier")}.get(kind, ("classifier.dense", "classifier.out_proj"))
    want = {f"{prefix}.{i}.{layout[t]}" for i in range(LAYERS) for t in ("q", "v")}
    assert trainable_modules(model) == want | {dense, out}
    assert not any(n.startswith(f"base_model.model.{dense}.") and "lora_" not in n
                   for n, p in model.named_parameters() if p.requires_grad)  # the dense base stays frozen
    assert b.head == 3 * (H + H) + H * LABELS + LABELS == count_trainable(recipe).head


@pytest.mark.parametrize("kind, words", [("bert", "single linear layer"), ("distilbert", "pre_classifier")])
def test_head_lora_refused_where_it_cannot_be_exact(kind, words, folder):
    r = cli("budget", *overrides(folder(kind), "head.type=lora"))
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and words in lines[0] and "head.type=full" in lines[0], r.output


def test_auto_fit_with_neutral_names(folder):
    recipe = load_recipe(None, overrides(folder("mpnet"), "lora.target_modules=[q,k,v,o,ffn_in,ffn_out]",
                                         "budget.auto_fit=true", "budget.max_params=60000"))
    b = count_trainable(recipe)
    r = b.fit["chosen"]
    head = H * H + H + H * LABELS + LABELS
    per_rank = LAYERS * (4 * 2 * H + 2 * (H + FF))
    assert b.total == head + r * per_rank <= 60000 < head + (r + 1) * per_rank


# ----------------------------------------------------------------------------- unknown family, bad names


def test_unknown_family_with_neutral_names_is_one_line_naming_its_modules(folder):
    r = cli("budget", *overrides(folder("albert"), "lora.target_modules=[q,v]"))
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    for words in ("albert", "attention.query", "attention.value", "ffn_output", "q", "v"):
        assert words in lines[0], (words, lines[0])
    # its own names keep working
    assert cli("budget", *overrides(folder("albert"), "lora.target_modules=[query,value]")).exit_code == 0


def test_unknown_module_name_lists_the_neutral_and_the_family_names(folder):
    recipe = load_recipe(None, overrides(folder("deberta-v2"), "lora.target_modules=[q,nonesuch]"))
    with pytest.raises(NewsloraError) as e:
        count_trainable(recipe)
    msg = str(e.value)
    assert "['nonesuch']" in msg and "ffn_out" in msg and "attention.self.query_proj" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- roberta-base and mpnet-base


def test_roberta_base_neutral_names_give_the_seed_004_count():
    b = count_trainable(load_recipe(None, [f"model.backbone={ROBERTA}", "lora.r=6", "lora.target_modules=[q,k,v]"]))
    assert b.total == 925_444
    assert set(b.by_module) == {"attention.self.query", "attention.self.key", "attention.self.value"}


def test_mpnet_base_missing_is_one_line_naming_the_install_script(tmp_path, monkeypatch):
    monkeypatch.setenv("NEWSLORA_MPNET", str(tmp_path / "nowhere"))
    r = cli("budget", "model.backbone=mpnet-base")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "scripts/install_mpnet.sh" in lines[0], r.output


def test_mpnet_base_resolves_to_the_assembled_folder(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    # a folder laid out as the install script leaves it (config + weights), here with a tiny model's files
    AutoModelForSequenceClassification.from_config(tiny_config("mpnet")).save_pretrained(tmp_path / "mpnet-base")
    monkeypatch.setenv("NEWSLORA_MPNET", str(tmp_path / "mpnet-base"))
    r = cli("budget", "model.backbone=mpnet-base", "lora.target_modules=[q,k,v]", "lora.r=6", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["trainable"] == LAYERS * 3 * 6 * (H + H) + H * H + H + H * LABELS + LABELS


# ----------------------------------------------------------------------------- training end to end


@pytest.mark.parametrize("kind", ["mpnet", pytest.param("deberta-v2", marks=pytest.mark.slow),
                                  pytest.param("distilbert", marks=pytest.mark.slow)])  # one family in the fast loop
def test_tiny_family_trains_reloads_and_exports(kind, folder, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from newslora.export import export
    from newslora.predict import load_classifier
    from newslora.train import train

    recipe = load_recipe(None, overrides(folder(kind), "lora.target_modules=[q,v,ffn_out]", "model.max_length=32",
                                         f"data.source={TRAIN_CSV}", f"data.test={TEST_CSV}", "data.validation_size=16",
                                         "data.max_train_samples=64", "data.max_test_samples=16", "train.max_steps=3",
                                         "train.batch_size=16", "train.eval_batch_size=32", "train.lr=3e-3"))
    res = train(recipe, run_dir=tmp_path / "run")
    assert res.eval["test"]["n"] == 16
    clf = load_classifier(res.run_dir)
    texts = ["Stocks fell sharply on Wall Street.", "The striker scored twice in the final."]
    probs = clf.predict_proba(texts)
    merged = AutoModelForSequenceClassification.from_pretrained(export(res.run_dir))
    enc = clf.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
    merged.eval()
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits.softmax(-1), torch.as_tensor(probs, dtype=torch.float32),
                              atol=1e-4)


@pytest.mark.parametrize("extra, count", [
    (["--config", "configs/targeted.yaml", "lora.target_modules=[q,k,o,ffn_out]"], 973_828),  # auto_fit: r=9
    (["head.type=lora", "head.r=8", "lora.target_modules=[q,v]"], 15_364 + 24 * 8 * 1_536),
])
def test_roberta_base_seed_settings_with_neutral_names(extra, count):
    from conftest import REPO

    args = [str(REPO / a) if a.startswith("configs/") else a for a in extra]
    r = cli("budget", *args, f"model.backbone={ROBERTA}", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["trainable"] == count


# ----------------------------------------------------------------------------- the backbone table

# ids of models that exist on the Hugging Face hub (their model pages), written out here, not derived
KNOWN_HUB_IDS = {"sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-mpnet-base-v2",
                 "FacebookAI/roberta-base"}


@pytest.mark.parametrize("alias", sorted(families.BACKBONES))
def test_every_alias_names_a_real_hub_model(alias):
    hub = families.hub_id(alias)
    assert hub in KNOWN_HUB_IDS and hub.count("/") == 1
    assert families.hub_id(alias.upper()) == hub  # recipes may write the alias in any case
    assert families.BACKBONES[alias].family in families.FAMILIES


def test_adapter_config_names_the_hub_id(tmp_path):
    """A run on an alias records the hub id of its alias in adapter_config.json, where PEFT and the hub read it."""
    from newslora.run import Run

    run = Run(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "recipe.yaml").write_text("model:\n  backbone: mpnet-base\n")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/abs/x"}))
    run.finish_adapter()
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "sentence-transformers/all-mpnet-base-v2"
