"""Data stage: read a hub dataset or local files, carve a stratified validation split, tokenize once (cached).

Local formats: the classic AG News CSV (no header; class 1-4, title, description), and CSV / TSV / JSONL /
parquet with text and label columns. Label names come from the recipe, the hub's ClassLabel feature, a
``classes.txt`` next to the file, or string labels in the data.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import DataConfig
from .errors import NewsloraError

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt"}
CACHE_ROOT = Path(os.environ.get("NEWSLORA_CACHE", Path.home() / ".cache" / "newslora"))


@dataclass
class Splits:
    train: pd.DataFrame  # columns: text, label (int)
    validation: pd.DataFrame
    test: pd.DataFrame | None
    label_names: list[str]
    source: str


# ----------------------------------------------------------------------------- reading


def looks_like_path(s: str) -> bool:
    """A local path (existing, or written like one) rather than a hub id such as ``ag_news`` or ``org/name``."""
    return Path(s).expanduser().exists() or s.startswith((".", "~", "/")) or Path(s).suffix.lower() in TABLE_SUFFIXES


def read_table(path: str | Path, text_column: str = "text", label_column: str | None = "label") -> pd.DataFrame:
    """Read one local file into a DataFrame with ``text`` (and ``label`` when label_column is given).

    Labels are returned as found (ints or strings); :func:`encode_labels` maps them to ids.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise NewsloraError(f"data file not found: {path} (check the path, or use a hub id such as ag_news)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            classic = _classic_ag_news(path, sep, text_column)
            if classic is not None:
                return classic
            df = pd.read_csv(path, sep=sep, encoding="utf-8", keep_default_na=False, dtype=str if label_column is None else None)
        elif suffix in (".jsonl", ".json"):
            df = pd.read_json(path, lines=suffix == ".jsonl", encoding="utf-8")
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            df = pd.DataFrame({text_column: [ln for ln in lines if ln.strip()]})
        else:
            raise NewsloraError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl, .parquet or .txt")
    except UnicodeDecodeError as e:
        raise NewsloraError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except (ValueError, pd.errors.ParserError) as e:
        raise NewsloraError(f"{path} could not be parsed as {suffix[1:]}: {str(e).splitlines()[0]}") from None
    return _select_columns(df, path, text_column, label_column)


def _classic_ag_news(path: Path, sep: str, text_column: str) -> pd.DataFrame | None:
    """The classic AG News form: no header, 3 columns (class 1-4, title, description)."""
    with open(path, encoding="utf-8", newline="") as f:
        first = next(csv.reader(f, delimiter=sep), None)
    if not first or len(first) != 3 or text_column in first or not first[0].strip().isdigit():
        return None
    df = pd.read_csv(path, sep=sep, header=None, names=["cls", "title", "description"], encoding="utf-8",
                     keep_default_na=False, dtype={"cls": str})
    cls = pd.to_numeric(df["cls"], errors="coerce")
    bad = cls.isna() | ~cls.isin(range(1, 10))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 1
        raise NewsloraError(f"{path}, line {row}: class {df['cls'].iloc[row - 1]!r} is not 1-based integer "
                            "(classic AG News form: class 1-4, title, description)")
    text = (df["title"].str.strip() + " " + df["description"].str.strip()).str.strip()
    return pd.DataFrame({"text": text, "label": cls.astype(int) - 1})


def _select_columns(df: pd.DataFrame, path: Path, text_column: str, label_column: str | None) -> pd.DataFrame:
    missing = [c for c in (text_column, label_column) if c is not None and c not in df.columns]
    if missing:
        key = "data.text_column" if missing[0] == text_column else "data.label_column"
        raise NewsloraError(f"{path}: column {missing[0]!r} not found (columns: {', '.join(map(str, df.columns))}); "
                            f"set {key} to the right name")
    out = pd.DataFrame({"text": df[text_column].astype(str)})
    if label_column is not None:
        out["label"] = df[label_column].to_numpy()
    return out


def find_label_names(path: Path) -> list[str] | None:
    for folder in (path.parent, path.parent.parent):
        f = folder / "classes.txt"
        if f.is_file():
            names = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            return names or None
    return None


def encode_labels(df: pd.DataFrame, names: list[str] | None, where: str) -> tuple[pd.DataFrame, list[str]]:
    """Map labels to ids 0..K-1 and check them; returns the frame and the label names."""
    labels = df["label"]
    missing = labels.isna() | (labels.astype(str).str.strip() == "")
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise NewsloraError(f"{where}: row {row} has no label; fill or drop unlabelled rows")
    if not pd.api.types.is_numeric_dtype(labels):
        as_num = pd.to_numeric(labels.astype(str).str.strip(), errors="coerce")
        if as_num.notna().all():
            labels = as_num
        else:  # string labels: names are the sorted distinct values unless the recipe gives them
            values = labels.astype(str).str.strip()
            names = names or sorted(values.unique())
            unknown = sorted(set(values) - set(names))
            if unknown:
                raise NewsloraError(f"{where}: labels {unknown[:5]} are not in data.label_names {names}")
            lookup = {n: i for i, n in enumerate(names)}
            return df.assign(label=values.map(lookup).to_numpy()), list(names)
    if not np.all(np.asarray(labels, dtype=float) == np.asarray(labels, dtype=float).round()):
        raise NewsloraError(f"{where}: labels must be integers or class names")
    labels = labels.astype(int)
    k = len(names) if names else int(labels.max()) + 1
    bad = (labels < 0) | (labels >= k)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise NewsloraError(f"{where}: label {labels.iloc[row]} at row {row} is out of range 0..{k - 1} "
                            f"(label names: {names or 'none given'}); fix the file or set data.label_names")
    return df.assign(label=labels.to_numpy()), names or [str(i) for i in range(k)]


def check_texts(df: pd.DataFrame, where: str) -> pd.DataFrame:
    empty = df["text"].isna() | (df["text"].astype(str).str.strip() == "")
    if empty.any():
        rows = np.flatnonzero(empty.to_numpy())
        raise NewsloraError(f"{where}: {len(rows)} empty text(s), first at row {int(rows[0])}; drop or fill them")
    return df


def _load_local(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str] | None]:
    src = Path(cfg.source).expanduser()
    test_path = Path(cfg.test).expanduser() if cfg.test else None
    if src.is_dir():
        train_path = find_split_file(src, "train")
        test_path = test_path or find_split_file(src, "test", required=False)
    else:
        train_path = src
    train = read_table(train_path, cfg.text_column, cfg.label_column)
    test = read_table(test_path, cfg.text_column, cfg.label_column) if test_path else None
    return train, test, cfg.label_names or find_label_names(train_path)


def find_split_file(folder: Path, stem: str, required: bool = True) -> Path | None:
    hits = sorted(p for p in folder.iterdir() if p.stem.startswith(stem) and p.suffix.lower() in TABLE_SUFFIXES)
    if not hits and required:
        raise NewsloraError(f"{folder}: no {stem}.csv/.tsv/.jsonl/.parquet file inside; name the file in data.source")
    return hits[0] if hits else None


def _load_hub(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str] | None]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source)
    except Exception as e:  # offline, unknown id, auth: one line with the way out
        raise NewsloraError(
            f"cannot load dataset {cfg.source!r} from the Hugging Face hub ({type(e).__name__}); "
            "offline? pass a local file or folder instead, e.g. data.source=../shared/data/ag_news/train_sample.csv "
            "data.test=../shared/data/ag_news/test.csv") from None
    names = cfg.label_names
    feat = ds["train"].features.get(cfg.label_column)
    if names is None and hasattr(feat, "names"):
        names = list(feat.names)
    frames = {s: _select_columns(ds[s].to_pandas(), Path(cfg.source), cfg.text_column, cfg.label_column) for s in ds}
    return frames["train"], frames.get("test"), names


def load_splits(cfg: DataConfig) -> Splits:
    """Read train/test, encode labels, carve the stratified validation split from train."""
    if looks_like_path(cfg.source):
        train, test, names = _load_local(cfg)
    else:
        train, test, names = _load_hub(cfg)
        if cfg.test:
            test = read_table(cfg.test, cfg.text_column, cfg.label_column)
    if names is None and cfg.source.rstrip("/").split("/")[-1].startswith("ag_news"):
        names = AG_NEWS_LABELS
    train = check_texts(train, f"{cfg.source} (train)")
    train, names = encode_labels(train, names, f"{cfg.source} (train)")
    if test is not None:
        test = check_texts(test, f"{cfg.test or cfg.source} (test)")
        test, _ = encode_labels(test, names, f"{cfg.test or cfg.source} (test)")
        if cfg.max_test_samples:
            test = _stratified_head(test, cfg.max_test_samples, cfg.seed)
    if cfg.validation:
        validation = check_texts(read_table(cfg.validation, cfg.text_column, cfg.label_column),
                                 f"{cfg.validation} (validation)")
        validation, _ = encode_labels(validation, names, f"{cfg.validation} (validation)")
    else:
        train, validation = _split(train, cfg)
    if cfg.max_train_samples:
        train = _stratified_head(train, cfg.max_train_samples, cfg.seed)
    return Splits(train.reset_index(drop=True), validation.reset_index(drop=True),
                  None if test is None else test.reset_index(drop=True), names, cfg.source)


def _split(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    size = cfg.validation_size if cfg.validation_size < 1 else int(cfg.validation_size)
    n_val = size if isinstance(size, int) else int(round(size * len(df)))
    counts = df["label"].value_counts()
    if n_val < len(counts) or len(df) - n_val < len(counts):
        raise NewsloraError(f"data.validation_size={cfg.validation_size} leaves {n_val} validation rows of {len(df)}: "
                            f"need at least one per class ({len(counts)}) on both sides")
    stratify = df["label"] if counts.min() >= 2 else None
    train, val = train_test_split(df, test_size=size, random_state=cfg.seed, stratify=stratify)
    return train, val


def _stratified_head(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if n >= len(df):
        return df
    from sklearn.model_selection import train_test_split

    counts = df["label"].value_counts()
    strat = df["label"] if counts.min() >= 2 and n >= len(counts) else None
    keep, _ = train_test_split(df, train_size=n, random_state=seed, stratify=strat)
    return keep


# ----------------------------------------------------------------------------- tokenization


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha1(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(vocab.items())[:: max(1, len(vocab) // 4096)]).encode())
    h.update(str(len(vocab)).encode())
    return h.hexdigest()[:16]


def frame_fingerprint(df: pd.DataFrame) -> str:
    h = hashlib.sha1()
    h.update(pd.util.hash_pandas_object(df[[c for c in ("text", "label") if c in df]], index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def tokenize(df: pd.DataFrame, tokenizer, max_length: int, cache: bool = True):
    """Tokenize a frame once into an HF ``Dataset`` (input_ids, attention_mask, labels, length), cached on disk.

    The cache key covers the tokenizer's vocabulary, the rows and max_length; no padding is stored
    (the collator pads each batch to its own longest row).
    """
    import datasets

    key = f"{tokenizer_fingerprint(tokenizer)}-{frame_fingerprint(df)}-{max_length}"
    path = CACHE_ROOT / "tokenized" / key
    if cache and (path / "dataset_info.json").exists():
        try:
            return datasets.load_from_disk(str(path))
        except Exception:
            pass  # a damaged cache entry is rebuilt below
    enc = tokenizer(df["text"].tolist(), truncation=True, max_length=max_length)
    cols = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "length": [len(x) for x in enc["input_ids"]]}
    if "label" in df:
        cols["labels"] = df["label"].astype(int).tolist()
    ds = datasets.Dataset.from_dict(cols)
    if cache:
        tmp = path.with_name(key + f".tmp{os.getpid()}")
        try:
            ds.save_to_disk(str(tmp))
            os.replace(tmp, path) if not path.exists() else None
        except OSError:
            pass  # read-only or full cache dir: tokenizing again next time is fine
        if path.exists():
            return datasets.load_from_disk(str(path))
    return ds


def pads_right(tokenizer) -> bool:
    """Whether :func:`pad_batch` pads exactly as ``tokenizer.pad`` would (right padding with a pad token)."""
    return tokenizer.padding_side == "right" and tokenizer.pad_token_id is not None


def pad_batch(features, pad_id: int, multiple: int | None = None) -> dict:
    """Right-pad ``input_ids`` (and build ``attention_mask``) to the longest row, rounded up to ``multiple``;
    ``labels`` when the rows have them. Numpy, not ``tokenizer.pad``: ~15x less CPU per batch (bench/RESULTS.md)."""
    import torch

    ids = [f["input_ids"] for f in features]
    width = max(map(len, ids))
    if multiple:
        width = -(-width // multiple) * multiple
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
    return batch
