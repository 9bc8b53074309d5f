"""Prediction files: the output's extension picks the writer (``.csv``, ``.tsv``, ``.jsonl``, ``.parquet``). Every
format holds the same columns (Kaggle's ``ID,Label``, then the optional label names and probabilities) and is
written chunk by chunk, so that memory stays flat whatever the number of rows."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import NewsloraError

FORMATS = (".csv", ".tsv", ".jsonl", ".parquet")


def output_format(path: str | Path, option: str = "--output") -> str:
    """The format of a prediction file, from its extension; anything else is refused with the choices."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise NewsloraError(f"{option} {path}: no writer for {suffix or 'a name without an extension'!r}; end the "
                            f"file name with {', '.join(FORMATS)}")
    return suffix


class PredictionWriter:
    """Appends frames to ``tmp`` in the format of ``fmt`` (see :func:`output_format`); ``close()`` finishes the
    file (parquet writes its footer then)."""

    def __init__(self, tmp: Path, fmt: str):
        self.fmt = fmt
        self.rows = 0
        self._parquet = None
        self._file = None if fmt == ".parquet" else open(tmp, "w", encoding="utf-8", newline="")
        self._tmp = tmp

    def write(self, df: pd.DataFrame) -> None:
        if self.fmt in (".csv", ".tsv"):
            df.to_csv(self._file, index=False, header=self.rows == 0, sep="\t" if self.fmt == ".tsv" else ",")
        elif self.fmt == ".jsonl":
            if len(df):
                self._file.write(df.to_json(orient="records", lines=True, force_ascii=False).rstrip("\n") + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(str(self._tmp), table.schema)
            self._parquet.write_table(table.cast(self._parquet.schema))
        if self._file is not None:
            self._file.flush()  # the temp file holds every chunk written so far
        self.rows += len(df)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.fmt == ".parquet" and self._parquet is None:  # no rows: an empty file with the columns
            self.write(pd.DataFrame({"ID": pd.Series(dtype="int64"), "Label": pd.Series(dtype="int64")}))
        if self._parquet is not None:
            self._parquet.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
