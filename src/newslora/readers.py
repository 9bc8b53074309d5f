"""Reading local data files: the classic AG News CSV (no header; class 1-4, title, description), Kaggle's copy
(``Class Index,Title,Description``), and CSV / TSV / JSONL / parquet / plain text with text and label columns.

:func:`read_table` reads a whole file (training, evaluation); :func:`iter_texts` reads the texts of a file of any
size in chunks (prediction), with the same forms, column choice and messages. Labels are returned as found; the
data stage (:mod:`newslora.data`) checks them against the label set.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .errors import NewsloraError

TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt"}


def looks_like_path(s: str) -> bool:
    """A local path (existing, or written like one) rather than a hub id such as ``ag_news`` or ``org/name``."""
    return Path(s).expanduser().exists() or s.startswith((".", "~", "/")) or Path(s).suffix.lower() in TABLE_SUFFIXES


RECIPE_OPTIONS = ("data.text_column", "data.label_column")  # what a column error tells the user to set


def read_table(path: str | Path, text_column: str = "text", label_column: str | None = "label",
               options: tuple[str, str] = RECIPE_OPTIONS) -> pd.DataFrame:
    """Read one local file into a DataFrame with ``text`` (and ``label`` when label_column is given).

    Labels are returned as found (ints or strings); :func:`newslora.data.encode_labels` maps them to ids. The two AG News CSV
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
    return _non_empty(select_columns(df, path, text_column, label_column, options), path)


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


def select_columns(df: pd.DataFrame, path: Path, text_column: str, label_column: str | None,
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
                yield select_columns(df, path, text_column, None, options)
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
            yield select_columns(df, path, text_column, None, options)
            line += chunk_rows  # a chunk is chunk_rows lines of the file, blank ones included


def _parquet_chunks(path: Path, text_column: str, chunk_rows: int, options) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_column not in names:
            select_columns(pd.DataFrame(columns=names), path, text_column, None, options)  # its error message
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=[text_column]):
            yield select_columns(batch.to_pandas(), path, text_column, None, options)
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


