"""The ``newslora`` command: typed functions as subcommands, each a thin layer over the Python API."""
from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/peft, not actionable

from .errors import NewsloraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune encoders into news-topic classifiers with LoRA & friends under a parameter budget.")
err = Console(stderr=True)
out = Console()

Overrides = typer.Argument(None, help="recipe overrides: key=value ... (e.g. lora.r=8 train.lr=3e-4)")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML recipe (see configs/)")
COLUMN_OPTIONS = ("--text-column", "--label-column")  # named in errors about the file's columns


def friendly(fn):
    """One clear line and exit code 2 for user errors; Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            return fn(*args, **kwargs)
        except NewsloraError as e:
            err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
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
    from .train import train as run_train

    if resume is not None and (config or overrides):
        raise NewsloraError("--resume takes the run folder's own recipe; drop --config and overrides")
    recipe = None if resume else load_recipe(config, overrides or [])
    res = run_train(recipe, run_dir=run_dir, resume=resume)
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
        raise typer.Exit(1)


@command()
def evaluate(model: Path = typer.Argument(..., help="run folder or merged model folder"),
             data: Path = typer.Option(..., "--data", help="labelled file (CSV/TSV/JSONL/parquet, or classic AG News CSV)"),
             text_column: str = "text", label_column: str = "label",
             output: Optional[Path] = typer.Option(None, "--output", help="write the metrics as JSON here"),
             overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --output file")):
    """Evaluate a saved run or merged model on a labelled file."""
    from .evaluate import evaluate as run_eval

    m = run_eval(model, data, text_column, label_column, output=output, overwrite=overwrite,
                 options=COLUMN_OPTIONS)
    out.print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  (n={m['n']})")
    for name, c in m["per_class"].items():
        out.print(f"  {name:<12} P {c['precision']:.3f}  R {c['recall']:.3f}  F1 {c['f1']:.3f}  n={c['support']}")


@command()
def export(run_dir: Path = typer.Argument(..., help="a finished run folder"),
           output: Optional[Path] = typer.Option(None, "--output", help="default RUN_DIR/merged"),
           overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier export in --output")):
    """Merge the adapter into the backbone: a standalone model + tokenizer (safetensors) and a model card."""
    from .export import export as run_export

    out.print(f"merged model: {run_export(run_dir, output, overwrite=overwrite)}")


@command()
def predict(model: Path = typer.Argument(..., help="run folder or merged model folder"),
            input: Path = typer.Option(..., "--input", "-i", help="CSV/TSV/JSONL/parquet/.txt, or a pickled Dataset"),
            output: Path = typer.Option(Path("submission.csv"), "--output", "-o"),
            text_column: str = "text",
            trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow unpickling (runs code from the file)"),
            extra_columns: bool = typer.Option(False, "--extra-columns", help="add label names and probabilities"),
            batch_size: int = typer.Option(None, help="default: 128 on a GPU, 32 on a CPU"),
            overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --output file")):
    """Write a Kaggle submission (ID,Label) for every text in a file."""
    from .predict import predict as run_predict

    path = run_predict(model, input, output, text_column, trust_pickle, extra_columns, batch_size, overwrite,
                       options=COLUMN_OPTIONS)
    out.print(f"wrote {path}")


@command()
def classify(model: Path = typer.Argument(..., help="run folder or merged model folder"),
             texts: list[str] = typer.Argument(..., help="one or more headlines")):
    """Classify headlines given on the command line."""
    from .predict import load_classifier

    for text, r in zip(texts, load_classifier(model).classify(texts)):
        out.print(f"{r['label']:<10} {r['score']:.3f}  {text}")


@command()
def plot(run_dirs: list[Path] = typer.Argument(..., help="run folders")):
    """(Re)draw a run's plots and metrics workbook."""
    from .report import plot_run, write_workbook

    for d in run_dirs:
        if not (d / "run.json").is_file():
            raise NewsloraError(f"{d} is not a run folder (no run.json)")
        files = plot_run(d) + [write_workbook(d)]
        out.print(f"{d}: {', '.join(str(f.relative_to(d)) for f in files)}")


@command()
def report(run_dirs: list[Path] = typer.Argument(..., help="run folders to compare"),
           output: Path = typer.Option(Path("report"), "--output", "-o")):
    """Compare runs in one table (Markdown, self-contained HTML, xlsx), sorted by validation accuracy."""
    from .report import compare_runs

    for kind, path in compare_runs(run_dirs, output).items():
        out.print(f"{kind}: {path}")


@command()
def serve(model: Path = typer.Argument(..., help="run folder or merged model folder"),
          host: str = "127.0.0.1", port: int = 8000):
    """Serve a model over HTTP: POST /classify {"texts": [...]}; GET /health."""
    import uvicorn

    from .serve import create_app

    uvicorn.run(create_app(model), host=host, port=port)


def _register_optional():
    """Stages that live in their own modules add their commands here."""
    for module in ("distill", "search"):
        try:
            mod = __import__(f"newslora.{module}", fromlist=["cli"])
        except ImportError:
            continue
        if hasattr(mod, "cli"):
            command(module)(mod.cli)


_register_optional()


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
