"""The run folder: its layout, its schema and every read and write of it.

A run folder is what ``newslora train`` leaves behind and what every later stage (predict, export, report,
distill, search, resume) reads. This module knows every file name but the methods' own::

    recipe.yaml            resolved recipe (re-runnable)
    run.json               schema version, trainable-parameter breakdown, device, versions, times, status and
                           the attempts (each start, end, steps, outcome, pid, host, heartbeat)
    metrics_steps.csv      every log event;  metrics_epochs.csv: one row per epoch;  metrics.xlsx
    eval.json              {"validation": {...}, "test": {...}}
    plots/                 PNG plots
    adapter/               PEFT adapter (+ head) and tokenizer, with an adapter card
    checkpoints/           Trainer checkpoints (resume)
    backbone/              random-init backbone weights (model.random_init only)
    head_init.safetensors  the frozen base weights of a LoRA head (head.type=lora)
    <a method's own files> each method names those it writes (``Method.artifacts`` in :mod:`newslora.methods`,
                           e.g. PiSSA's pissa_init/, AdaLoRA's rank log) and writes them through this class
    distill.json           teacher vs student accuracy (distillation)
    trial.json, error.txt  a search trial's outcome
    merged/                after ``newslora export``: standalone model + tokenizer + card + newslora.json
    onnx/, onnx-int8/      after ``newslora export --onnx [--int8]``: model.onnx + tokenizer + card + newslora.json

Every path written inside a run folder is relative to it, so a run folder can be moved, copied or zipped
and still load, export, report and resume. Heavy imports (pandas, yaml's recipe model) stay inside methods.
"""
from __future__ import annotations

import csv
import functools
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path

from .errors import NewsloraError
from .outputs import read_json, write_file_atomic, write_json
from .processes import now_iso, pid_alive, seconds_between

SCHEMA_VERSION = 2  # run.json "schema"; 1: the layout before this module (absolute paths, no version)

STEP_COLUMNS = ["step", "epoch", "loss", "train_accuracy", "learning_rate", "eval_loss", "eval_accuracy",
                "eval_macro_precision", "eval_macro_recall", "eval_macro_f1"]
EPOCH_COLUMNS = ["epoch", "step", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "eval_macro_precision",
                 "eval_macro_recall", "eval_macro_f1"]
HEARTBEAT_S = 30.0  # a running attempt writes its heartbeat into run.json at most this often
STALE_S = 600.0  # a run on another host whose heartbeat is older than this is dead (20 missed heartbeats)
# how an attempt ended (run.json "status" is the last attempt's outcome): "dead" is never written by the process
# itself, it is what a reader concludes for a "running" attempt whose process is gone (kill -9, power loss)
OUTCOMES = ("running", "completed", "interrupted", "terminated", "failed", "dead")


def _writes(method):
    """A write of the run folder: skipped by a :class:`Run` that only reads (``writes=False``)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.writes:
            return method(self, *args, **kwargs)
        return None

    return wrapper


class Run:
    """One run folder. ``Run.create(path)`` for a new run, ``Run.open(path)`` for an existing one.

    ``writes=False``: a view that reads the folder but never writes it -- what the processes other than rank 0 of a
    run launched on several processes hold (:mod:`newslora.distributed`), so that one process writes each file.
    Its attempt bookkeeping still updates the ``info`` mapping it is given, in memory."""

    RECIPE = "recipe.yaml"
    INFO = "run.json"
    EVAL = "eval.json"
    STEPS = "metrics_steps.csv"
    EPOCHS = "metrics_epochs.csv"
    WORKBOOK = "metrics.xlsx"
    PLOTS = "plots"
    ADAPTER = "adapter"
    CHECKPOINTS = "checkpoints"
    BACKBONE = "backbone"
    HEAD_INIT = "head_init.safetensors"
    DISTILL = "distill.json"
    TRIAL = "trial.json"
    ERROR = "error.txt"
    MERGED = "merged"
    ONNX, ONNX_INT8 = "onnx", "onnx-int8"  # newslora export --onnx [--int8]

    def __init__(self, path: str | os.PathLike, writes: bool = True):
        self.path = Path(path)
        self.writes = writes

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(cls, path: str | os.PathLike | None, name: str = "run", root: str | os.PathLike = "runs") -> "Run":
        """A new, empty run folder: ``path`` (must be empty or absent) or ``root/<name>`` (``-2``, ``-3`` ... if
        taken). The folder itself is made by :meth:`mkdir`, once everything that can fail cheaply has passed."""
        if path is not None:
            p = Path(path)
            for q in (p, *p.parents):
                if q.exists() and not q.is_dir():
                    raise NewsloraError(f"--run-dir {p}: {q} is a file, not a folder; choose another --run-dir")
            if p.exists() and any(p.iterdir()):
                raise NewsloraError(f"run folder {p} exists and is not empty; choose another --run-dir, or "
                                    f"continue it with --resume {p}")
            return cls(p)
        p, i = Path(root) / name, 2
        while p.exists():
            p, i = Path(root) / f"{name}-{i}", i + 1
        return cls(p)

    @classmethod
    def open(cls, path: str | os.PathLike, need: str = "recipe") -> "Run":
        """An existing run folder. ``need``: ``"exists"`` (just the folder: tolerant readers), ``"any"`` (run.json or eval.json: reporting), ``"recipe"`` (resume),
        ``"adapter"`` (a finished run: predict, export, distill)."""
        run = cls(path)
        p = run.path
        if not p.is_dir():
            raise NewsloraError(f"run folder {p} does not exist")
        if need == "exists":
            return run
        schema = run.read_info().get("schema", SCHEMA_VERSION)
        if not isinstance(schema, int) or isinstance(schema, bool) or schema > SCHEMA_VERSION:
            raise NewsloraError(f"{run.file(cls.INFO)} has schema {schema!r}, newer than this newslora reads "
                                f"({SCHEMA_VERSION}): upgrade newslora (pip install -U newslora) to use this run "
                                "folder")
        if need == "any":
            if not (run.file(cls.INFO).is_file() or run.file(cls.EVAL).is_file()):
                raise NewsloraError(f"{p} is not a newslora run folder (it has neither {cls.INFO} nor {cls.EVAL})")
            return run
        if not run.file(cls.RECIPE).is_file():
            raise NewsloraError(f"{p} is not a newslora run folder (no {cls.RECIPE})")
        if need == "adapter" and not run.adapter_dir.is_dir():
            raise NewsloraError(f"{p} has no {cls.ADAPTER}/: the run did not finish; continue it with "
                                f"newslora train --resume {p}")
        if need == "adapter" and not run.read_info().get("label_names"):
            raise NewsloraError(f"{run.file(cls.INFO)} is missing or damaged; it names the run's classes: restore "
                                "it, or train the run again")
        return run

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        return (Path(path) / Run.RECIPE).is_file()

    def is_finished(self) -> bool:
        return self.adapter_dir.is_dir() and self.file(self.INFO).is_file()

    def mkdir(self) -> "Run":
        if self.writes:
            self.path.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------ paths

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def adapter_dir(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def plots_dir(self) -> Path:
        return self.path / self.PLOTS

    @property
    def merged_dir(self) -> Path:
        return self.path / self.MERGED

    def onnx_dir(self, int8: bool = False) -> Path:
        return self.path / (self.ONNX_INT8 if int8 else self.ONNX)

    @property
    def backbone_dir(self) -> Path:
        return self.path / self.BACKBONE

    @property
    def head_init(self) -> Path:
        return self.path / self.HEAD_INIT

    def relative(self, path: str | os.PathLike | None) -> str | None:
        """``path`` relative to the run folder (as stored in the folder's files), or None."""
        if path is None:
            return None
        p = Path(path)
        try:
            return p.resolve().relative_to(self.path.resolve()).as_posix()
        except ValueError:
            return p.as_posix() if not p.is_absolute() else os.path.relpath(p, self.path)

    # ------------------------------------------------------------------ recipe

    @_writes
    def write_recipe(self, recipe) -> None:
        text = recipe.to_yaml()
        write_file_atomic(self.file(self.RECIPE), lambda tmp: tmp.write_text(text))

    def read_recipe(self):
        """The run's recipe as a validated :class:`~newslora.config.Recipe`."""
        from .config import load_recipe

        return load_recipe(self.file(self.RECIPE))

    def read_recipe_dict(self) -> dict:
        """The recipe as a plain mapping, tolerant of damage (reporting): {} when missing or unreadable."""
        import yaml

        try:
            data = yaml.safe_load(self.file(self.RECIPE).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    # ------------------------------------------------------------------ run.json, eval.json and the other JSON files

    def read_info(self) -> dict:
        return read_json(self.file(self.INFO))

    @_writes
    def write_info(self, info: dict) -> None:
        write_json(self.file(self.INFO), {"schema": SCHEMA_VERSION, **info})

    def update_info(self, **changes) -> dict:
        info = self.read_info()
        info.update(changes)
        self.write_info(info)
        return info

    # ------------------------------------------------------------------ status and attempts

    def start_attempt(self, info: dict, step: int = 0) -> dict:
        """Begin one attempt (a ``train`` or a ``--resume``): ``info`` (the run.json the attempt writes) keeps the
        earlier attempts, the first start time of the run folder and the training seconds and speed that an earlier
        attempt recorded when it finished training (one killed before that recorded none); an earlier attempt that never ended (its process
        was killed) is closed as ``dead`` at its last heartbeat. Writes run.json; returns ``info``."""
        old = self.read_info()
        attempts = [a for a in old.get("attempts") or [] if isinstance(a, dict)]
        for a in attempts:
            if a.get("outcome") == "running":
                a.update(outcome="dead", ended=a.get("heartbeat"),
                         runtime_s=seconds_between(a.get("started"), a.get("heartbeat")))
        started = now_iso()
        attempts.append({"started": started, "ended": None, "start_step": step, "steps": step, "outcome": "running",
                         "error": None, "runtime_s": None, "pid": os.getpid(), "host": socket.gethostname(),
                         "heartbeat": started})
        info.update(started=old.get("started") or info.get("started") or started, finished=None, status="running",
                    error=None, attempts=attempts, total_runtime_s=self._total_runtime(attempts))
        for k in ("train_runtime_s", "train_samples_per_second"):
            if info.get(k) is None:
                info[k] = old.get(k)
        self._clock = time.monotonic()  # the attempt's runtime is measured, not taken from wall-clock times
        self.write_info(info)
        return info

    def heartbeat(self, info: dict, step: int) -> None:
        """Record that the attempt is alive at optimizer step ``step`` (cheap enough for every HEARTBEAT_S)."""
        a = info["attempts"][-1]
        a.update(heartbeat=now_iso(), steps=step)
        self.write_info(info)

    def end_attempt(self, info: dict, outcome: str, step: int | None = None, error: str | None = None) -> dict:
        """End the current attempt as ``outcome`` (completed, interrupted, terminated, failed); the run's status
        becomes it, its total runtime the sum over all attempts. Writes run.json; returns ``info``."""
        assert outcome in OUTCOMES and outcome not in ("running", "dead"), outcome
        a, ended = info["attempts"][-1], now_iso()
        clock = getattr(self, "_clock", None)
        runtime = time.monotonic() - clock if clock is not None else seconds_between(a["started"], ended)
        a.update(ended=ended, heartbeat=ended, outcome=outcome, error=error, runtime_s=round(runtime or 0.0, 2))
        if step is not None:
            a["steps"] = step
        info.update(status=outcome, finished=ended, error=error, total_runtime_s=self._total_runtime(info["attempts"]))
        self.write_info(info)
        return info

    @staticmethod
    def _total_runtime(attempts: list[dict]) -> float:
        return round(sum(a.get("runtime_s") or seconds_between(a.get("started"), a.get("heartbeat")) or 0.0
                         for a in attempts), 2)

    def status(self, info: dict | None = None) -> str | None:
        """The run's status as every reader should show it: run.json's ``status``, except that a ``running`` run
        whose process is gone is ``dead`` -- on this host when its pid no longer exists, on another host when its
        heartbeat is older than STALE_S. None: no run.json (or one without a status)."""
        info = self.read_info() if info is None else info
        status = info.get("status")
        if status != "running":
            return status
        attempts = info.get("attempts") or []
        a = attempts[-1] if attempts and isinstance(attempts[-1], dict) else {}
        if not a.get("pid"):
            return "dead"  # written before attempts were recorded, and never finished
        if a.get("host") == socket.gethostname():
            return "running" if pid_alive(int(a["pid"])) else "dead"
        age = seconds_between(a.get("heartbeat"), now_iso())
        return "dead" if age is None or age > STALE_S else "running"

    def running_attempt(self) -> dict | None:
        """The attempt training this run folder now (a live process), or None."""
        info = self.read_info()
        return info["attempts"][-1] if self.status(info) == "running" else None

    def label_names(self) -> list[str]:
        names = self.read_info().get("label_names")
        if not names:
            raise NewsloraError(f"{self.file(self.INFO)} has no label_names: the run folder is damaged")
        return list(names)

    def read_eval(self) -> dict:
        return read_json(self.file(self.EVAL))

    @_writes
    def write_eval(self, results: dict) -> None:
        write_json(self.file(self.EVAL), results)

    def read_distill(self) -> dict:
        return read_json(self.file(self.DISTILL))

    @_writes
    def write_distill(self, record: dict) -> None:
        write_json(self.file(self.DISTILL), record)

    @_writes
    def write_record(self, name: str, record: dict) -> None:
        """A JSON file of the run folder that a method or another stage owns (its name is theirs)."""
        write_json(self.file(name), record)

    @_writes
    def write_csv(self, name: str, columns: list[str], rows, append: bool = False) -> None:
        """A CSV file of the run folder that a method owns: ``rows`` (mappings or sequences in ``columns``' order)
        written anew, or appended (the header only when the file is new)."""
        path = self.file(name)
        new = not append or not path.is_file()
        with open(path, "a" if append else "w", newline="") as f:
            rows = list(rows)
            if rows and isinstance(rows[0], dict):
                w = csv.DictWriter(f, columns)
                if new:
                    w.writeheader()
            else:
                w = csv.writer(f)
                if new:
                    w.writerow(columns)
            w.writerows(rows)

    def read_csv_rows(self, name: str) -> list[dict]:
        """A CSV file of the run folder as mappings of strings; [] when missing."""
        path = self.file(name)
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    @_writes
    def remove(self, name: str) -> None:
        self.file(name).unlink(missing_ok=True)

    @_writes
    def write_trial(self, record: dict) -> None:
        write_json(self.file(self.TRIAL), record)

    @_writes
    def write_error(self, text: str) -> None:
        self.file(self.ERROR).write_text(text)

    @_writes
    def mark_stopped(self, status: str, finished: str, **extra) -> None:
        """A run that stopped early (a pruned or failed search trial): status recorded, checkpoints dropped."""
        if not self.file(self.INFO).is_file():
            return
        self.update_info(status=status, finished=finished, **extra)
        shutil.rmtree(self.checkpoints_dir, ignore_errors=True)

    # ------------------------------------------------------------------ metric CSVs

    @_writes
    def write_metric_csvs(self, log_history: list[dict]) -> None:
        """metrics_steps.csv (one row per log event) and metrics_epochs.csv (one row per epoch) from a Trainer log.

        An epoch's train_loss and train_accuracy are ``TrainTally``'s exact means over all the epoch's training
        rows (its ``epoch_train_loss`` entries); a log without them (a run that stopped mid-epoch) falls back to the
        mean of the epoch's logged windows."""
        rows = [h for h in log_history if "loss" in h or "eval_loss" in h]
        with open(self.file(self.STEPS), "w", newline="") as f:
            w = csv.DictWriter(f, STEP_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        epochs: dict[int, dict] = {}
        for h in log_history:
            if not ("loss" in h or "eval_loss" in h or "epoch_train_loss" in h):
                continue
            e = max(1, math.ceil(round(h.get("epoch", 0), 6)))
            row = epochs.setdefault(e, {"epoch": e, "_losses": []})
            row["step"] = h.get("step")
            if "loss" in h:
                row["_losses"].append(h["loss"])
            if "epoch_train_loss" in h:
                row["train_loss"], row["train_accuracy"] = h["epoch_train_loss"], h["epoch_train_accuracy"]
            for k in EPOCH_COLUMNS[4:]:
                if k in h:
                    row[k] = h[k]
        with open(self.file(self.EPOCHS), "w", newline="") as f:
            w = csv.DictWriter(f, EPOCH_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for e in sorted(epochs):
                row = epochs[e]
                if "train_loss" not in row:
                    row["train_loss"] = sum(row["_losses"]) / len(row["_losses"]) if row["_losses"] else ""
                w.writerow(row)

    def read_table(self, name: str, numeric=()):
        """A metrics CSV as a DataFrame, tolerant of truncation (interrupted runs); None when missing or empty."""
        import logging

        import pandas as pd

        path = self.file(name)
        if not path.is_file():
            return None
        try:
            df = pd.read_csv(path, on_bad_lines="skip")
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            logging.getLogger(__name__).warning("cannot read %s: %s", path, exc)
            return None
        for col in numeric:
            if col in df:
                df[col] = pd.to_numeric(df[col], errors="coerce")
        return None if df.empty else df

    def read_steps(self):
        return self.read_table(self.STEPS, STEP_COLUMNS)

    def read_epochs(self):
        return self.read_table(self.EPOCHS, EPOCH_COLUMNS)

    # ------------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[Path]:
        """The Trainer's checkpoints, ``checkpoint-<step>`` folders by step; other names are not its (ignored, as
        the Trainer's own ``get_last_checkpoint`` ignores them)."""
        found = [p for p in self.checkpoints_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
                 and p.is_dir()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{step}"

    def rebase_checkpoints(self) -> None:
        """Point each checkpoint's ``best_model_checkpoint`` at this folder. The Trainer stores it as a path that
        may name the folder's old location (moved, copied) or be relative (:meth:`relativize_checkpoints`); on
        resume it must name the checkpoint here, or the best model could not be found at the end."""
        self._rewrite_best(lambda name: str(self.checkpoints_dir / name))

    def relativize_checkpoints(self) -> None:
        """Store ``best_model_checkpoint`` relative to the run folder (``checkpoints/checkpoint-N``)."""
        self._rewrite_best(lambda name: f"{self.CHECKPOINTS}/{name}")

    @_writes
    def _rewrite_best(self, where) -> None:
        for ckpt in self.checkpoints():
            state_file = ckpt / "trainer_state.json"
            state = read_json(state_file)
            best = state.get("best_model_checkpoint")
            if best:
                state["best_model_checkpoint"] = where(Path(best).name)
                write_json(state_file, state)

    # ------------------------------------------------------------------ adapter

    @_writes
    def finish_adapter(self, adapter_card: str | None = None) -> None:
        """Make the saved adapter folder portable: ``adapter_config.json`` names the backbone by hub id (or
        nothing for a local folder) instead of an absolute path, and PEFT's empty README template is replaced
        by ``adapter_card`` (or removed)."""
        cfg_path = self.adapter_dir / "adapter_config.json"
        cfg = read_json(cfg_path)
        if cfg:
            from .families import hub_id

            recipe = self.read_recipe_dict()
            cfg["base_model_name_or_path"] = hub_id(str((recipe.get("model") or {}).get("backbone") or ""))
            write_json(cfg_path, cfg)
        readme = self.adapter_dir / "README.md"
        if adapter_card:
            readme.write_text(adapter_card, encoding="utf-8")
        else:
            readme.unlink(missing_ok=True)
