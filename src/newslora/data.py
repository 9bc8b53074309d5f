"""Data stage: read a hub dataset or local files (:mod:`newslora.readers`), check the labels against the label set,
carve a stratified validation split, tokenize once (cached).

Label names come from the recipe, the hub's ClassLabel feature, a ``classes.txt`` next to the file, the AG News
classes, or string labels in the data; every label is checked against that label set. :func:`label_set` resolves
the same set without tokenizing or loading weights, for counting the classification head (budget, auto_fit,
search). Text comes from ``data.text_column`` or several ``data.text_columns`` joined
(:func:`newslora.texts.join_columns`), and is tokenized with ``model.truncation``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import DataConfig
from .errors import NewsloraError
from .texts import tokenize_texts
from .readers import (TABLE_SUFFIXES, check_texts, find_label_names, looks_like_path, read_labels, read_table,
                      select_columns)

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
DATASET_ALIASES = {"ag_news": "fancyzhx/ag_news"}  # short names of hub datasets -> the ids the hub serves today
CACHE_ROOT = Path(os.environ.get("NEWSLORA_CACHE", Path.home() / ".cache" / "newslora"))


@dataclass
class Splits:
    train: pd.DataFrame  # columns: text, label (int)
    validation: pd.DataFrame
    test: pd.DataFrame | None
    label_names: list[str]
    source: str
    overlap: dict | None = None  # set by :func:`check_overlap`


def check_overlap(splits: Splits, drop: bool = False) -> dict | None:
    """Training rows whose text (stripped) is also in the validation or test split: they make held-out scores
    look better than they are. Records ``{"validation": n, "test": m, "dropped": k}`` on ``splits.overlap`` (None:
    no overlap); ``drop``: removes those rows from the training split (the held-out splits stay whole)."""
    train = splits.train["text"].astype(str).str.strip()
    found, seen = {}, pd.Series(False, index=train.index)
    for name, df in (("validation", splits.validation), ("test", splits.test)):
        if df is not None:
            hit = train.isin(set(df["text"].astype(str).str.strip()))
            found[name], seen = int(hit.sum()), seen | hit
    if not seen.any():
        splits.overlap = None
        return None
    if drop:
        splits.train = splits.train[~seen.to_numpy()].reset_index(drop=True)
    splits.overlap = {**found, "dropped": int(seen.sum()) if drop else 0}
    return splits.overlap


# ----------------------------------------------------------------------------- labels


def _rows(mask) -> str:
    """``rows 3, 17, 40 (and 12 more)`` for the True positions of a mask (0-based data rows, header excluded)."""
    rows = np.flatnonzero(np.asarray(mask))
    shown = ", ".join(str(int(r)) for r in rows[:5])
    more = f" (and {len(rows) - 5} more)" if len(rows) > 5 else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def encode_labels(df: pd.DataFrame, names: list[str] | None, where: str, names_from: str = "data.label_names",
                  num_labels: int | None = None, fix: str = "set data.label_names or data.num_labels",
                  every_class: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Map labels to ids 0..K-1, checked against the label set: ``names`` (from ``names_from``: the recipe, a
    ``classes.txt``, the AG News classes, a model's labels) or ``num_labels`` classes. Without either, string
    labels name their classes (sorted) and integer labels must cover 0..max without a gap. Mixed integer and
    string labels, integers outside the set and unknown names are refused with the rows that hold them.
    ``every_class``: each class must have rows (a training split). Returns the frame and the label names."""
    labels = df["label"]
    text = labels.astype(str).str.strip()
    missing = labels.isna() | (text == "")
    if missing.any():
        raise NewsloraError(f"{where}: no label at {_rows(missing)}; fill or drop unlabelled rows")
    if pd.api.types.is_numeric_dtype(labels):
        numeric = labels.astype(float)
    else:
        numeric = pd.to_numeric(text, errors="coerce")
        is_num = numeric.notna()
        if 0 < is_num.sum() < len(is_num):  # integers and names in one column: the odd ones out are wrong
            odd = ~is_num if is_num.sum() >= len(is_num) / 2 else is_num
            kind = "names" if is_num.sum() >= len(is_num) / 2 else "integers"
            raise NewsloraError(f"{where}: label {text[odd].iloc[0]!r} at {_rows(odd)} among "
                                f"{'integer labels' if kind == 'names' else 'class names'}; use one form for "
                                "every row")
        if not is_num.any():  # class names
            if names is None and num_labels is None:
                names = sorted(text.unique())
            elif names is None:
                raise NewsloraError(f"{where}: labels are class names but only data.num_labels={num_labels} is "
                                    "given; set data.label_names to name the classes in id order")
            unknown = ~text.isin(names)
            if unknown.any():
                raise NewsloraError(f"{where}: label {text[unknown].iloc[0]!r} at {_rows(unknown)} is not one of "
                                    f"the {len(names)} classes {names} ({names_from}); fix those rows or {fix}")
            lookup = {n: i for i, n in enumerate(names)}
            out = df.assign(label=text.map(lookup).to_numpy())
            _check_every_class(out, list(names), where, every_class, names_from, fix)
            return out, list(names)
    frac = numeric != numeric.round()
    if frac.any():
        raise NewsloraError(f"{where}: label {text[frac].iloc[0]} at {_rows(frac)}; labels must be integers "
                            "or class names")
    ints = numeric.astype(int)
    k = len(names) if names is not None else num_labels
    if k is None:  # no label set given: 0..max, where every class must occur
        negative = ints < 0
        if negative.any():
            raise NewsloraError(f"{where}: label {int(ints[negative].iloc[0])} at {_rows(negative)}; integer "
                                "labels are class ids 0..K-1")
        present = set(ints.unique().tolist())
        gap = next(i for i in range(len(present) + 1) if i not in present)  # the first class id without rows
        above = ints > gap
        if above.any():
            raise NewsloraError(f"{where}: label {int(ints[above].iloc[0])} at {_rows(above)}, but no row has "
                                f"label {gap}: classes 0..{int(ints.max())} would include empty ones; fix those "
                                f"rows or {fix}")
        k = int(ints.max()) + 1
        names_from = "the labels in the file"
    bad = (ints < 0) | (ints >= k)
    if bad.any():
        shown = f" {names}" if names is not None else ""
        raise NewsloraError(f"{where}: label {int(ints[bad].iloc[0])} at {_rows(bad)} is out of range 0..{k - 1}, "
                            f"the {k} classes{shown} of {names_from}; fix those rows or {fix}")
    out = df.assign(label=ints.to_numpy())
    names = list(names) if names is not None else [str(i) for i in range(k)]
    _check_every_class(out, names, where, every_class, names_from, fix)
    return out, names


def _check_every_class(df: pd.DataFrame, names: list[str], where: str, every_class: bool, names_from: str,
                       fix: str) -> None:
    if not every_class:
        return
    empty = [n for i, n in enumerate(names) if not (df["label"] == i).any()]
    if empty:
        raise NewsloraError(f"{where}: no rows of class{'es' if len(empty) > 1 else ''} {empty[:5]} of the "
                            f"{len(names)} classes from {names_from}; a class without training rows cannot be "
                            f"learnt: add rows or {fix}")


# ----------------------------------------------------------------------------- splits


def _load_local(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str] | None, str]:
    src = Path(cfg.source).expanduser()
    test_path = Path(cfg.test).expanduser() if cfg.test else None
    train_path = train_file(cfg)
    if src.is_dir():
        test_path = test_path or find_split_file(src, "test", required=False)
    train = read_table(train_path, text_columns(cfg), cfg.label_column)
    test = read_table(test_path, text_columns(cfg), cfg.label_column) if test_path else None
    names, names_from = _given_names(cfg, train_path)
    return train, test, names, names_from


def _given_names(cfg: DataConfig, train_path: Path) -> tuple[list[str] | None, str]:
    if cfg.label_names:
        return cfg.label_names, "data.label_names"
    found = find_label_names(train_path)
    return found, "classes.txt" if found else ""


def text_columns(cfg: DataConfig):
    """The recipe's text column setting: ``data.text_columns`` (joined) when given, else ``data.text_column``."""
    return list(cfg.text_columns) if cfg.text_columns else cfg.text_column


def train_file(cfg: DataConfig) -> Path:
    """The local training file of a recipe whose ``data.source`` is a file or a folder of split files."""
    src = Path(cfg.source).expanduser()
    return find_split_file(src, "train") if src.is_dir() else src


def find_split_file(folder: Path, stem: str, required: bool = True) -> Path | None:
    hits = sorted(p for p in folder.iterdir() if p.stem.startswith(stem) and p.suffix.lower() in TABLE_SUFFIXES)
    if not hits and required:
        raise NewsloraError(f"{folder}: no {stem}.csv/.tsv/.jsonl/.parquet file inside; name the file in data.source")
    return hits[0] if hits else None


def _load_hub(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str] | None, str]:
    import datasets

    try:
        ds = datasets.load_dataset(DATASET_ALIASES.get(cfg.source, cfg.source))
    except Exception as e:  # offline, unknown id, auth: one line with the way out
        raise NewsloraError(
            f"cannot load dataset {cfg.source!r} from the Hugging Face hub ({type(e).__name__}); "
            "offline? pass a local file or folder instead, e.g. data.source=../shared/data/ag_news/train_sample.csv "
            "data.test=../shared/data/ag_news/test.csv") from None
    names, names_from = cfg.label_names, "data.label_names" if cfg.label_names else ""
    feat = ds["train"].features.get(cfg.label_column)
    if names is None and hasattr(feat, "names"):
        names, names_from = list(feat.names), f"the {cfg.source} dataset's ClassLabel"
    frames = {s: select_columns(ds[s].to_pandas(), Path(cfg.source), text_columns(cfg), cfg.label_column)
              for s in ds}
    return frames["train"], frames.get("test"), names, names_from


def _is_ag_news_id(source: str) -> bool:
    return source.rstrip("/").split("/")[-1].startswith("ag_news")


def _settle_names(cfg: DataConfig, names: list[str] | None, names_from: str,
                  ag_news_form: bool) -> tuple[list[str] | None, str]:
    """After the recipe, a ``classes.txt`` and the hub's ClassLabel: the AG News classes (an ``ag_news`` source or
    a file in an AG News form), then ``data.num_labels``; checked against ``data.num_labels``."""
    if names is None and (_is_ag_news_id(cfg.source) or ag_news_form):
        names, names_from = AG_NEWS_LABELS, "AG News"
    if cfg.num_labels is not None and names is not None and len(names) != cfg.num_labels:
        raise NewsloraError(f"data.num_labels={cfg.num_labels} but {names_from} gives {len(names)} classes {names}; "
                            "make them agree (or drop data.num_labels)")
    if names is None and cfg.num_labels is not None:
        names_from = f"data.num_labels={cfg.num_labels}"
    return names, names_from


def label_set(cfg: DataConfig) -> list[str]:
    """The label set of a recipe's data, as :func:`load_splits` resolves it, without tokenizing or loading any
    weights: ``data.label_names``, a ``classes.txt``, the hub's ClassLabel, the AG News classes (an ``ag_news``
    source stays offline), ``data.num_labels``; else the training file's label column, read on its own and checked
    as :func:`load_splits` checks it. ``budget``, ``budget.auto_fit``, ``train``, ``search`` and ``distill`` count
    the classification head from it."""
    labels = None
    if looks_like_path(cfg.source):
        path = train_file(cfg)
        names, names_from = _given_names(cfg, path)
        if names is None:  # the AG News forms name their classes
            labels = read_labels(path, text_columns(cfg), cfg.label_column)
        names, names_from = _settle_names(cfg, names, names_from, labels is not None and labels.attrs.get("ag_news"))
    elif cfg.label_names or _is_ag_news_id(cfg.source):  # no hub call
        names, names_from = _settle_names(cfg, cfg.label_names, "data.label_names" if cfg.label_names else "", False)
    else:
        train, _, names, names_from = _load_hub(cfg)
        labels = train[["label"]]
        names, names_from = _settle_names(cfg, names, names_from, False)
    if names is not None:
        return list(names)
    _, names = encode_labels(labels, None, f"{cfg.source} (train)", names_from, cfg.num_labels, every_class=True)
    return names


def load_splits(cfg: DataConfig) -> Splits:
    """Read train/test, check and encode labels against the recipe's label set, carve the stratified validation
    split from train. The label set: ``data.label_names``, a ``classes.txt`` next to the data, the hub's ClassLabel,
    the 4 AG News classes (an ``ag_news`` source, or a file in one of the AG News CSV forms), ``data.num_labels``;
    else the labels themselves (see :func:`encode_labels`)."""
    if looks_like_path(cfg.source):
        train, test, names, names_from = _load_local(cfg)
    else:
        train, test, names, names_from = _load_hub(cfg)
        if cfg.test:
            test = read_table(cfg.test, text_columns(cfg), cfg.label_column)
    names, names_from = _settle_names(cfg, names, names_from, bool(train.attrs.get("ag_news")))
    train = check_texts(train, f"{cfg.source} (train)")
    train, names = encode_labels(train, names, f"{cfg.source} (train)", names_from, cfg.num_labels, every_class=True)
    if test is not None:
        where = f"{cfg.test or cfg.source} (test)"
        test = check_texts(test, where)
        test, _ = encode_labels(test, names, where, names_from or "the training labels")
        if cfg.max_test_samples:
            test = _stratified_head(test, cfg.max_test_samples, cfg.seed)
    if cfg.validation:
        validation = check_texts(read_table(cfg.validation, text_columns(cfg), cfg.label_column),
                                 f"{cfg.validation} (validation)")
        validation, _ = encode_labels(validation, names, f"{cfg.validation} (validation)")
    else:
        train, validation = _split(train, cfg, names)
    if cfg.max_train_samples:
        train = _stratified_head(train, cfg.max_train_samples, cfg.seed)
    return Splits(train.reset_index(drop=True), validation.reset_index(drop=True),
                  None if test is None else test.reset_index(drop=True), names, cfg.source)


def _split(df: pd.DataFrame, cfg: DataConfig, names: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    size = cfg.validation_size if cfg.validation_size < 1 else int(cfg.validation_size)
    n_val = size if isinstance(size, int) else int(round(size * len(df)))
    counts = df["label"].value_counts()
    if n_val < len(counts) or len(df) - n_val < len(counts):
        raise NewsloraError(f"data.validation_size={cfg.validation_size} leaves {n_val} validation rows of {len(df)}: "
                            f"need at least one per class ({len(counts)}) on both sides")
    if counts.min() < 2:  # one row cannot be in both splits: the validation split would miss the class
        few = [names[i] for i in counts[counts < 2].index] if names else list(counts[counts < 2].index)
        more = f" (and {len(few) - 1} more classes)" if len(few) > 1 else ""
        raise NewsloraError(f"class {few[0]!r} has only 1 training row{more}: too few for a stratified validation "
                            "split; add rows of it, drop it from the data, or give a separate validation file with "
                            "data.validation")
    stratify = df["label"]
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


def tokenize(df: pd.DataFrame, tokenizer, max_length: int, cache: bool = True, truncation: str = "head"):
    """Tokenize a frame once into an HF ``Dataset`` (input_ids, attention_mask, labels, length), cached on disk.

    The cache key covers the tokenizer's vocabulary, the rows, max_length and ``truncation`` (which end of a long
    text is kept: :func:`newslora.texts.tokenize_texts`); no padding is stored (the collator pads each batch to its
    own longest row).
    """
    import datasets

    key = f"{tokenizer_fingerprint(tokenizer)}-{frame_fingerprint(df)}-{max_length}"
    key += "" if truncation == "head" else f"-{truncation}"
    path = CACHE_ROOT / "tokenized" / key
    if cache and (path / "dataset_info.json").exists():
        try:
            return datasets.load_from_disk(str(path))
        except Exception:
            pass  # a damaged cache entry is rebuilt below
    enc = tokenize_texts(tokenizer, df["text"].tolist(), max_length, truncation)
    cols = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "length": [len(x) for x in enc["input_ids"]]}
    if "label" in df:
        cols["labels"] = df["label"].astype(int).tolist()
    ds = datasets.Dataset.from_dict(cols)
    if cache:
        tmp = path.with_name(key + f".tmp{os.getpid()}")
        try:
            ds.save_to_disk(str(tmp))
            if not path.exists():  # another process may have put the same entry there meanwhile
                os.replace(tmp, path)
        except OSError:
            pass  # read-only or full cache dir, or the same entry just renamed into place by another process
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
