"""Predict stage: load a run folder or merged model, classify texts, write a Kaggle ``ID,Label`` submission."""
from __future__ import annotations

import itertools
import pickle
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from .data import pad_batch, pads_right
from .errors import NewsloraError, first_line
from .modelfolder import DEFAULT_MAX_LENGTH, DEFAULT_TRUNCATION, ModelFolder, describe, read_adapter_weights
from .texts import join_columns, tokenize_texts

PICKLE_SUFFIXES = {".pkl", ".pickle"}


def check_batch_size(batch_size: int | None, option: str = "--batch-size") -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise NewsloraError(f"{option} {batch_size}: must be a whole number of texts per forward pass, at least 1 "
                            "(e.g. 32; leave it out for the default)")


@torch.inference_mode()
def batched_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int | None = None,
                   truncation: str = "head") -> np.ndarray:
    """float32 logits (len(texts), num_labels) in input order. Texts are tokenized once (cut as ``truncation``
    says: :func:`newslora.texts.tokenize_texts`) and batched by length (less padding); ``batch_size``: default 128
    on a GPU, 32 on a CPU (faster there: bench/RESULTS.md).
    ``model``: a transformers model, or an :class:`~newslora.onnx_runtime.OnnxModel` (onnxruntime, CPU)."""
    check_batch_size(batch_size, "batch_size")
    onnx = not isinstance(model, torch.nn.Module)
    out = np.empty((len(texts), model.num_labels if onnx else model.config.num_labels), dtype=np.float32)
    if not len(texts):
        return out
    enc = tokenize_texts(tokenizer, list(texts), max_length, truncation)
    order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable")
    device = torch.device("cpu") if onnx else next(model.parameters()).device
    batch_size = batch_size or (32 if device.type == "cpu" else 128)
    fast = pads_right(tokenizer)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        if fast:  # numpy padding: a fraction of tokenizer.pad's cost (bench/RESULTS.md)
            batch = pad_batch([{"input_ids": enc["input_ids"][j]} for j in idx], tokenizer.pad_token_id)
        else:
            batch = tokenizer.pad({"input_ids": [enc["input_ids"][j] for j in idx],
                                   "attention_mask": [enc["attention_mask"][j] for j in idx]}, return_tensors="pt")
        if onnx:
            out[idx] = model.logits({k: v.numpy() for k, v in batch.items()})
        else:
            out[idx] = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
    return out


class Classifier:
    """A trained news classifier. ``classify("headline")`` -> {"label", "score", "scores"}; a list gives a list."""

    def __init__(self, model, tokenizer, label_names: list[str], max_length: int = DEFAULT_MAX_LENGTH,
                 folder: ModelFolder | None = None):
        self.model = model.eval() if isinstance(model, torch.nn.Module) else model
        self.runtime = "torch" if isinstance(model, torch.nn.Module) else "onnx"
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.max_length = max_length
        self.folder = folder  # what the model folder says (text columns, truncation), when loaded from one
        self.truncation = folder.truncation if folder else DEFAULT_TRUNCATION  # which end of a long text it reads
        self.text_columns = folder.text_columns if folder else None  # the columns joined into its texts

    def predict_proba(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_labels), in input order (see :func:`batched_logits`)."""
        logits = batched_logits(self.model, self.tokenizer, texts, self.max_length, batch_size, self.truncation)
        return torch.softmax(torch.from_numpy(logits), -1).numpy()

    def classify(self, text: str | list[str]):
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        for i, t in enumerate(texts):
            check_text(t, "text" if single else f"texts[{i}]")
        probs = self.predict_proba(texts)
        res = [{"label": self.label_names[int(p.argmax())], "score": float(p.max()),
                "scores": {n: float(s) for n, s in zip(self.label_names, p)}} for p in probs]
        return res[0] if single else res


def check_text(text, where: str = "text") -> None:
    """Refuse what has no class: an empty or blank text, or one that is not valid Unicode (a lone surrogate)."""
    if not isinstance(text, str):
        raise NewsloraError(f"{where} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise NewsloraError(f"{where} is empty; pass a non-empty headline")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NewsloraError(f"{where} is not valid Unicode ({e.reason} at character {e.start}); "
                            "send UTF-8 text") from None


def load_model(path: str | Path, runtime: str | None = None, label_names: list[str] | None = None):
    """(model, tokenizer, label_names, max_length) from any folder :func:`newslora.modelfolder.describe` reads: a
    run folder, a merged/standalone model folder, an ONNX folder or a plain PEFT adapter folder (``label_names``:
    its classes where its base model does not name them). ``runtime``: None picks by what the folder holds
    (``model.onnx`` -> onnxruntime); "onnx" also accepts a run folder with an exported ``onnx/``; "torch" refuses
    an ONNX-only folder."""
    model, tok, folder = load_folder(describe(path, runtime, label_names))
    return model, tok, folder.label_names, folder.max_length


def load_folder(folder: ModelFolder):
    """(model, tokenizer, folder) of a described model folder, loaded the way its kind needs."""
    if folder.kind == "onnx":
        from .onnx_runtime import load_onnx

        model, tok = load_onnx(folder)
    elif folder.kind == "run":
        model, tok, _, _ = load_run(folder.path)
    elif folder.kind == "adapter":
        model, tok = _load_adapter(folder)
    else:
        model, tok = _load_standalone(folder.path)
    return model, tok, folder


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5")


def _load_standalone(path: Path):
    """A merged (or any transformers) model folder, loaded from safetensors only: a pickle-format checkpoint
    (``pytorch_model.bin``) can run code when unpickled, so it is refused rather than loaded."""
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not any(path.glob("*.safetensors")):
        pickled = [n for n in PICKLE_WEIGHTS if (path / n).exists()]
        what = f"holds {pickled[0]}, a pickle-format checkpoint" if pickled else "has no model weights"
        raise NewsloraError(f"{path} {what}; newslora loads only safetensors weights (model.safetensors): re-save it "
                            "with save_pretrained(..., safe_serialization=True), or export a run with newslora export")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:
        raise NewsloraError(f"cannot load the model in {path}: {first_line(e)}; the folder is damaged or "
                            "incomplete: export it again") from None
    return model, tok


def _load_adapter(folder: ModelFolder):
    """A plain PEFT adapter over its base model: the base's classifier sized to the adapter's classes, the
    adapter's tensors (see :func:`newslora.modelfolder.read_adapter_weights`) set into it; the tokenizer is the
    adapter folder's own, else the base model's."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from .families import resolve_backbone
    from .model import load_tokenizer

    names, base = folder.label_names, resolve_backbone(folder.backbone)
    config = AutoConfig.from_pretrained(base, num_labels=len(names), id2label=dict(enumerate(names)),
                                        label2id={n: i for i, n in enumerate(names)})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the base's own head is replaced by the adapter's: its warning is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base, config=config, ignore_mismatched_sizes=True)
        peft_config = PeftConfig.from_pretrained(folder.path)
        peft_config.inference_mode = True
        model = PeftModel(model, peft_config)
        loaded = set_peft_model_state_dict(model, read_adapter_weights(folder.path))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise NewsloraError(f"cannot load the adapter in {folder.path} over {folder.backbone}: {first_line(e)}; "
                            "check that base_model_name_or_path names the model it was trained on") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if loaded.unexpected_keys:
        raise NewsloraError(f"the adapter in {folder.path} has weights its base model {folder.backbone} has no "
                            f"place for ({loaded.unexpected_keys[0]}, ...): check base_model_name_or_path")
    for source in (folder.path, Path(base)):
        if (source / "tokenizer_config.json").is_file():
            return model.eval(), load_tokenizer(str(source))
    if Path(base).is_dir():  # transformers would build an empty tokenizer from a folder without one
        raise NewsloraError(f"neither {folder.path} nor its base model {base} has a tokenizer "
                            "(tokenizer_config.json): save the base model's tokenizer into one of them")
    return model.eval(), load_tokenizer(folder.backbone)


def _head_classes(weights: Path) -> int | None:
    """How many classes the classifier saved with an adapter has (None: no full head saved, or unreadable)."""
    import re

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                if re.search(r"(classifier(\.out_proj)?|score)\.weight$", key):
                    return int(f.get_slice(key).get_shape()[0])
    except (OSError, SafetensorError):
        return None
    return None


def load_run(run, full_precision: bool = False):
    """A finished run's adapter model: (model, tokenizer, label_names, max_length). ``full_precision``: load a
    quantized run's backbone unquantized (export merges into full-precision weights); without CUDA a quantized run
    always loads in full precision."""
    from peft import PeftModel
    from safetensors import SafetensorError

    from .model import load_backbone, load_head_state, load_tokenizer
    from .run import Run

    run = run if isinstance(run, Run) else Run.open(run, need="adapter")
    recipe = run.read_recipe()
    names = run.label_names()
    if run.backbone_dir.is_dir():  # random-init backbone saved with the run
        recipe.model.backbone, recipe.model.random_init = str(run.backbone_dir), False
    if full_precision or not torch.cuda.is_available():
        recipe.model.quantization = "none"
    trained = _head_classes(run.adapter_dir / "adapter_model.safetensors")
    if trained is not None and trained != len(names):
        raise NewsloraError(f"{run.file(Run.INFO)} names {len(names)} classes (label_names) but the run's classifier "
                            f"was trained for {trained}; restore run.json's label_names to the run's classes")
    base = load_backbone(recipe, names, for_training=False)
    if run.head_init.is_file():  # head.type=lora: the head's frozen base weights
        load_head_state(base, run.head_init)
    adapter = run.adapter_dir
    if not any(adapter.glob("adapter_model.safetensors")):
        raise NewsloraError(f"{adapter} has no adapter weights (adapter_model.safetensors); the run did not save "
                            f"its adapter: train it again, or continue it with newslora train --resume {run.path}")
    try:
        model = PeftModel.from_pretrained(base, adapter)
    except (OSError, ValueError, SafetensorError, RuntimeError, KeyError) as e:
        raise NewsloraError(f"cannot load the adapter in {adapter}: {first_line(e)}; its files are damaged or "
                            "truncated: train the run again") from None
    return model, load_tokenizer(str(adapter)), names, recipe.model.max_length


def refuse_non_finite(model: torch.nn.Module, path: str | Path) -> None:
    """Refuse a model with NaN or infinite weights (a diverged training): its every prediction would be meaningless
    (a NaN score, always the first class)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise NewsloraError(f"{path}: the model's weights are not finite (NaN or infinite, e.g. {name}): its "
                                "training diverged; train it again with a lower train.lr")


def load_classifier(path: str | Path, device: str | None = None, runtime: str | None = None,
                    label_names: list[str] | None = None) -> Classifier:
    """``from newslora import load_classifier; clf = load_classifier("runs/demo"); clf.classify("...")``.
    ``runtime``: "torch" or "onnx" (default: chosen by what the folder holds, see :func:`load_model`);
    ``label_names``: the classes of a plain PEFT adapter whose base model does not name them. A model with
    non-finite weights is refused."""
    model, tok, folder = load_folder(describe(path, runtime, label_names))
    if isinstance(model, torch.nn.Module):
        refuse_non_finite(model, path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
            model = model.to(device)  # bitsandbytes models are placed at load time and cannot be moved
    return Classifier(model, tok, folder.label_names, folder.max_length, folder)


# ----------------------------------------------------------------------------- inputs and outputs

CHUNK_ROWS = 10_000  # rows read, classified and written at a time: memory stays flat whatever the input's size


def iter_input(path: str | Path, text_column="text", trust_pickle: bool = False,
               chunk_rows: int = CHUNK_ROWS, options: tuple[str, str] = ("text_column", "label_column"),
               id_column: str | None = None) -> tuple[Iterator[pd.DataFrame], int | None]:
    """(chunks, total): the texts to classify as frames with a ``text`` column, read lazily from
    CSV/TSV/JSONL/parquet/plain text (see :func:`newslora.readers.iter_texts`), and the number of rows when known
    without reading the file (parquet metadata), else None. A pickled HF ``Dataset`` (``trust_pickle``) is
    unpickled whole, then sliced. ``id_column``: the chunks also carry an ``id`` column."""
    from .readers import check_texts, count_rows, iter_texts

    path = Path(path)
    if not path.exists():
        raise NewsloraError(f"input not found: {path}")
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return iter_texts(path, text_column, chunk_rows, options, id_column), count_rows(path)
    if chunk_rows < 1:
        raise NewsloraError(f"--chunk-rows {chunk_rows}: read at least 1 row per chunk (e.g. --chunk-rows 10000)")
    df = _read_pickle(path, text_column, trust_pickle)
    if df.empty:
        raise NewsloraError(f"{path} has no rows to classify")
    check_texts(df, str(path))
    return (df.iloc[i:i + chunk_rows].reset_index(drop=True) for i in range(0, len(df), chunk_rows)), len(df)


def _read_pickle(path: Path, text_column: str, trust: bool) -> pd.DataFrame:
    if not trust:
        raise NewsloraError(f"refusing to unpickle {path}: unpickling runs arbitrary code from the file; pass "
                            "--trust-pickle only if you trust its source, or convert it to CSV/parquet first")
    with open(path, "rb") as f:
        obj = pickle.load(f)  # noqa: S301 - the user vouched for this file with --trust-pickle
    if hasattr(obj, "to_pandas"):
        obj = obj.to_pandas()
    if isinstance(obj, dict):
        obj = pd.DataFrame(obj)
    cols = [text_column] if isinstance(text_column, str) else list(text_column)
    if not isinstance(obj, pd.DataFrame) or any(c not in obj.columns for c in cols):
        raise NewsloraError(f"{path}: expected a pickled HF Dataset/DataFrame with a {text_column!r} column, "
                            f"got {type(obj).__name__}")
    return pd.DataFrame({"text": obj[cols[0]].astype(str) if len(cols) == 1 else join_columns(obj, cols)})


def submission_frame(probs: np.ndarray, label_names: list[str], extra: bool = False, first_id: int = 0,
                     ids=None) -> pd.DataFrame:
    """Kaggle rows ``ID,Label`` (IDs ``ids`` from the input's ID column, else counted from ``first_id``; integer
    labels); ``extra`` adds names and probabilities."""
    pred = probs.argmax(-1)
    ids = np.arange(first_id, first_id + len(pred)) if ids is None else np.asarray(ids)
    df = pd.DataFrame({"ID": ids, "Label": pred.astype(int)})
    if extra:
        df["label_name"] = [label_names[i] for i in pred]
        for i, n in enumerate(label_names):
            df[f"p_{n}"] = probs[:, i].round(6)
    return df


def predict(model: str | Path, input: str | Path, output: str | Path, text_column: str | None = None,
            trust_pickle: bool = False, extra_columns: bool = False, batch_size: int | None = None,
            overwrite: bool = False, options: tuple[str, str] = ("text_column", "label_column"),
            runtime: str | None = None, chunk_rows: int = CHUNK_ROWS, label_names: list[str] | None = None,
            progress: Callable[[int, int | None], None] | None = None, id_column: str | None = None) -> Path:
    """Classify every text of ``input`` into the submission file ``output`` (never the input itself; an existing
    file only with ``overwrite``), ``chunk_rows`` rows at a time: read, classify, append to a temp file next to
    ``output`` that replaces it once every row is written (on any error, Ctrl-C or SIGTERM it is removed and
    ``output`` is left as it was). ``progress(rows_done, total_or_None)`` is called once the model is loaded and
    after each chunk. ``options``: the caller's names for the column settings, for error messages. ``runtime``:
    torch or onnx (default: chosen by what the folder holds). ``text_column``: default the columns the model was
    trained on (:func:`input_columns`). The output's extension picks its format (:mod:`newslora.writers`); the
    input's ID column (``id_column``, else ``id`` or ``ID`` when there is one) gives the rows' IDs, else 0..N-1.
    ``label_names``: a plain PEFT adapter's classes."""
    from .errors import sigterm_raises
    from .outputs import check_output_file, write_file_atomic
    from .readers import find_id_column
    from .writers import PredictionWriter, output_format

    check_output_file(output, [input], overwrite)
    fmt = output_format(output)
    if Path(input).suffix.lower() not in PICKLE_SUFFIXES | {".txt"}:
        id_column = find_id_column(input, id_column)
    elif id_column is not None:  # a pickled Dataset is read for its texts only, a .txt file has one text per line
        raise NewsloraError(f"--id-column {id_column}: {input} is read for its texts only (one per row), with no ID "
                            "column; drop --id-column (rows are numbered 0..N-1)")
    columns = input_columns(model, text_column, runtime, label_names)
    chunks, total = iter_input(input, columns, trust_pickle, chunk_rows, options, id_column)
    first = next(chunks)  # problems with the input as a whole surface before the model loads
    clf = load_classifier(model, runtime=runtime, label_names=label_names)

    def write(tmp: Path) -> None:
        done = 0
        if progress:
            progress(done, total)
        with PredictionWriter(tmp, fmt) as writer:
            for chunk in itertools.chain([first], chunks):
                probs = clf.predict_proba(chunk["text"].tolist(), batch_size)
                writer.write(submission_frame(probs, clf.label_names, extra_columns, done, chunk.get("id")))
                done += len(chunk)
                if progress:
                    progress(done, total)

    with sigterm_raises(f"terminated (SIGTERM); nothing written to {output}"):
        return write_file_atomic(output, write)


def input_columns(model: str | Path, text_column: str | None = None, runtime: str | None = None,
                  label_names: list[str] | None = None):
    """The text column(s) to read a file with for ``model``: ``text_column`` when given, else the columns the model
    was trained on (``data.text_columns``, joined as in training: what its folder records), else ``text``."""
    if text_column is not None:
        return text_column
    return describe(model, runtime, label_names).text_columns or "text"
