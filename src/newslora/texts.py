"""How a model reads text: several columns joined into one text, and the one tokenize function that keeps the
head, the tail or both ends of a text longer than ``max_length``. Training, evaluation, prediction and serving
all go through :func:`tokenize_texts`, so a model sees its texts cut the same way it was trained on them."""
from __future__ import annotations


import pandas as pd

TRUNCATIONS = ("head", "tail", "head_tail")
SEPARATOR = " "  # between the joined columns (the AG News forms' title + description are one case)


def join_columns(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """The texts of ``columns`` joined with :data:`SEPARATOR`, each stripped, an empty or null cell skipped."""
    parts = [df[c].astype(str).where(df[c].notna(), "").str.strip() for c in columns]
    joined = parts[0]
    for p in parts[1:]:
        joined = joined + SEPARATOR + p
    return joined.str.strip()


def tokenize_texts(tokenizer, texts: list[str], max_length: int, truncation: str = "head") -> dict:
    """``{"input_ids", "attention_mask"}`` lists for ``texts``, special tokens included, at most ``max_length``
    ids each. A longer text keeps its first tokens (``head``), its last (``tail``) or the first half and the last
    half of the room (``head_tail``, one more at the head for an odd count)."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r}: one of {TRUNCATIONS}")
    if truncation == "head":  # the tokenizer's own truncation keeps the first tokens
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    from transformers.utils import logging as hf_logging

    prefix, suffix = special_ends(tokenizer)
    room = max_length - len(prefix) - len(suffix)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum": it is cut below
    try:
        bare = tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    ids = []
    for x in bare:
        if len(x) > room:
            head = (room + 1) // 2 if truncation == "head_tail" else 0
            x = x[:head] + (x[len(x) - (room - head):] if room > head else [])
        ids.append([*prefix, *x, *suffix])
    return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}


def special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a single text (``<s>`` and ``</s>``, ``[CLS]``
    and ``[SEP]``), found by tokenizing a probe with and without them."""
    probe = "hello world"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    start = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    return full[:start], full[start + len(bare):]


def text_record(recipe) -> dict:
    """What run.json records of how the run read its texts (and how its model reads new ones)."""
    return {"text_columns": recipe.data.text_columns, "truncation": recipe.model.truncation}
