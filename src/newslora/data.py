"""Data stage: read a hub dataset or local files, carve a stratified validation split, tokenize once (cached).

Local formats: the classic AG News CSV (no header; class 1-4, title, description), and CSV / TSV / JSONL /
parquet with text and label columns. Label names come from the recipe, the hub's ClassLabel feature, a
``classes.txt`` next to the file, or string labels in the data; every label is checked against that label set.
Prediction reads its input in chunks instead (:func:`iter_texts`, same forms and rules), so that any size fits.
The module is about 580 lines: reading (whole and in chunks), label checking, splitting and the tokenization cache
are the stage's steps, each short, and they share the frame they pass along.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


RECIPE_OPTIONS = ("data.text_column", "data.label_column")  # what a column error tells the user to set


def read_table(path: str | Path, text_column: str = "text", label_column: str | None = "label",
               options: tuple[str, str] = RECIPE_OPTIONS) -> pd.DataFrame:
    """Read one local file into a DataFrame with ``text`` (and ``label`` when label_column is given).

    Labels are returned as found (ints or strings); :func:`encode_labels` maps them to ids. The two AG News CSV
    forms (classic: no header; Kaggle: ``Class Index,Title,Description``) give title + description and labels
    0-3, and set ``df.attrs["ag_news"]``. ``options``: the names of the text/label column settings in the
    caller's interface (recipe keys, or a command's ``--text-column``/``--label-column``) for error messages.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise NewsloraError(f"data file not found: {path} (check the path, or use a hub id such as ag_news)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            ag_news = _classic_ag_news(path, sep, text_column)
            if ag_news is None:
                ag_news = _kaggle_ag_news(path, sep, text_column, label_column)
            if ag_news is not None:
                return _non_empty(ag_news, path)
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
    return _non_empty(_select_columns(df, path, text_column, label_column, options), path)


def _non_empty(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    if df.empty:
        raise NewsloraError(f"{path} has no rows (an empty file, or a header only); give a file with data rows")
    return df


def _first_row(path: Path, sep: str) -> list[str] | None:
    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader(f, delimiter=sep), None)


def _one_based(cls: pd.Series, path: Path, first_line: int) -> pd.Series:
    """AG News class column (1-4 in the file) as integers 0-3; non-integers refused with their lines."""
    num = pd.to_numeric(cls.str.strip(), errors="coerce")
    bad = num.isna() | (num != num.round()) | (num < 1)
    if bad.any():
        rows = np.flatnonzero(bad.to_numpy())
        lines = ", ".join(str(int(r) + first_line) for r in rows[:5])
        raise NewsloraError(f"{path}, line {lines}: class {cls.iloc[rows[0]]!r} is not a 1-based integer "
                            "(AG News CSV form: class 1-4, title, description)")
    return num.astype(int) - 1


KAGGLE_AG_NEWS_HEADER = ["Class Index", "Title", "Description"]


def _kaggle_ag_news(path: Path, sep: str, text_column: str, label_column: str | None) -> pd.DataFrame | None:
    """The Kaggle copy of AG News: header ``Class Index,Title,Description``, classes 1-4. Text is title +
    description (or the one of the two columns the caller names); labels are shifted to 0-3."""
    if not _is_kaggle(_first_row(path, sep)):
        return None
    df = pd.read_csv(path, sep=sep, encoding="utf-8", keep_default_na=False, dtype=str)
    out = pd.DataFrame({"text": _kaggle_text(df, text_column)})
    if label_column is not None:
        out["label"] = _one_based(df["Class Index"], path, first_line=2)
    out.attrs["ag_news"] = True
    return out


def _is_kaggle(first: list[str] | None) -> bool:
    return bool(first) and [c.strip() for c in first] == KAGGLE_AG_NEWS_HEADER


def _kaggle_text(df: pd.DataFrame, text_column: str) -> pd.Series:
    df.columns = KAGGLE_AG_NEWS_HEADER
    if text_column in ("Title", "Description"):
        return df[text_column].str.strip()
    return (df["Title"].str.strip() + " " + df["Description"].str.strip()).str.strip()


CLASSIC_COLUMNS = ["cls", "title", "description"]


def _is_classic(first: list[str] | None, text_column: str) -> bool:
    return bool(first) and len(first) == 3 and text_column not in first and first[0].strip().isdigit()


def _classic_text(df: pd.DataFrame) -> pd.Series:
    return (df["title"].str.strip() + " " + df["description"].str.strip()).str.strip()


def _classic_ag_news(path: Path, sep: str, text_column: str) -> pd.DataFrame | None:
    """The classic AG News form: no header, 3 columns (class 1-4, title, description)."""
    if not _is_classic(_first_row(path, sep), text_column):
        return None
    df = pd.read_csv(path, sep=sep, header=None, names=CLASSIC_COLUMNS, encoding="utf-8",
                     keep_default_na=False, dtype=str)
    out = pd.DataFrame({"text": _classic_text(df), "label": _one_based(df["cls"], path, first_line=1)})
    out.attrs["ag_news"] = True
    return out


def _select_columns(df: pd.DataFrame, path: Path, text_column: str, label_column: str | None,
                    options: tuple[str, str] = RECIPE_OPTIONS) -> pd.DataFrame:
    missing = [c for c in (text_column, label_column) if c is not None and c not in df.columns]
    if missing:
        key = options[0] if missing[0] == text_column else options[1]
        raise NewsloraError(f"{path}: column {missing[0]!r} not found (columns: {', '.join(map(str, df.columns))}); "
                            f"set {key} to the right name")
    text = df[text_column]
    out = pd.DataFrame({"text": text.astype(str).where(text.notna(), "")})  # a null text is missing, not "None"
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


def check_texts(df: pd.DataFrame, where: str, first_row: int | None = None) -> pd.DataFrame:
    """Refuse empty or blank texts, naming the first one's row (0-based, header excluded). ``first_row``: the
    frame is a chunk of a file starting at that row; the message then names the chunk's rows."""
    empty = df["text"].isna() | (df["text"].astype(str).str.strip() == "")
    if empty.any():
        rows = np.flatnonzero(empty.to_numpy())
        start = first_row or 0
        span = "" if first_row is None else f" in rows {start}-{start + len(df) - 1}"
        raise NewsloraError(f"{where}: {len(rows)} empty text(s){span}, first at row {int(rows[0]) + start}; "
                            "drop or fill them")
    return df


# ----------------------------------------------------------------------------- reading in chunks

STREAM_SUFFIXES = {".csv", ".tsv", ".jsonl", ".parquet", ".txt"}  # read chunk by chunk; .json is one document


def iter_texts(path: str | Path, text_column: str = "text", chunk_rows: int = 10_000,
               options: tuple[str, str] = RECIPE_OPTIONS) -> Iterator[pd.DataFrame]:
    """The texts of a local file, lazily, as frames with one ``text`` column and at most ``chunk_rows`` rows, so
    that memory stays flat whatever the file's size. The forms and rules of :func:`read_table` (the AG News CSV
    forms, the column choice, UTF-8) and :func:`check_texts` (rows counted across chunks) apply; problems with the
    file as a whole (not found, type, column) surface on the first chunk, a bad row when its chunk is read. A
    ``.json`` document cannot be read in parts: it is read whole, then sliced."""
    path = Path(path).expanduser()
    if chunk_rows < 1:
        raise NewsloraError(f"--chunk-rows {chunk_rows}: read at least 1 row per chunk (e.g. --chunk-rows 10000)")
    suffix = path.suffix.lower()
    if not path.exists() or suffix not in STREAM_SUFFIXES:
        df = read_table(path, text_column, None, options)  # its errors: not found, unsupported type
        chunks = (df.iloc[i:i + chunk_rows] for i in range(0, len(df), chunk_rows))
    else:
        chunks = _raw_chunks(path, suffix, text_column, chunk_rows, options)
    done = 0
    for chunk in chunks:
        if len(chunk):
            check_texts(chunk, str(path), first_row=done)
            yield chunk.reset_index(drop=True)
            done += len(chunk)
    if not done:
        _non_empty(pd.DataFrame(), path)


def count_rows(path: str | Path) -> int | None:
    """The number of rows of a file when its metadata says so without reading it (parquet), else None."""
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        return None
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError):
        return None


def _raw_chunks(path: Path, suffix: str, text_column: str, chunk_rows: int,
                options: tuple[str, str]) -> Iterator[pd.DataFrame]:
    """Chunks of ``text`` (unchecked), with :func:`read_table`'s messages for undecodable or unparsable data."""
    try:
        if suffix in (".csv", ".tsv"):
            yield from _csv_chunks(path, "\t" if suffix == ".tsv" else ",", text_column, chunk_rows, options)
        elif suffix == ".jsonl":
            yield from _jsonl_chunks(path, text_column, chunk_rows, options)
        elif suffix == ".parquet":
            yield from _parquet_chunks(path, text_column, chunk_rows, options)
        else:
            yield from _txt_chunks(path, chunk_rows)
    except UnicodeDecodeError as e:
        raise NewsloraError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except (ValueError, pd.errors.ParserError) as e:
        raise NewsloraError(f"{path} could not be parsed as {suffix[1:]}: {str(e).splitlines()[0]}") from None


def _csv_chunks(path: Path, sep: str, text_column: str, chunk_rows: int, options) -> Iterator[pd.DataFrame]:
    first = _first_row(path, sep)
    classic, kaggle = _is_classic(first, text_column), _is_kaggle(first)
    reader = pd.read_csv(path, sep=sep, encoding="utf-8", keep_default_na=False, dtype=str, chunksize=chunk_rows,
                         **({"header": None, "names": CLASSIC_COLUMNS} if classic else {}))
    line = 1 if classic else 2  # the file line of the chunk's first row
    with reader:
        for df in reader:
            if classic:
                _one_based(df["cls"], path, first_line=line)  # the classes are checked as read_table does
                yield pd.DataFrame({"text": _classic_text(df)})
            elif kaggle:
                yield pd.DataFrame({"text": _kaggle_text(df, text_column)})
            else:
                yield _select_columns(df, path, text_column, None, options)
            line += len(df)


def _jsonl_chunks(path: Path, text_column: str, chunk_rows: int, options) -> Iterator[pd.DataFrame]:
    # dtype=False: values keep their JSON types in every chunk, instead of a per-chunk guess
    reader = pd.read_json(path, lines=True, chunksize=chunk_rows, encoding="utf-8", dtype=False)
    line = 1
    with reader:
        while True:
            try:
                df = next(reader)
            except StopIteration:
                return
            except ValueError as e:  # pandas names a position inside the chunk: name the chunk's lines
                raise NewsloraError(f"{path} could not be parsed as jsonl in lines {line}-{line + chunk_rows - 1}: "
                                    f"{str(e).splitlines()[0]}") from None
            yield _select_columns(df, path, text_column, None, options)
            line += chunk_rows  # a chunk is chunk_rows lines of the file, blank ones included


def _parquet_chunks(path: Path, text_column: str, chunk_rows: int, options) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_column not in names:
            _select_columns(pd.DataFrame(columns=names), path, text_column, None, options)  # its error message
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=[text_column]):
            yield _select_columns(batch.to_pandas(), path, text_column, None, options)
    except OSError as e:  # pyarrow's I/O errors (a truncated file) are OSErrors, its format errors ValueErrors
        raise NewsloraError(f"{path} could not be parsed as parquet: {str(e).splitlines()[0]}") from None


def _txt_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """One text per non-blank line, as ``read_text().splitlines()`` splits them; a decoding error names its byte
    offset in the file."""
    lines: list[str] = []
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise NewsloraError(f"{path} is not UTF-8 text (byte {offset + e.start}); re-save it as UTF-8") \
                    from None
            offset += len(raw)
            lines.extend(ln for ln in text.splitlines() if ln.strip())
            while len(lines) >= chunk_rows:
                yield pd.DataFrame({"text": lines[:chunk_rows]})
                del lines[:chunk_rows]
    if lines:
        yield pd.DataFrame({"text": lines})


def _load_local(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str] | None, str]:
    src = Path(cfg.source).expanduser()
    test_path = Path(cfg.test).expanduser() if cfg.test else None
    if src.is_dir():
        train_path = find_split_file(src, "train")
        test_path = test_path or find_split_file(src, "test", required=False)
    else:
        train_path = src
    train = read_table(train_path, cfg.text_column, cfg.label_column)
    test = read_table(test_path, cfg.text_column, cfg.label_column) if test_path else None
    if cfg.label_names:
        return train, test, cfg.label_names, "data.label_names"
    found = find_label_names(train_path)
    return train, test, found, "classes.txt" if found else ""


def find_split_file(folder: Path, stem: str, required: bool = True) -> Path | None:
    hits = sorted(p for p in folder.iterdir() if p.stem.startswith(stem) and p.suffix.lower() in TABLE_SUFFIXES)
    if not hits and required:
        raise NewsloraError(f"{folder}: no {stem}.csv/.tsv/.jsonl/.parquet file inside; name the file in data.source")
    return hits[0] if hits else None


def _load_hub(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str] | None, str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source)
    except Exception as e:  # offline, unknown id, auth: one line with the way out
        raise NewsloraError(
            f"cannot load dataset {cfg.source!r} from the Hugging Face hub ({type(e).__name__}); "
            "offline? pass a local file or folder instead, e.g. data.source=../shared/data/ag_news/train_sample.csv "
            "data.test=../shared/data/ag_news/test.csv") from None
    names, names_from = cfg.label_names, "data.label_names" if cfg.label_names else ""
    feat = ds["train"].features.get(cfg.label_column)
    if names is None and hasattr(feat, "names"):
        names, names_from = list(feat.names), f"the {cfg.source} dataset's ClassLabel"
    frames = {s: _select_columns(ds[s].to_pandas(), Path(cfg.source), cfg.text_column, cfg.label_column) for s in ds}
    return frames["train"], frames.get("test"), names, names_from


def load_splits(cfg: DataConfig) -> Splits:
    """Read train/test, encode labels, carve the stratified validation split from train."""
    """Read train/test, check and encode labels against the recipe's label set, carve the stratified validation
    split from train. The label set: ``data.label_names``, a ``classes.txt`` next to the data, the hub's ClassLabel,
    the 4 AG News classes (an ``ag_news`` source, or a file in one of the AG News CSV forms), ``data.num_labels``;
    else the labels themselves (see :func:`encode_labels`)."""
    if looks_like_path(cfg.source):
        train, test, names, names_from = _load_local(cfg)
    else:
        train, test, names, names_from = _load_hub(cfg)
        if cfg.test:
            test = read_table(cfg.test, cfg.text_column, cfg.label_column)
    if names is None and (cfg.source.rstrip("/").split("/")[-1].startswith("ag_news") or train.attrs.get("ag_news")):
        names, names_from = AG_NEWS_LABELS, "AG News"
    if cfg.num_labels is not None and names is not None and len(names) != cfg.num_labels:
        raise NewsloraError(f"data.num_labels={cfg.num_labels} but {names_from} gives {len(names)} classes {names}; "
                            "make them agree (or drop data.num_labels)")
    if names is None and cfg.num_labels is not None:
        names_from = f"data.num_labels={cfg.num_labels}"
    train = check_texts(train, f"{cfg.source} (train)")
    train, names = encode_labels(train, names, f"{cfg.source} (train)", names_from, cfg.num_labels, every_class=True)
    if test is not None:
        where = f"{cfg.test or cfg.source} (test)"
        test = check_texts(test, where)
        test, _ = encode_labels(test, names, where, names_from or "the training labels")
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
