"""The ``newslora`` command: typed functions as subcommands, each a thin layer over the Python API."""
from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/peft, not actionable

from .errors import NewsloraError, Terminated, sigterm_raises
from .search.space import PRUNERS
from .serveoptions import ServeOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune encoders into news-topic classifiers with LoRA & friends under a parameter budget.")
err = Console(stderr=True)
out = Console(markup=False)  # user text (paths, predicted texts) printed literally

Overrides = typer.Argument(None, help="recipe overrides: key=value ... (e.g. lora.r=8 train.lr=3e-4)")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML recipe (see configs/)")
RuntimeOpt = typer.Option(None, "--runtime", help="torch or onnx (default: chosen by what the folder holds; "
                          "model.onnx -> onnxruntime)")
LabelNamesOpt = typer.Option(None, "--label-names", help="a plain PEFT adapter folder's classes, comma-separated in "
                             "id order (where its base model does not name them)")
COLUMN_OPTIONS = ("--text-column", "--label-column")  # named in errors about the file's columns
TEXT_COLUMN_HELP = "default: the text column(s) the model was trained on (data.text_columns joined), else text"
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def error_line(message: str) -> None:
    """``error: <message>`` on stderr, the message printed literally (brackets in paths or examples are not markup)."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def split_names(value: str | None) -> list[str] | None:
    """``--label-names World,Sports`` as a list; None when not given. Empty names are refused."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        raise NewsloraError(f"--label-names {value!r} has an empty name: give the classes comma-separated in id "
                            "order, e.g. --label-names World,Sports,Business,Sci/Tech")
    return names


def friendly(fn):
    """One clear line and exit code 2 for user errors; Ctrl-C exits 130, SIGTERM during training 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        say = os.environ.get("RANK", "0") == "0"  # under torchrun every rank fails alike; rank 0 says it once
        try:
            return fn(*args, **kwargs)
        except NewsloraError as e:
            if say:
                error_line(str(e))
            raise typer.Exit(2)
        except Terminated as e:  # SIGTERM during training: the run folder records it, the message says how to resume
            if say:
                error_line(str(e))
            raise typer.Exit(128 + 15)
        except OSError as e:  # a full disk or a read-only folder wherever the command writes: one line, not a traceback
            if e.errno not in STORAGE_ERRNOS:
                raise
            if say:
                where = f"{e.filename}: " if e.filename else ""
                error_line(f"{where}{e.strerror or e}; free some space or choose a writable folder, then run the "
                           "command again")
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)

    return wrapper


def command(name=None, **kw):
    return lambda fn: app.command(name, **kw)(friendly(fn))


@command()
def train(overrides: Optional[list[str]] = Overrides, config: Optional[Path] = ConfigOpt,
          run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run folder (default runs/<name>)"),
          resume: Optional[Path] = typer.Option(None, "--resume", help="continue an interrupted run folder")):
    """Train a recipe into a run folder: adapter, metrics, eval.json, plots."""
    from .config import load_recipe
    from .distributed import is_main
    from .train import train as run_train

    if resume is not None and (config or overrides):
        raise NewsloraError("--resume takes the run folder's own recipe; drop --config and overrides")
    if resume is not None and run_dir is not None:
        raise NewsloraError("--resume continues RUN_DIR in place; drop --run-dir")
    recipe = None if resume else load_recipe(config, overrides or [])
    res = run_train(recipe, run_dir=run_dir, resume=resume)
    if is_main():  # several processes (torchrun): one prints
        _print_result(res.run_dir, res.eval)


def _print_result(run_dir: Path, ev: dict):
    for split in ("validation", "test"):
        if split in ev:
            m = ev[split]
            out.print(f"{split}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  (n={m['n']})")
    out.print(f"run folder: {run_dir}")


@command()
def budget(overrides: Optional[list[str]] = Overrides, config: Optional[Path] = ConfigOpt,
           as_json: bool = typer.Option(False, "--json", help="print JSON with a top-level integer 'trainable'")):
    """Count trainable parameters of a recipe without loading weights; exit 1 if over budget."""
    from .budget import budget_report

    report = budget_report(config, overrides or [])
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        report.print(out)
    if not report.fits:
        error_line(report.refusal())
        raise typer.Exit(1)


@command()
def schema():
    """Print the JSON Schema of a recipe, for editors that complete and check YAML (e.g. yaml-language-server:
    `newslora schema > recipe.schema.json`, then `# yaml-language-server: $schema=recipe.schema.json` atop a recipe)."""
    from .config import json_schema

    print(json.dumps(json_schema(), indent=2))


@command()
def baseline(overrides: Optional[list[str]] = Overrides, config: Optional[Path] = ConfigOpt,
             output: Optional[Path] = typer.Option(None, "--output", help="write the metrics as JSON"),
             overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --output file")):
    """TF-IDF + logistic regression on a recipe's own training rows: the figure a recipe has to beat."""
    from .baseline import tfidf_baseline
    from .config import load_recipe
    from .data import load_splits
    from .outputs import check_output_file, write_file_atomic

    recipe = load_recipe(config, overrides or [])
    if output:
        check_output_file(output, [], overwrite)
    res = tfidf_baseline(load_splits(recipe.data), seed=recipe.train.seed)
    parts = [f"{s} accuracy {res[s]['accuracy']:.4f} ({res[s]['n']} rows)" for s in ("validation", "test") if s in res]
    out.print(f"tfidf+logreg on {res['train_rows']} training rows: {', '.join(parts)}; "
              f"fitted in {res['train_seconds']:.1f} s", highlight=False)
    if output:
        write_file_atomic(output, lambda p: p.write_text(json.dumps(res, indent=2)))


@command()
def evaluate(model: Path = typer.Argument(..., help="a run folder, merged or ONNX model folder, or plain PEFT adapter folder"),
             data: Path = typer.Option(..., "--data", help="labelled file (CSV/TSV/JSONL/parquet, or classic AG News CSV)"),
             text_column: Optional[str] = typer.Option(None, help=TEXT_COLUMN_HELP), label_column: str = "label",
             output: Optional[Path] = typer.Option(None, "--output", help="write the metrics as JSON here"),
             overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --output file"),
             runtime: Optional[str] = RuntimeOpt, label_names: Optional[str] = LabelNamesOpt):
    """Evaluate a saved run, merged model, ONNX folder or PEFT adapter folder on a labelled file."""
    from .evaluate import evaluate as run_eval

    m = run_eval(model, data, text_column, label_column, output=output, overwrite=overwrite,
                 options=COLUMN_OPTIONS, runtime=runtime, label_names=split_names(label_names))
    out.print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  (n={m['n']})")
    for name, c in m["per_class"].items():
        out.print(f"  {name:<12} P {c['precision']:.3f}  R {c['recall']:.3f}  F1 {c['f1']:.3f}  n={c['support']}")


@command()
def export(run_dir: Path = typer.Argument(..., help="a finished run folder, or a PEFT adapter folder"),
           output: Optional[Path] = typer.Option(None, "--output", help="default RUN_DIR/merged (RUN_DIR/onnx, "
                                                 "RUN_DIR/onnx-int8 with --onnx)"),
           overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier export in --output"),
           onnx: bool = typer.Option(False, "--onnx", help="also export the merged model to ONNX (model.onnx + "
                                     "tokenizer), checked against PyTorch"),
           int8: bool = typer.Option(False, "--int8", help="with --onnx: int8 weights (onnxruntime dynamic "
                                     "quantization), for fast CPU inference"),
           label_names: Optional[str] = LabelNamesOpt):
    """Merge the adapter into the backbone: a standalone model + tokenizer (safetensors) and a model card;
    with --onnx, an ONNX folder that load_classifier/predict/serve run with onnxruntime."""
    if int8 and not onnx:
        raise NewsloraError("--int8 quantizes the ONNX export: add --onnx")
    names = split_names(label_names)
    if onnx and names:
        raise NewsloraError("--label-names with --onnx: export the adapter folder first (newslora export ADAPTER "
                            "--label-names ...), then the merged folder with --onnx")
    with sigterm_raises("export terminated (SIGTERM); nothing was written, the run folder is unchanged"):
        _export(run_dir, output, overwrite, onnx, int8, names)


def _export(run_dir: Path, output: Optional[Path], overwrite: bool, onnx: bool, int8: bool,
            names: list[str] | None) -> None:
    if onnx:
        from .export_onnx import export_onnx
        from .modelfolder import read_meta

        path = export_onnx(run_dir, output, int8=int8, overwrite=overwrite)
        check = read_meta(path)["check"]
        out.print(f"ONNX model: {path} (same argmax as PyTorch on {check['same_argmax']}/{check['n']} check texts, "
                  f"max logit diff {check['max_logit_diff']:.1e})")
        return
    from .export import export as run_export

    out.print(f"merged model: {run_export(run_dir, output, overwrite=overwrite, label_names=names)}")


@command()
def predict(model: Path = typer.Argument(..., help="a run folder, merged or ONNX model folder, or plain PEFT adapter folder"),
            input: Path = typer.Option(..., "--input", "-i", help="CSV/TSV/JSONL/parquet/.txt, or a pickled Dataset"),
            output: Path = typer.Option(Path("submission.csv"), "--output", "-o",
                                        help="the extension picks the format: .csv, .tsv, .jsonl or .parquet"),
            text_column: Optional[str] = typer.Option(None, help=TEXT_COLUMN_HELP),
            id_column: Optional[str] = typer.Option(None, "--id-column", help="input column carried to the output's "
                                                    "ID column (default: id or ID when the input has one, else "
                                                    "0..N-1)"),
            trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow unpickling (runs code from the file)"),
            extra_columns: bool = typer.Option(False, "--extra-columns", help="add label names and probabilities"),
            batch_size: int = typer.Option(None, help="default: 128 on a GPU, 32 on a CPU"),
            chunk_rows: int = typer.Option(None, "--chunk-rows", help="rows read, classified and written at a time "
                                           "(default 10,000; memory stays flat whatever the input's size)"),
            overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --output file"),
            runtime: Optional[str] = RuntimeOpt, label_names: Optional[str] = LabelNamesOpt):
    """Write a Kaggle submission (ID,Label) for every text in a file, streamed chunk by chunk, with a progress bar
    on stderr; the output appears only once every row is written."""
    from .predict import check_batch_size
    from .predict import predict as run_predict

    check_batch_size(batch_size)  # before the model loads
    chunking = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    with rows_progress("predict") as progress:
        path = run_predict(model, input, output, text_column, trust_pickle, extra_columns, batch_size, overwrite,
                           options=COLUMN_OPTIONS, runtime=runtime, progress=progress, id_column=id_column,
                           label_names=split_names(label_names), **chunking)
    out.print(f"wrote {path}")


class RowsColumn(ProgressColumn):
    """``12,000/1,000,000 rows`` (``12,000 rows`` while the total is unknown) and the rate, ``8,450 rows/s``."""

    def render(self, task) -> Text:
        total = f"/{int(task.total):,}" if task.total is not None else ""
        speed = task.finished_speed or task.speed
        rate = f"{speed:,.0f} rows/s" if speed else "? rows/s"
        return Text(f"{int(task.completed):,}{total} rows  {rate}", style="progress.download")


@contextmanager
def rows_progress(what: str):
    """A rich progress bar on stderr, drawn from the first ``update(done, total)`` call of the block on (so that
    an error before any work shows only its error line)."""
    bar = Progress(TextColumn(what), BarColumn(), RowsColumn(), TimeElapsedColumn(), console=err)
    task = None

    def update(done: int, total: int | None) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(what, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


@command()
def classify(model: Path = typer.Argument(..., help="a run folder, merged or ONNX model folder, or plain PEFT adapter folder"),
             texts: list[str] = typer.Argument(..., help="one or more headlines"),
             runtime: Optional[str] = RuntimeOpt, label_names: Optional[str] = LabelNamesOpt):
    """Classify headlines given on the command line."""
    from .predict import check_text, load_classifier

    for i, t in enumerate(texts):  # before the model loads
        check_text(t, f"headline {i + 1}")
    clf = load_classifier(model, runtime=runtime, label_names=split_names(label_names))
    for text, r in zip(texts, clf.classify(texts)):
        out.print(f"{r['label']:<10} {r['score']:.3f}  {text}")


@command()
def plot(run_dirs: list[Path] = typer.Argument(..., help="run folders")):
    """(Re)draw a run's plots and metrics workbook."""
    from .report import plot_run, write_workbook

    from .run import Run

    for d in run_dirs:
        if not Run(d).file(Run.INFO).is_file():
            raise NewsloraError(f"{d} is not a run folder (no {Run.INFO})")
        failures: list[str] = []
        files = plot_run(d, failures) + [write_workbook(d)]
        out.print(f"{d}: {', '.join(str(f.relative_to(d)) for f in files)}", markup=False)
        if failures:
            raise NewsloraError(f"{d}: could not draw {'; '.join(failures)}")


@command()
def report(run_dirs: list[Path] = typer.Argument(..., help="run folders to compare"),
           output: Path = typer.Option(Path("report"), "--output", "-o")):
    """Compare runs in one table (Markdown, self-contained HTML, xlsx), sorted by validation accuracy."""
    from .report import compare_runs

    for kind, path in compare_runs(run_dirs, output).items():
        out.print(f"{kind}: {path}")


def serve_option(name: str, *decls: str):
    """A ``newslora serve`` option with the default and help that :class:`ServeOptions` defines for it."""
    f = next(f for f in dataclasses.fields(ServeOptions) if f.name == name)
    return typer.Option(f.default, *decls, help=f.metadata["help"])


@command()
def serve(model: Path = typer.Argument(..., help="a run folder, merged or ONNX model folder, or plain PEFT adapter folder"),
          host: str = typer.Option("127.0.0.1", help="address to bind; a non-loopback one needs $NEWSLORA_API_TOKEN"),
          port: int = 8000,
          runtime: Optional[str] = RuntimeOpt,
          max_batch: int = serve_option("max_batch"),
          batch_wait_ms: float = serve_option("batch_wait_ms"),
          batching: bool = serve_option("batching", "--batching/--no-batching"),
          max_queue: int = serve_option("max_queue"),
          max_texts: int = serve_option("max_texts"),
          max_text_bytes: int = serve_option("max_text_bytes"),
          max_body_bytes: int = serve_option("max_body_bytes"),
          label_names: Optional[str] = LabelNamesOpt):
    """Serve a model over HTTP: a page at / to try it in a browser, POST /classify {"texts": [...]}, GET /labels,
    /model, /health, /metrics (Prometheus), /docs (OpenAPI). Set $NEWSLORA_API_TOKEN to require
    'Authorization: Bearer <token>' everywhere but / and /health."""
    from .serve import serve as run_serve

    opts = ServeOptions(max_batch=max_batch, batch_wait_ms=batch_wait_ms, batching=batching, max_queue=max_queue,
                        max_texts=max_texts, max_text_bytes=max_text_bytes, max_body_bytes=max_body_bytes)
    opts.check()
    run_serve(model, host=host, port=port, runtime=runtime, options=opts, label_names=split_names(label_names))


@command()
def distill(teacher: str = typer.Option(..., "--teacher", "-t",
                                        help="teacher run folder(s) or merged model folder(s), comma-separated"),
            overrides: Optional[list[str]] = typer.Argument(None, help="student recipe overrides: key=value ..."),
            config: Optional[Path] = typer.Option(None, "--config", "-c", help="the student's YAML recipe"),
            run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run folder (default runs/<name>)")):
    """Distil teacher(s) into a student recipe (sets distill.teachers and trains it like `newslora train`)."""
    from .config import load_recipe
    from .distill import inspect_teacher
    from .run import Run
    from .train import train as run_train

    teachers = [t.strip() for t in teacher.split(",") if t.strip()]
    if not teachers:
        raise NewsloraError("--teacher is empty: give a run folder or merged model folder (comma-separate several)")
    for t in teachers:  # a wrong path is reported before the recipe's data and model are touched
        inspect_teacher(t)
    recipe = load_recipe(config, overrides or [])
    recipe.distill.teachers = teachers
    recipe.check()
    res = run_train(recipe, run_dir=run_dir)
    from .distributed import is_main

    if not is_main():  # several processes (torchrun): rank 0 wrote distill.json and prints the summary
        return
    d = Run(res.run_dir).read_distill()
    t, student = d.get("teacher") or {}, d.get("student") or {}
    for split in ("validation", "test"):
        if split in student:
            ta = f"{t[split]:.4f}" if split in t else "n/a"
            out.print(f"{split}: student accuracy {student[split]:.4f}  teacher {ta}")
    out.print(f"distilled from {', '.join(teachers)} (T={d['temperature']}, alpha={d['alpha']})")
    out.print(f"run folder: {res.run_dir}")


@command()
def search(overrides: Optional[list[str]] = typer.Argument(None, help="base recipe overrides: key=value ... "
                                                                       "(e.g. train.max_steps=60)"),
           config: Optional[Path] = typer.Option(None, "--config", "-c", help="base YAML recipe "
                                                                               "(e.g. configs/search-minilm.yaml)"),
           space: Path = typer.Option(..., "--space", "-s", help="YAML search space (e.g. configs/search-space.yaml)"),
           trials: int = typer.Option(20, "--trials", "-n", help="total trials in the study (a continued study "
                                                                 "counts its earlier trials)"),
           workers: int = typer.Option(1, "--workers", "-j", help="local worker processes sharing the study"),
           storage: Optional[str] = typer.Option(None, "--storage", help="study database shared by the workers of "
                                                 "every machine running this search: postgresql://USER:PASSWORD@HOST"
                                                 ":PORT/DB, or sqlite:///PATH (default sqlite:///<study folder>/"
                                                 "study.db)"),
           heartbeat: int = typer.Option(30, "--heartbeat", help="seconds between a running trial's heartbeats; "
                                                                 "a trial silent for 3 heartbeats (its process "
                                                                 "died) is failed and retried; every worker of a "
                                                                 "study uses the same value"),
           study: Optional[str] = typer.Option(None, "--study", help="study name (default: the recipe name); the "
                                                                     "same name continues the study"),
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="study folder (default "
                                                                              "studies/<study>)"),
           pruner: Optional[str] = typer.Option(None, "--pruner", help=f"{' | '.join(PRUNERS)} (default: the "
                                                                       "space file's, else median)"),
           seed: Optional[int] = typer.Option(None, "--seed", help="sampler seed (default: the space file's, else "
                                                                   "train.seed)")):
    """Hyper-parameter search with Optuna (seeded TPE + pruning) under the parameter budget; writes studies/<study>/."""
    from .config import load_recipe
    from .search import print_summary
    from .search import search as run_search

    recipe = load_recipe(config, overrides or [])
    res = run_search(recipe, space, trials, workers=workers, storage=storage, study_name=study, output=output,
                     pruner=pruner, seed=seed, heartbeat=heartbeat)
    print_summary(res, recipe.train.metric)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
