"""Data stage: every supported format reads to the same rows; splits are stratified and disjoint; bad files fail."""
import json

import pandas as pd
import pytest

from conftest import TEST_CSV, TRAIN_CSV
from newslora.config import DataConfig
from newslora.data import AG_NEWS_LABELS, load_splits, tokenize
from newslora.readers import read_table
from newslora.errors import NewsloraError


@pytest.fixture(scope="module")
def sample():
    return pd.read_csv(TRAIN_CSV).groupby("label").head(50).reset_index(drop=True)  # 200 rows, every class


def test_classic_ag_news_csv():
    df = read_table(TEST_CSV)
    assert len(df) == 7600
    assert sorted(df["label"].unique()) == [0, 1, 2, 3]
    assert (df["label"].value_counts() == 1900).all()
    # text = title + " " + description
    assert df["text"].iloc[0].startswith("Fears for T N pension after talks Unions representing workers")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_formats_read_the_same(tmp_path, sample, fmt):
    f = tmp_path / f"d.{fmt}"
    renamed = sample.rename(columns={"text": "body", "label": "y"})
    {"csv": lambda: renamed.to_csv(f, index=False), "tsv": lambda: renamed.to_csv(f, sep="\t", index=False),
     "jsonl": lambda: renamed.to_json(f, orient="records", lines=True),
     "parquet": lambda: renamed.to_parquet(f)}[fmt]()
    df = read_table(f, text_column="body", label_column="y")
    assert df["text"].tolist() == sample["text"].tolist()
    assert df["label"].tolist() == sample["label"].tolist()


def test_splits_stratified_disjoint_and_seeded():
    cfg = DataConfig(source=str(TRAIN_CSV), test=str(TEST_CSV), validation_size=400, max_train_samples=2000)
    s = load_splits(cfg)
    assert s.label_names == AG_NEWS_LABELS  # from classes.txt next to the file
    assert len(s.validation) == 400 and len(s.train) == 2000 and len(s.test) == 7600
    assert set(s.train["text"]).isdisjoint(s.validation["text"])
    assert s.validation["label"].value_counts().max() - s.validation["label"].value_counts().min() <= 2
    again = load_splits(cfg)
    assert again.validation["text"].tolist() == s.validation["text"].tolist()
    other = load_splits(DataConfig(source=str(TRAIN_CSV), validation_size=400, max_train_samples=2000, seed=7))
    assert other.validation["text"].tolist() != s.validation["text"].tolist()
    assert other.test is None


def test_string_labels_and_recipe_names(tmp_path):
    f = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(40)], "label": ["sport", "tech"] * 20}).to_csv(f, index=False)
    s = load_splits(DataConfig(source=str(f), validation_size=0.25))
    assert s.label_names == ["sport", "tech"]
    s2 = load_splits(DataConfig(source=str(f), validation_size=0.25, label_names=["tech", "sport"]))
    assert s2.label_names == ["tech", "sport"]
    rows = pd.concat([s2.train, s2.validation])
    assert dict(zip(rows["text"], rows["label"]))["t0"] == 1  # "sport" is class 1 by the recipe's order


def test_folder_source(tmp_path, sample):
    sample.to_csv(tmp_path / "train.csv", index=False)
    sample.head(40).to_csv(tmp_path / "test.csv", index=False)
    s = load_splits(DataConfig(source=str(tmp_path), validation_size=40))
    assert len(s.train) == 160 and len(s.test) == 40


def _write(tmp_path, name, content, mode="w"):
    f = tmp_path / name
    (f.write_bytes if mode == "wb" else f.write_text)(content)
    return f


@pytest.mark.parametrize("name, content, words", [
    ("missing.csv", None, ["not found"]),
    ("nocol.csv", "body,label\nhello,1\n", ["column 'text' not found", "data.text_column"]),
    ("range.csv", "text,label\n" + "".join(f"t{i},{i % 4}\n" for i in range(20)) + "bad,7\n",
     ["label 7", "out of range 0..3"]),
    ("empty.csv", "text,label\n" + "".join(f"t{i},{i % 4}\n" for i in range(20)) + '"  ",1\n',
     ["1 empty text", "row 20"]),
    ("latin1.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"), ["not UTF-8", "UTF-8"]),
    ("unlabelled.csv", "text,label\nhello,\nworld,1\n", ["no label"]),
    ("data.xml", "<x/>", ["unsupported file type"]),
])
def test_bad_inputs(tmp_path, name, content, words):
    if content is None:
        f = tmp_path / name
    else:
        f = _write(tmp_path, name, content, "wb" if isinstance(content, bytes) else "w")
    names = AG_NEWS_LABELS if name == "range.csv" else None
    with pytest.raises(NewsloraError) as e:
        load_splits(DataConfig(source=str(f), validation_size=4, label_names=names))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_hub_unreachable_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(NewsloraError) as e:
        load_splits(DataConfig(source="ag_news"))
    msg = str(e.value)
    assert "hub" in msg and "data.source=" in msg and "\n" not in msg


def test_tokenize_is_cached_and_unpadded(tmp_path, monkeypatch, sample):
    import newslora.data as data
    from newslora.model import load_tokenizer

    monkeypatch.setattr(data, "CACHE_ROOT", tmp_path)
    tok = load_tokenizer(str(TEST_CSV.parents[2] / "models" / "roberta-base"))
    ds = tokenize(sample, tok, 32)
    assert ds.num_rows == 200 and max(ds["length"]) <= 32 and min(ds["length"]) < 32
    assert ds["labels"] == sample["label"].tolist()
    entries = list((tmp_path / "tokenized").iterdir())
    assert len(entries) == 1
    calls = []
    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: calls.append(1))
    again = tokenize(sample, tok, 32)  # served from the cache: the tokenizer is not called
    assert not calls and again["input_ids"] == ds["input_ids"]
    json.loads((entries[0] / "dataset_info.json").read_text())
