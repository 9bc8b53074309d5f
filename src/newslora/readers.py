"""Reading local data files: the classic AG News CSV (no header; class 1-4, title, description), Kaggle's copy
(``Class Index,Title,Description``), and CSV / TSV / JSONL / parquet / plain text with text and label columns.

:func:`read_table` reads a whole file (training, evaluation); :func:`iter_texts` reads the texts of a file of any
size in chunks (prediction), with the same forms, column choice and messages. Labels are returned as found; the
data stage (:mod:`newslora.data`) checks them against the label set.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .errors import NewsloraError, first_line
from .texts import join_columns

TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt"}


def looks_like_path(s: str) -> bool:
    """A local path (existing, or written like one) rather than a hub id such as ``ag_news`` or ``org/name``."""
    return Path(s).expanduser().exists() or s.startswith((".", "~", "/")) or Path(s).suffix.lower() in TABLE_SUFFIXES


RECIPE_OPTIONS = ("data.text_column", "data.label_column")  # what a column error tells the user to set


def read_table(path: str | Path, text_column="text", label_column: str | None = "label",
               options: tuple[str, str] = RECIPE_OPTIONS, id_column: str | None = None) -> pd.DataFrame:
    """Read one local file into a DataFrame with ``text`` (and ``label`` when label_column is given).

    Labels are returned as found (ints or strings); :func:`newslora.data.encode_labels` maps them to ids. The two AG News CSV
    forms (classic: no header; Kaggle: ``Class Index,Title,Description``) give title + description and labels
    0-3, and set ``df.attrs["ag_news"]``. ``options``: the names of the text/label column settings in the
    caller's interface (recipe keys, or a command's ``--text-column``/``--label-column``) for error messages.
    ``text_column``: a column name, or a list of them joined into one text. A headerless file is read only in
    the classic AG News form; any other is refused. ``id_column``: also an ``id`` column.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise NewsloraError(f"data file not found: {path} (check the path, or use a hub id such as ag_news)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            ag_news = _classic_ag_news(path, sep, text_column, label_column, options)
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
            text_column = _columns(text_column)[0]  # one text per line, whatever columns a model joins
            df = pd.DataFrame({text_column: [ln for ln in lines if ln.strip()]})
        else:
            raise NewsloraError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl, .parquet or .txt")
    except UnicodeDecodeError as e:
        raise NewsloraError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except (ValueError, pd.errors.ParserError) as e:
        raise NewsloraError(f"{path} could not be parsed as {suffix[1:]}: {first_line(e)}") from None
    return _non_empty(select_columns(df, path, text_column, label_column, options, id_column), path)


def read_labels(path: str | Path, text_column="text", label_column: str = "label",
                options: tuple[str, str] = RECIPE_OPTIONS) -> pd.DataFrame:
    """The ``label`` column of a local file, read without its texts where the format allows (CSV/TSV, parquet),
    for counting the classes; the columns are checked as :func:`read_table` checks them. An AG News form is
    returned as :func:`read_table` reads it (``attrs["ag_news"]``)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if not path.exists() or suffix not in (".csv", ".tsv", ".parquet"):
        return read_table(path, text_column, label_column, options)[["label"]]
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(path).schema_arrow.names
            select_columns(pd.DataFrame(columns=names), path, text_column, label_column, options)  # names checked
            df = pd.read_parquet(path, columns=[label_column])
            check_kinds(df, path, None, label_column)
        else:
            sep = "\t" if suffix == ".tsv" else ","
            first = _first_row(path, sep) or []
            if _headerless(first, text_column) or _is_kaggle(first):
                return read_table(path, text_column, label_column, options)[["label"]]
            select_columns(pd.DataFrame(columns=first), path, text_column, label_column, options)
            df = pd.read_csv(path, sep=sep, encoding="utf-8", keep_default_na=False, usecols=[label_column])
    except UnicodeDecodeError as e:
        raise NewsloraError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise NewsloraError(f"{path} could not be parsed as {suffix[1:]}: {first_line(e)}") from None
    return _non_empty(df.rename(columns={label_column: "label"})[["label"]], path)


def check_kinds(df: pd.DataFrame, path: Path, text_column, label_column: str | None) -> None:
    """Refuse values that only a silent conversion would turn into a text or a label: a list or record as text
    (its Python repr would be trained on), a list, record or boolean as a label (``[0]`` or ``True`` as a class).
    ``text_column``: one name, several, or None."""
    nested = (list, tuple, dict, np.ndarray)
    checks = [(name, nested, "a string") for name in (_columns(text_column) if text_column is not None else [])]
    for name, bad, what in (*checks, (label_column, (*nested, bool, np.bool_), "an integer or a class name")):
        if name is None or name not in df:
            continue
        wrong = df[name].map(lambda v: isinstance(v, bad)).to_numpy(dtype=bool)
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            value = df[name].iloc[row]
            kind = ("a boolean" if isinstance(value, (bool, np.bool_)) else "a record" if isinstance(value, dict)
                    else "a list")
            raise NewsloraError(f"{path}: column {name!r} holds {kind} at row {row} ({str(value)[:40]}); each value "
                                f"must be {what}: convert the column first")


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


def _kaggle_text(df: pd.DataFrame, text_column) -> pd.Series:
    df.columns = KAGGLE_AG_NEWS_HEADER
    if isinstance(text_column, str) and text_column in ("Title", "Description"):
        return df[text_column].str.strip()
    return join_columns(df, ["Title", "Description"])


CLASSIC_COLUMNS = ["cls", "title", "description"]
AG_NEWS_CLASSES = {"1", "2", "3", "4"}


def _columns(text_column) -> list[str]:
    """The text column setting as a list: one name, or the names of ``data.text_columns``."""
    return [text_column] if isinstance(text_column, str) else list(text_column)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _headerless(first: list[str] | None, text_column) -> bool:
    """A first row that is data, not a header: it names none of the text columns and holds a number (a column
    name is not a number)."""
    if not first:
        return False
    cells = [c.strip() for c in first]
    return not any(c in cells for c in _columns(text_column)) and any(_is_number(c) for c in cells)


def _check_ag_news_shape(df: pd.DataFrame, path: Path, options: tuple[str, str], first_line: int = 1) -> None:
    """A headerless file is AG News only in AG News's shape: class 1-4, title, description (not a number).
    Anything else is refused: its columns have no names to choose from, and its labels would be guessed."""
    cls = df.iloc[:, 0].str.strip()
    bad = ~cls.isin(AG_NEWS_CLASSES)
    numeric_text = len(df) > 0 and pd.to_numeric(df.iloc[:, -1].str.strip(), errors="coerce").notna().all()
    if df.shape[1] != 3 or bad.any() or numeric_text:
        where = (f", line {int(np.flatnonzero(bad.to_numpy())[0]) + first_line}" if df.shape[1] == 3 and bad.any()
                 else "")
        raise headerless_error(path, options, where)


def headerless_error(path: Path, options: tuple[str, str], where: str = "") -> NewsloraError:
    return NewsloraError(f"{path}{where}: no header line, and not AG News's headerless form (3 columns: class 1-4, "
                         f"title, description); add a header line naming the columns (e.g. text,label) and set "
                         f"{options[0]}/{options[1]} to them")


def _classic_text(df: pd.DataFrame) -> pd.Series:
    return join_columns(df, ["title", "description"])


def _classic_ag_news(path: Path, sep: str, text_column, label_column: str | None,
                     options: tuple[str, str] = RECIPE_OPTIONS) -> pd.DataFrame | None:
    """The classic AG News form: no header, 3 columns (class 1-4, title, description). Any other headerless
    file is refused (:func:`headerless_error`)."""
    first = _first_row(path, sep)
    if not _headerless(first, text_column):
        return None
    df = pd.read_csv(path, sep=sep, header=None, encoding="utf-8", keep_default_na=False, dtype=str)
    _check_ag_news_shape(df, path, options)
    df.columns = CLASSIC_COLUMNS
    out = pd.DataFrame({"text": _classic_text(df)})
    if label_column is not None:
        out["label"] = _one_based(df["cls"], path, first_line=1)
    out.attrs["ag_news"] = True
    return out


def select_columns(df: pd.DataFrame, path: Path, text_column, label_column: str | None,
                   options: tuple[str, str] = RECIPE_OPTIONS, id_column: str | None = None) -> pd.DataFrame:
    """``text`` (one column, or several joined by :func:`newslora.texts.join_columns`), ``label`` when
    ``label_column`` is given and ``id`` when ``id_column`` is."""
    wanted = [*_columns(text_column), label_column, id_column]
    missing = [c for c in wanted if c is not None and c not in df.columns]
    if missing:
        key = (options[1] if missing[0] == label_column else "--id-column" if missing[0] == id_column
               else options[0])
        raise NewsloraError(f"{path}: column {missing[0]!r} not found (columns: {', '.join(map(str, df.columns))}); "
                            f"set {key} to the right name")
    check_kinds(df, path, text_column, label_column)  # typed formats (JSONL, parquet) may hold lists or booleans
    cols = _columns(text_column)
    if len(cols) == 1:
        text = df[cols[0]]
        out = pd.DataFrame({"text": text.astype(str).where(text.notna(), "")})  # a null text is missing, not "None"
    else:
        out = pd.DataFrame({"text": join_columns(df, cols)})
    if label_column is not None:
        out["label"] = df[label_column].to_numpy()
    if id_column is not None:
        out["id"] = df[id_column].to_numpy()
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


def iter_texts(path: str | Path, text_column="text", chunk_rows: int = 10_000,
               options: tuple[str, str] = RECIPE_OPTIONS, id_column: str | None = None) -> Iterator[pd.DataFrame]:
    """The texts of a local file, lazily, as frames with one ``text`` column and at most ``chunk_rows`` rows, so
    that memory stays flat whatever the file's size. The forms and rules of :func:`read_table` (the AG News CSV
    forms, the column choice, UTF-8) and :func:`check_texts` (rows counted across chunks) apply; problems with the
    file as a whole (not found, type, column) surface on the first chunk, a bad row when its chunk is read. A
    ``.json`` document cannot be read in parts: it is read whole, then sliced. ``id_column``: also an ``id``
    column with that column's values."""
    path = Path(path).expanduser()
    if chunk_rows < 1:
        raise NewsloraError(f"--chunk-rows {chunk_rows}: read at least 1 row per chunk (e.g. --chunk-rows 10000)")
    suffix = path.suffix.lower()
    if not path.exists() or suffix not in STREAM_SUFFIXES:
        df = read_table(path, text_column, None, options, id_column)  # its errors: not found, unsupported type
        chunks = (df.iloc[i:i + chunk_rows] for i in range(0, len(df), chunk_rows))
    else:
        chunks = _raw_chunks(path, suffix, text_column, chunk_rows, options, id_column)
    done = 0
    for chunk in chunks:
        if len(chunk):
            check_texts(chunk, str(path), first_row=done)
            yield chunk.reset_index(drop=True)
            done += len(chunk)
    if not done:
        _non_empty(pd.DataFrame(), path)


ID_COLUMNS = ("id", "ID")  # an input column of these names is carried to the prediction file by itself


def find_id_column(path: str | Path, id_column: str | None = None) -> str | None:
    """The column whose values name the rows of a prediction file: ``id_column`` when given (checked when the file
    is read), else ``id`` or ``ID`` when the file's header has one, else None (rows are numbered 0..N-1)."""
    if id_column is not None:
        return id_column
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            names = _first_row(path, "\t" if suffix == ".tsv" else ",") or []
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(path).schema_arrow.names
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                first = next((ln for ln in f if ln.strip()), "{}")
            names = list(pd.read_json(io.StringIO(first), lines=True).columns)
        else:
            return None
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # reading the file proper names the problem
    return next((c for c in ID_COLUMNS if c in [str(n).strip() for n in names]), None)


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


def _raw_chunks(path: Path, suffix: str, text_column, chunk_rows: int,
                options: tuple[str, str], id_column: str | None = None) -> Iterator[pd.DataFrame]:
    """Chunks of ``text`` (unchecked), with :func:`read_table`'s messages for undecodable or unparsable data."""
    try:
        if suffix in (".csv", ".tsv"):
            yield from _csv_chunks(path, "\t" if suffix == ".tsv" else ",", text_column, chunk_rows, options,
                                   id_column)
        elif suffix == ".jsonl":
            yield from _jsonl_chunks(path, text_column, chunk_rows, options, id_column)
        elif suffix == ".parquet":
            yield from _parquet_chunks(path, text_column, chunk_rows, options, id_column)
        else:
            yield from _txt_chunks(path, chunk_rows)
    except UnicodeDecodeError as e:
        raise NewsloraError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except (ValueError, pd.errors.ParserError) as e:
        raise NewsloraError(f"{path} could not be parsed as {suffix[1:]}: {first_line(e)}") from None


def _csv_chunks(path: Path, sep: str, text_column, chunk_rows: int, options,
                id_column: str | None = None) -> Iterator[pd.DataFrame]:
    first = _first_row(path, sep)
    classic, kaggle = _headerless(first, text_column), _is_kaggle(first)
    if classic and (len(first) != 3 or id_column is not None):
        raise headerless_error(path, options)
    if kaggle and id_column is not None:
        raise NewsloraError(f"{path} is AG News's Kaggle form (Class Index,Title,Description), which has no ID column: "
                            f"drop --id-column {id_column} (rows are numbered 0..N-1)")
    reader = pd.read_csv(path, sep=sep, encoding="utf-8", keep_default_na=False, dtype=str, chunksize=chunk_rows,
                         **({"header": None} if classic else {}))
    line = 1 if classic else 2  # the file line of the chunk's first row
    with reader:
        for df in reader:
            if classic:
                _check_ag_news_shape(df, path, options, first_line=line)  # as read_table checks the whole file
                df.columns = CLASSIC_COLUMNS
                yield pd.DataFrame({"text": _classic_text(df)})
            elif kaggle:
                yield pd.DataFrame({"text": _kaggle_text(df, text_column)})
            else:
                yield select_columns(df, path, text_column, None, options, id_column)
            line += len(df)


def _jsonl_chunks(path: Path, text_column, chunk_rows: int, options,
                  id_column: str | None = None) -> Iterator[pd.DataFrame]:
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
                                    f"{first_line(e)}") from None
            yield select_columns(df, path, text_column, None, options, id_column)
            line += chunk_rows  # a chunk is chunk_rows lines of the file, blank ones included


def _parquet_chunks(path: Path, text_column, chunk_rows: int, options,
                    id_column: str | None = None) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        wanted = [c for c in [*_columns(text_column), id_column] if c is not None]
        if any(c not in names for c in wanted):  # its error message
            select_columns(pd.DataFrame(columns=names), path, text_column, None, options, id_column)
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=list(dict.fromkeys(wanted))):
            yield select_columns(batch.to_pandas(), path, text_column, None, options, id_column)
    except OSError as e:  # pyarrow's I/O errors (a truncated file) are OSErrors, its format errors ValueErrors
        raise NewsloraError(f"{path} could not be parsed as parquet: {first_line(e)}") from None


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


