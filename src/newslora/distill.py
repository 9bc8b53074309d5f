"""Distillation stage: train a student recipe against the averaged soft labels of one or more teachers.

A recipe distils when ``distill.teachers`` is non-empty (``newslora train``), or through the shortcut
``newslora distill --teacher PATH[,PATH...] --config student.yaml``. The student is a normal run in every
other respect (budget check, AdaLoRA schedule, early stopping, evaluation, run folder, export); only the
Trainer's training loss changes::

    loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)  (+ the model's own terms)

The model's own terms are whatever the PEFT model adds to ``outputs.loss`` when labels are passed: AdaLoRA's
orthogonality penalty ``orth_reg_weight * R``. The student is therefore always called with labels and the
distillation loss is ``outputs.loss + (1 - alpha) * (T^2 * KL - CE)``; with ``alpha=1`` this is exactly the
plain run's loss.

Teachers are run folders or merged/standalone model folders and may use another backbone and tokenizer:
each teacher reads the raw train texts with its own tokenizer and max_length. Their logits are computed
once per training example and cached on disk (``CACHE_ROOT/teacher_logits``), keyed by the teacher's identity
(path, weight files' size and mtime, tokenizer, max_length) and the rows' fingerprint; the averaged
probabilities at temperature T become a ``teacher_probs`` column of the student's tokenized train set, which
the collator passes through to the loss. Evaluation is untouched (validation/test have no such column).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import NewsloraError
from .trainer import TrainHook

TEACHER_COLUMN = "teacher_probs"
UNLABELLED = -100  # the label of an unlabelled training row (cross-entropy's ignore index)
CACHE_VERSION = "v1"


# ----------------------------------------------------------------------------- teachers


@dataclass
class Teacher:
    path: str  # as given
    resolved: Path
    kind: str  # "run" (newslora run folder) or "model" (merged / standalone model folder)
    label_names: list[str]
    max_length: int
    tokenizer_path: Path
    files: list  # (relative name, size, mtime_ns) of everything that defines the weights
    truncation: str = "head"  # which tokens of a long text the teacher reads, as it was trained

    def describe(self, run) -> dict:
        """What the student's run folder records: the teacher's path relative to that folder (so a moved pair of
        folders still points at each other), its kind and max_length."""
        return {"path": run.relative(self.resolved), "kind": self.kind, "max_length": self.max_length}


def inspect_teacher(path: str | Path) -> Teacher:
    """Cheap look at a teacher (no weights loaded): kind, labels, max_length, identity. Clear one-line errors."""
    from .modelfolder import describe
    from .run import Run

    given = str(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise NewsloraError(f"distill teacher not found: {given} (give a finished run folder or a merged model "
                            "folder, e.g. runs/distill-teacher or runs/distill-teacher/merged)")
    p = p.resolve()
    if Run.is_run(p):
        if not Run(p).is_finished():
            raise NewsloraError(f"distill teacher {given} has no adapter/: that run did not finish; finish it with "
                                f"newslora train --resume {given}")
        a, b = Run.ADAPTER, Run.BACKBONE
        folder = describe(p, runtime="torch")
        files = _weight_files(p, [Run.RECIPE, "*.safetensors", f"{a}/*.safetensors", f"{a}/*.bin", f"{a}/*.json",
                                  f"{b}/*.safetensors", f"{b}/*.bin", f"{b}/config.json"])
        return Teacher(given, p, "run", folder.label_names, folder.max_length, Run(p).adapter_dir, files,
                       folder.truncation)
    if (p / "config.json").is_file():
        folder = describe(p, runtime="torch")
        files = _weight_files(p, ["config.json", "*.safetensors", "*.bin"])
        return Teacher(given, p, "model", folder.label_names, folder.max_length, p, files, folder.truncation)
    raise NewsloraError(f"distill teacher {given} is neither a newslora run folder (recipe.yaml + adapter/) nor a "
                        "model folder (config.json)")


def _weight_files(root: Path, patterns: list[str]) -> list:
    out = []
    for pat in patterns:
        for f in sorted(root.glob(pat)):
            try:
                st = f.stat()
            except OSError as e:  # e.g. a link to a file that no longer exists
                raise NewsloraError(f"distill teacher {root}: {f.relative_to(root)} cannot be read ({e.strerror}; a "
                                    "link to a missing file?); restore it, or export the teacher again") from None
            out.append((str(f.relative_to(root)), st.st_size, st.st_mtime_ns))
    return out


def check_labels(teacher: Teacher, student_labels: list[str]) -> None:
    """The teacher must predict the student's classes, in the same order."""
    t, s = teacher.label_names, list(student_labels)
    if len(t) != len(s):
        raise NewsloraError(f"distill teacher {teacher.path} has {len(t)} labels {t} but the student's data has "
                            f"{len(s)} labels {s}; a teacher must predict the same classes as the student")
    if t != s:
        raise NewsloraError(f"distill teacher {teacher.path} has labels {t} but the student's data has labels {s}; "
                            "a teacher must predict the same classes, in the same order (set data.label_names)")


def _load(teacher: Teacher):
    """(model, tokenizer) of a teacher, in eval mode on the best device."""
    import torch

    from .predict import load_model

    model, tok, _, _ = load_model(teacher.resolved, runtime="torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tok


def _cache_key(teacher: Teacher, tokenizer, df) -> str:
    from .data import frame_fingerprint, tokenizer_fingerprint

    ident = {"version": CACHE_VERSION, "path": str(teacher.resolved), "files": teacher.files,
             "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": teacher.max_length,
             "truncation": teacher.truncation, "data": frame_fingerprint(df), "rows": len(df)}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def teacher_logits(teacher: Teacher, df, batch_size: int = 128, loaded: dict | None = None, cache: bool = True,
                   computed: list | None = None):
    """Logits (n_rows, n_labels) of one teacher over ``df["text"]``, read with the teacher's own tokenizer and
    max_length; computed once and cached on disk. ``loaded`` (path -> (model, tokenizer)) reuses a loaded model;
    ``computed`` gets the number of rows the teacher actually ran on (0 when the cache answered)."""
    import numpy as np

    from .data import CACHE_ROOT
    from .model import load_tokenizer

    tok = loaded[teacher.path][1] if loaded and teacher.path in loaded else load_tokenizer(str(teacher.tokenizer_path))
    path = CACHE_ROOT / "teacher_logits" / f"{_cache_key(teacher, tok, df)}.npy"
    shape = (len(df), len(teacher.label_names))
    if cache and path.is_file():
        try:
            arr = np.load(path)
            if arr.shape == shape:
                if computed is not None:
                    computed.append(0)
                return arr
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed below
    if loaded is not None and teacher.path in loaded:
        model, tok = loaded[teacher.path]
    else:
        model, tok = _load(teacher)
        if loaded is not None:
            loaded[teacher.path] = (model, tok)
    arr = _forward(model, tok, df["text"].tolist(), teacher.max_length, batch_size, teacher.truncation)
    if computed is not None:
        computed.append(len(df))
    if cache:
        from .outputs import write_file_atomic

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, arr)

        try:
            write_file_atomic(path, save)
        except OSError:
            pass  # read-only or full cache dir: computing again next time is fine
    return arr


def _forward(model, tokenizer, texts: list[str], max_length: int, batch_size: int, truncation: str = "head"):
    """Teacher logits in input order (the predict stage's length-batched forward)."""
    from .predict import batched_logits

    return batched_logits(model, tokenizer, texts, max_length, batch_size, truncation)


def soft_targets(logits_list: list, temperature: float):
    """Teachers' probabilities at temperature T, averaged over teachers: (n_rows, n_labels) float32."""
    import numpy as np

    probs = []
    for logits in logits_list:
        z = logits.astype(np.float64) / temperature
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        probs.append(p / p.sum(axis=1, keepdims=True))
    return np.mean(probs, axis=0).astype(np.float32)


# ----------------------------------------------------------------------------- loss, collator, trainer


def distill_loss(model, inputs: dict, soft, temperature: float, alpha: float, unlabelled_weight: float = 1.0):
    """(loss, outputs) for one batch. ``inputs`` carries labels, so ``outputs.loss`` is the model's own loss: CE
    plus anything the PEFT model adds (AdaLoRA's orthogonality penalty), which is kept at full weight.

    Rows labelled ``UNLABELLED`` (texts of ``distill.unlabelled``) have no CE term: each contributes
    ``unlabelled_weight * T^2 * KL``, a labelled row ``alpha * CE + (1 - alpha) * T^2 * KL``, averaged over the
    batch (on a batch without unlabelled rows, exactly the formula above)."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    known = labels != UNLABELLED
    if bool(known.all()):
        outputs = model(**inputs)
        if alpha == 1:
            return outputs.loss, outputs
        logits = outputs.logits
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))
        log_student = F.log_softmax(logits.float() / temperature, dim=-1)
        kl = F.kl_div(log_student, soft.to(log_student.device, log_student.dtype), reduction="batchmean")
        return outputs.loss + (1 - alpha) * (temperature ** 2 * kl - ce), outputs
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    logits = outputs.logits
    log_student = F.log_softmax(logits.float() / temperature, dim=-1)
    kl = temperature ** 2 * F.kl_div(log_student, soft.to(log_student.device, log_student.dtype),
                                     reduction="none").sum(-1)
    ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    per_row = torch.where(known, alpha * ce + (1 - alpha) * kl, unlabelled_weight * kl)
    return per_row.mean(), outputs


class DistillCollator:
    """Wraps the run's collator: ``teacher_probs`` rows are stacked into a float tensor, the rest padded as usual."""

    def __init__(self, inner=None):
        if inner is None:
            from transformers import default_data_collator as inner
        self.inner = inner

    def __call__(self, features):
        import torch

        if not features or TEACHER_COLUMN not in features[0]:
            return self.inner(features)
        soft = torch.stack([torch.as_tensor(f[TEACHER_COLUMN], dtype=torch.float32) for f in features])
        batch = self.inner([{k: v for k, v in f.items() if k != TEACHER_COLUMN} for f in features])
        batch[TEACHER_COLUMN] = soft
        return batch


def distill_trainer_class(base=None):
    """A subclass of ``base`` (default: :class:`newslora.train.NewsloraTrainer`) whose training loss distils from
    ``teacher_probs``."""
    from transformers import Trainer

    from .trainer import NewsloraTrainer

    base = base or NewsloraTrainer
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise NewsloraError("distillation needs trainer_cls to be a transformers Trainer subclass")

    class DistillTrainer(base):
        distill_temperature: float = 2.0
        distill_alpha: float = 0.5
        distill_unlabelled_weight: float = 1.0
        loss_is_scaled_for_ga = False  # the distillation loss is a per-batch mean

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            soft = inputs.pop(TEACHER_COLUMN, None)
            if soft is None or "labels" not in inputs:  # evaluation batches: the normal loss
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            loss, outputs = distill_loss(model, inputs, soft, self.distill_temperature, self.distill_alpha,
                                         self.distill_unlabelled_weight)
            if hasattr(self, "record_train_batch"):  # NewsloraTrainer's training loss/accuracy tally
                labels = inputs["labels"]
                known = labels != UNLABELLED  # the tally counts labelled rows only
                if not bool(known.all()):
                    outputs, labels = {"logits": outputs.logits[known]}, labels[known]
                self.record_train_batch(loss, outputs, labels)
            return (loss, outputs) if return_outputs else loss

    DistillTrainer.__name__ = DistillTrainer.__qualname__ = f"Distill{base.__name__}"
    return DistillTrainer


# ----------------------------------------------------------------------------- the hook train() calls


class Distiller(TrainHook):
    """Added by ``setup()`` when ``recipe.distill.teachers`` is set, before the run folder exists: checks the
    teachers and computes (or reads) their train-set outputs. ``configure`` swaps the Trainer class and adds the
    soft-label column; ``finish`` records teachers, T, alpha and teacher vs student accuracy in the run folder."""

    def __init__(self, recipe, splits):
        d = recipe.distill
        self.recipe, self.splits = recipe, splits
        self.temperature, self.alpha = float(d.temperature), float(d.alpha)
        self.teachers = [inspect_teacher(p) for p in d.teachers]
        for t in self.teachers:
            check_labels(t, splits.label_names)
        self.unlabelled_weight = float(d.unlabelled_weight)
        self.unlabelled = read_unlabelled(d.unlabelled, recipe, splits) if d.unlabelled else None
        self.added_train_rows = 0 if self.unlabelled is None else len(self.unlabelled)
        loaded: dict = {}
        # rows each teacher ran on, per pass (train split, then unlabelled texts; 0: read from the cache): run.json
        self.computed: list[int] = []
        logits = [teacher_logits(t, splits.train, recipe.train.eval_batch_size, loaded, computed=self.computed)
                  for t in self.teachers]
        self.soft = soft_targets(logits, self.temperature)
        if self.unlabelled is not None:
            logits = [teacher_logits(t, self.unlabelled, recipe.train.eval_batch_size, loaded, computed=self.computed)
                      for t in self.teachers]
            self.soft_unlabelled = soft_targets(logits, self.temperature)
        loaded.clear()

    def configure(self, trainer_cls, kwargs):
        import numpy as np

        ds = kwargs["train_dataset"]
        if len(ds) != len(self.soft) or not np.array_equal(np.asarray(ds["labels"]),
                                                           self.splits.train["label"].to_numpy()):
            raise NewsloraError("distillation: the tokenized train set is not row-aligned with the train split "
                                "(teacher outputs cannot be attached)")
        ds = ds.add_column(TEACHER_COLUMN, self.soft.tolist())
        if self.unlabelled is not None:  # tokenized like the labelled rows, labelled UNLABELLED
            import datasets

            from .data import tokenize

            extra = tokenize(self.unlabelled, kwargs["processing_class"], self.recipe.model.max_length,
                             truncation=self.recipe.model.truncation)
            extra = extra.add_column("labels", [UNLABELLED] * len(extra))
            extra = extra.add_column(TEACHER_COLUMN, self.soft_unlabelled.tolist()).cast(ds.features)
            ds = datasets.concatenate_datasets([ds, extra])
        kwargs["train_dataset"] = ds
        kwargs["data_collator"] = DistillCollator(kwargs.get("data_collator"))
        cls = distill_trainer_class(trainer_cls)
        cls.distill_temperature, cls.distill_alpha = self.temperature, self.alpha
        cls.distill_unlabelled_weight = self.unlabelled_weight
        return cls

    def record(self, run) -> dict:
        """run.json's ``distill``: teacher paths relative to the student's run folder."""
        out = {"teachers": [run.relative(t.resolved) for t in self.teachers], "temperature": self.temperature,
               "alpha": self.alpha, "teacher_details": [t.describe(run) for t in self.teachers],
               "teacher_rows_computed": self.computed}
        if self.unlabelled is not None:
            out.update(unlabelled=self.recipe.distill.unlabelled, unlabelled_rows=len(self.unlabelled),
                       unlabelled_weight=self.unlabelled_weight)
        return out

    def finish(self, result):
        """run.json gets ``distill``; distill.json gets teacher and student accuracy side by side."""
        from .run import Run

        run = Run.open(result.run_dir)
        run.update_info(distill=self.record(run))
        student = {s: result.eval[s]["accuracy"] for s in ("validation", "test") if s in result.eval}
        out = {k: v for k, v in self.record(run).items() if k != "teacher_details"}
        try:
            teacher, each = self.teacher_accuracy(run)
        except Exception as e:  # the student is trained and saved; a teacher evaluation must not fail the run
            from rich.console import Console

            Console(stderr=True).print(f"[yellow]warning: teacher evaluation failed: {e}[/yellow]")
            teacher, each = None, []
        out.update(teacher=teacher, student=student, teachers_each=each,
                   student_macro_f1={s: result.eval[s]["macro_f1"] for s in student})
        run.write_distill(out)
        return result

    def teacher_accuracy(self, run) -> tuple[dict, list]:
        """Accuracy on the student's validation/test splits: a run-folder teacher's own eval.json when its splits are
        the student's, otherwise its (cached) outputs on the student's splits. Several teachers: their ensemble."""
        from .evaluate import classification_metrics

        splits = {s: df for s, df in (("validation", self.splits.validation), ("test", self.splits.test))
                  if df is not None}
        each, logits, loaded = [], {s: [] for s in splits}, {}
        need_logits = len(self.teachers) > 1
        for t in self.teachers:
            own = self._own_eval(t, splits)
            row = {"path": run.relative(t.resolved)}  # relative to the student's run folder
            for s, df in splits.items():
                if own is not None and not need_logits:
                    row[s], row["source"] = own[s]["accuracy"], "teacher eval.json"
                    continue
                z = teacher_logits(t, df, self.recipe.train.eval_batch_size, loaded)
                logits[s].append(z)
                row[s], row["source"] = float((z.argmax(-1) == df["label"].to_numpy()).mean()), "student's splits"
            each.append(row)
        loaded.clear()
        if len(self.teachers) == 1:
            return {k: v for k, v in each[0].items() if k != "path"}, []
        ens = {"source": "ensemble (averaged probabilities) on the student's splits"}
        for s, df in splits.items():
            p = soft_targets(logits[s], 1.0)
            ens[s] = classification_metrics(df["label"].to_numpy(), p.argmax(-1), self.splits.label_names)["accuracy"]
        return ens, each

    def _own_eval(self, t: Teacher, splits: dict) -> dict | None:
        """The teacher run's eval.json, if it was computed on exactly the student's validation/test splits."""
        from .run import Run

        run = Run(t.resolved)
        ev = run.read_eval() if t.kind == "run" else {}
        if not ev:
            return None
        try:
            theirs = run.read_recipe().data
        except NewsloraError:
            return None
        mine = self.recipe.data
        same = ["text_column", "label_column", "label_names", "validation_size", "max_test_samples", "seed"]
        if any(getattr(theirs, k) != getattr(mine, k) for k in same):
            return None
        if any(_norm(getattr(theirs, k)) != _norm(getattr(mine, k)) for k in ("source", "test", "validation")):
            return None
        if any(s not in ev or ev[s].get("n") != len(df) for s, df in splits.items()):
            return None
        return ev


def read_unlabelled(path: str, recipe, splits):
    """The texts of ``distill.unlabelled`` as a one-column frame. Refused: a method whose loss has terms of its own
    (AdaLoRA's penalty needs labels on every row), an empty file, and texts that are also validation or test texts
    (they would teach the rows that choose and judge the run)."""
    import pandas as pd

    from .data import text_columns
    from .readers import read_table

    if recipe.method == "adalora":
        raise NewsloraError("distill.unlabelled does not work with method=adalora (its orthogonality penalty needs "
                            "labels on every row): use method=lora, or drop distill.unlabelled")
    df = read_table(path, text_columns(recipe.data), None)
    df = df[["text"]].reset_index(drop=True)
    if df.empty:
        raise NewsloraError(f"distill.unlabelled={path} has no rows: give a file of texts, one per row")
    norm = df["text"].str.strip().str.lower()
    for name, split in (("validation", splits.validation), ("test", splits.test)):
        if split is None:
            continue
        shared = int(norm.isin(set(split["text"].str.strip().str.lower())).sum())
        if shared:
            raise NewsloraError(f"distill.unlabelled={path}: {shared} of its texts are also {name} texts; remove them "
                                f"from the file (the {name} split must stay unseen)")
    return pd.DataFrame({"text": df["text"]})


def _norm(source: str | None) -> str | None:
    if source is None:
        return None
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else source
