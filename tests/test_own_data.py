"""Data of the user's own: any label set counted exactly by budget and train alike, text from several columns,
which end of a long text is kept, class weights, and prediction files in four formats with the input's IDs."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import REPO, ROBERTA, TINY, tiny_overrides
from newslora.cli import app

runner = CliRunner()
QKV = REPO / "configs" / "seed-004-lora-r6-qkv.yaml"
RB = f"model.backbone={ROBERTA}"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def dataset(path: Path, k: int, per_class: int = 3, ints: bool = False, skew: bool = False) -> Path:
    """k classes (names ``c000``.. or integers 0..k-1), a title and a body column; ``skew``: class 0 has 6x the
    rows."""
    rows = []
    for c in range(k):
        for i in range(per_class * (6 if skew and c == 0 else 1)):
            rows.append({"title": f"headline {c} number {i}", "body": f"the body of story {i} about topic {c}",
                         "label": c if ints else f"c{c:03d}"})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).sample(frac=1, random_state=0).to_csv(path, index=False)
    return path


def lora_count(hidden: int, layers: int, r: int, modules: int = 3) -> int:
    """LoRA's trainable count from the layer shapes: A (r x d_in) + B (d_out x r) per targeted square layer."""
    return layers * modules * r * (hidden + hidden)


def roberta_head(hidden: int, k: int) -> int:  # dense (hidden x hidden + bias) + out_proj (hidden x k + bias)
    return hidden * hidden + hidden + hidden * k + k


def budget_json(*overrides) -> dict:
    r = cli("budget", "-c", QKV, "--json", *overrides)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# ----------------------------------------------------------------------------- one label set


@pytest.mark.parametrize("k, ints", [(2, False), (20, False), (200, True)])
def test_budget_counts_the_data_classes(tmp_path, k, ints):
    """No data.label_names: the training file's label column decides the head (string or integer labels)."""
    data = dataset(tmp_path / "d.csv", k, ints=ints, per_class=2)
    args = [RB, f"data.source={data}", "data.text_columns=[title,body]"]
    want = lora_count(768, 12, 6) + roberta_head(768, k)
    if k == 20:
        assert want == 937_748  # the count the issue names
    if want > 1_000_000:  # 200 classes: 1,076,168, refused with the fix
        assert want == 1_076_168
        r = cli("budget", "-c", QKV, *args)
        assert r.exit_code == 1 and f"{want:,}" in r.stdout
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "head.type: lora" in errors[0] and "smaller rank" in errors[0], r.output
        lora_head = lora_count(768, 1, 8, modules=1) + 768 * k + k  # head.r=8 on the dense layer
        assert budget_json(*args, "head.type=lora")["trainable"] == lora_count(768, 12, 6) + lora_head
    else:
        d = budget_json(*args)
        assert d["trainable"] == want and d["num_labels"] == k
        assert 0 < d["trainable_share"] < 0.01 and d["params"] > 124_000_000


def test_budget_on_ag_news_stays_offline():
    assert budget_json(RB)["trainable"] == 925_444  # data.source: ag_news; HF_DATASETS_OFFLINE=1 in conftest


def test_auto_fit_uses_the_data_classes(tmp_path):
    """budget.auto_fit in budget and in train's preparation choose the same rank for a 200-class file."""
    from newslora.config import load_recipe
    from newslora.train import prepare

    data = dataset(tmp_path / "d.csv", 200, ints=True, per_class=2)
    args = [RB, f"data.source={data}", "data.text_columns=[title,body]", "head.type=lora", "budget.auto_fit=true",
            "data.validation_size=200"]
    d = budget_json(*args)
    recipe = load_recipe(QKV, args)
    _, splits, b = prepare(recipe)
    assert len(splits.label_names) == 200
    assert b.fit["chosen"] == d["auto_fit"]["chosen"] and b.total == d["trainable"]


def test_train_counts_what_budget_counts_and_refuses_the_same_head(tmp_path, monkeypatch):
    """20 string classes on a tiny roberta (counted from its layer shapes): budget and train print the same total;
    200 classes on roberta-base: both refuse the full head before any weights load, and no run folder appears."""
    monkeypatch.chdir(tmp_path)
    data = dataset(tmp_path / "d.csv", 20, per_class=3)
    tiny = tiny_overrides(**{"data.source": data, "data.text_columns": "[title,body]", "data.test": "null",
                             "data.validation_size": 20, "data.max_train_samples": "null", "train.max_steps": 1,
                             "lora.target_modules": "[query,key,value]", "lora.r": 6})
    want = lora_count(TINY["hidden_size"], TINY["num_hidden_layers"], 6) + roberta_head(TINY["hidden_size"], 20)
    assert budget_json(*tiny)["trainable"] == want
    r = cli("train", "-c", QKV, *tiny, "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert f"{want:,}" in r.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["trainable"]["total"] == want

    big = dataset(tmp_path / "big.csv", 200, ints=True, per_class=2)
    r = cli("train", "-c", QKV, RB, "model.random_init=true", f"data.source={big}", "data.text_columns=[title,body]",
            "data.validation_size=200", "train.max_steps=1", "--run-dir", tmp_path / "big-run")
    assert r.exit_code == 2 and "1,076,168" in r.output and "head.type: lora" in r.output, r.output
    assert not (tmp_path / "big-run").exists() and not (tmp_path / "runs").exists()


def test_minilm_counts_from_its_layer_shapes(tmp_path):
    """MiniLM (384 wide, 6 layers, BERT's one-linear head): 20 and 200 classes counted from the shapes; over a
    budget the 200-class head is refused with the fix, and the smaller rank it names fits."""
    for k in (20, 200):
        data = dataset(tmp_path / f"d{k}.csv", k, per_class=2)
        d = budget_json("model.backbone=minilm", f"data.source={data}", "data.text_columns=[title,body]")
        assert d["trainable"] == lora_count(384, 6, 6) + 384 * k + k
    args = ["model.backbone=minilm", f"data.source={data}", "data.text_columns=[title,body]",
            "budget.max_params=150000"]
    r = cli("budget", "-c", QKV, *args)
    assert r.exit_code == 1 and "smaller rank" in r.output
    assert budget_json(*args, "lora.r=4")["trainable"] == lora_count(384, 6, 4) + 384 * 200 + 200


# ----------------------------------------------------------------------------- truncation


def test_truncation_keeps_the_right_token_ids():
    from newslora.model import load_tokenizer
    from newslora.texts import tokenize_texts

    tok = load_tokenizer(str(ROBERTA))
    text = " ".join(f"w{i}" for i in range(60))
    bare = tok(text, add_special_tokens=False)["input_ids"]
    bos, eos = tok.cls_token_id, tok.sep_token_id
    assert len(bare) > 20
    head = tokenize_texts(tok, [text], 12, "head")["input_ids"][0]
    tail = tokenize_texts(tok, [text], 12, "tail")["input_ids"][0]
    both = tokenize_texts(tok, [text], 12, "head_tail")
    assert head == [bos, *bare[:10], eos]
    assert tail == [bos, *bare[-10:], eos]
    assert both["input_ids"][0] == [bos, *bare[:5], *bare[-5:], eos] and both["attention_mask"][0] == [1] * 12
    short = tokenize_texts(tok, ["a short one"], 12, "head_tail")["input_ids"][0]
    assert short == tok("a short one")["input_ids"]


# ----------------------------------------------------------------------------- one run read back without being told


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A tiny run on a 3-class CSV with title and body columns, head_tail truncation and balanced class weights."""
    from newslora.config import load_recipe
    from newslora.train import train

    root = tmp_path_factory.mktemp("own")
    data = dataset(root / "train.csv", 3, per_class=8, skew=True)
    recipe = load_recipe(None, tiny_overrides(**{
        "data.source": data, "data.test": "null", "data.validation_size": 6, "data.max_train_samples": "null",
        "data.text_columns": "[title,body]", "model.truncation": "head_tail", "model.max_length": 16,
        "train.class_weights": "balanced", "train.max_steps": 2, "train.eval_steps": 2}))
    return train(recipe, run_dir=root / "run").run_dir


def test_run_records_its_reading_and_class_weights(own_run):
    from newslora.predict import load_classifier

    info = json.loads((own_run / "run.json").read_text())
    assert info["text"] == {"text_columns": ["title", "body"], "truncation": "head_tail"}
    w = info["class_weights"]
    assert len(w) == 3 and w[0] < w[1] == pytest.approx(w[2])  # class 0 has 6x the rows: the smallest weight
    clf = load_classifier(own_run, device="cpu")
    assert clf.truncation == "head_tail" and clf.text_columns == ["title", "body"]


def test_class_weights_change_the_loss(tmp_path):
    """The same batch through the same model: the balanced loss is the weighted cross-entropy, not the plain one."""
    import torch

    from newslora.config import load_recipe
    from newslora.train import setup

    data = dataset(tmp_path / "d.csv", 3, per_class=6, skew=True)
    losses = {}
    for mode in ("none", "balanced"):
        s = setup(load_recipe(None, tiny_overrides(**{
            "data.source": data, "data.test": "null", "data.validation_size": 6, "data.max_train_samples": "null",
            "data.text_columns": "[title,body]", "train.class_weights": mode})), tmp_path / mode)
        batch = s.trainer.data_collator([s.train_dataset[i] for i in range(8)])
        s.model.eval()
        with torch.no_grad():
            losses[mode] = float(s.trainer.compute_loss(s.model, dict(batch)))
            logits = s.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        weights = s.info["class_weights"]
    plain = torch.nn.functional.cross_entropy(logits, batch["labels"])
    weighted = torch.nn.functional.cross_entropy(logits, batch["labels"], weight=torch.tensor(weights))
    assert losses["none"] == pytest.approx(float(plain), rel=1e-5)
    assert losses["balanced"] == pytest.approx(float(weighted), rel=1e-5)
    assert abs(losses["balanced"] - losses["none"]) > 1e-4


def test_predict_writes_each_format_with_the_input_ids(own_run, tmp_path):
    """New rows with title and body (and a label column that must not reach the text) predicted without naming
    the columns again; the input's ``ID`` column comes back in every format."""
    from newslora.predict import load_classifier

    new = pd.DataFrame({"ID": [f"doc-{i}" for i in (7, 3, 9)], "title": ["a title", "other title", "third"],
                        "body": ["some body", "another body", "last body"], "label": ["c000", "c001", "c002"]})
    src = tmp_path / "new.csv"
    new.to_csv(src, index=False)
    clf = load_classifier(own_run, device="cpu")
    want = clf.predict_proba((new["title"] + " " + new["body"]).tolist()).argmax(-1).tolist()
    readers = {".csv": pd.read_csv, ".tsv": lambda p: pd.read_csv(p, sep="\t"),
               ".jsonl": lambda p: pd.read_json(p, lines=True), ".parquet": pd.read_parquet}
    for fmt, read in readers.items():
        out = tmp_path / f"pred{fmt}"
        r = cli("predict", own_run, "-i", src, "-o", out, "--extra-columns")
        assert r.exit_code == 0, r.output
        got = read(out)
        assert list(got.columns[:3]) == ["ID", "Label", "label_name"], fmt
        assert got["ID"].tolist() == new["ID"].tolist() and got["Label"].tolist() == want, fmt


def test_predict_id_column_option_and_default_numbering(own_run, tmp_path):
    src = tmp_path / "new.csv"
    pd.DataFrame({"key": [11, 12], "title": ["t1", "t2"], "body": ["b1", "b2"]}).to_csv(src, index=False)
    assert cli("predict", own_run, "-i", src, "-o", tmp_path / "a.csv", "--id-column", "key").exit_code == 0
    assert pd.read_csv(tmp_path / "a.csv")["ID"].tolist() == [11, 12]
    assert cli("predict", own_run, "-i", src, "-o", tmp_path / "b.csv").exit_code == 0
    assert pd.read_csv(tmp_path / "b.csv")["ID"].tolist() == [0, 1]


def test_evaluate_reads_the_run_columns(own_run, tmp_path):
    data = dataset(tmp_path / "eval.csv", 3, per_class=2)
    r = cli("evaluate", own_run, "--data", data)
    assert r.exit_code == 0 and "(n=6)" in r.output, r.output


def test_skewed_class_too_small_to_stratify(tmp_path):
    from newslora.config import DataConfig
    from newslora.data import load_splits
    from newslora.errors import NewsloraError

    data = dataset(tmp_path / "d.csv", 3, per_class=4)
    df = pd.read_csv(data)
    df = pd.concat([df[df["label"] != "c002"], df[df["label"] == "c002"].head(1)])
    df.to_csv(data, index=False)
    with pytest.raises(NewsloraError, match="class 'c002' has only 1 training row.*data.validation"):
        load_splits(DataConfig(source=str(data), text_columns=["title", "body"], validation_size=3))


def test_merged_folder_reads_like_its_run(own_run, tmp_path):
    """The merged export answers with its run's columns and truncation, so predict needs no --text-column."""
    from newslora.export import export
    from newslora.modelfolder import describe

    merged = describe(export(own_run, tmp_path / "merged"))
    assert (merged.text_columns, merged.truncation) == (["title", "body"], "head_tail")
    merged = merged.path
    src = tmp_path / "new.jsonl"
    pd.DataFrame({"id": [5, 6], "title": ["t1", "t2"], "body": ["b1", "b2"]}).to_json(src, orient="records",
                                                                                   lines=True)
    r = cli("predict", merged, "-i", src, "-o", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    assert pd.read_csv(tmp_path / "p.csv")["ID"].tolist() == [5, 6]
