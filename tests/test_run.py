"""The run folder (newslora.run): portable (relative paths only), versioned, and the one owner of its files."""
import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TEST_CSV, ctrl_c_after, tiny_overrides
from newslora.cli import app
from newslora.config import load_recipe
from newslora.families import hub_id
from newslora.errors import NewsloraError
from newslora.run import SCHEMA_VERSION, Run
from newslora.train import train

runner = CliRunner()
TEXT_SUFFIXES = {".json", ".yaml", ".csv", ".md", ".txt"}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def text_files(root):
    return [p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]


def test_moved_run_folder_resumes_predicts_exports_and_reports(tmp_path):
    """Interrupt a run, move the folder (copy + delete the original), then resume, predict, export and report from
    the copy. No text file in it names the old location."""
    original = tmp_path / "first" / "run"
    recipe = load_recipe(None, tiny_overrides(**{"train.epochs": 2}))
    with pytest.raises(KeyboardInterrupt):
        train(recipe, run_dir=original, extra_callbacks=[ctrl_c_after(6)])
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, moved)
    shutil.rmtree(tmp_path / "first")

    r = cli("train", "--resume", moved)
    assert r.exit_code == 0, r.output
    run = Run.open(moved, need="adapter")
    info = run.read_info()
    assert info["status"] == "completed" and info["schema"] == SCHEMA_VERSION
    assert info["best_checkpoint"].startswith("checkpoints/checkpoint-")
    assert (moved / info["best_checkpoint"]).is_dir()
    adapter_cfg = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] is None  # a local backbone folder: no hub id, no path
    assert "## Model Details" not in (run.adapter_dir / "README.md").read_text()  # not PEFT's empty template

    out = tmp_path / "submission.csv"
    assert cli("predict", moved, "--input", TEST_CSV, "--output", out).exit_code == 0
    assert len(out.read_text().splitlines()) == 7601
    r = cli("export", moved)
    assert r.exit_code == 0, r.output
    card = (moved / "merged" / "README.md").read_text()
    assert "merged.tmp" not in card and "copy/merged" in card
    assert "base_model" not in yaml.safe_load(card.split("---")[1])  # local backbone: no base_model
    meta = json.loads((moved / "merged" / "newslora.json").read_text())
    assert meta["run"] == ".."
    r = cli("report", moved, "--output", tmp_path / "report")
    assert r.exit_code == 0, r.output
    assert "copy" in (tmp_path / "report" / "report.md").read_text()

    for f in text_files(moved):  # nothing points at the deleted original or at the copy's absolute location
        text = f.read_text(errors="ignore")
        assert str(tmp_path) not in text, f


def test_create_and_open_refuse_what_they_cannot_use(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(NewsloraError, match="exists and is not empty"):
        Run.create(busy)
    with pytest.raises(NewsloraError, match="does not exist"):
        Run.open(tmp_path / "nope")
    with pytest.raises(NewsloraError, match="not a newslora run folder"):
        Run.open(busy, need="any")
    (busy / Run.RECIPE).write_text("name: x\n")
    with pytest.raises(NewsloraError, match="did not finish"):
        Run.open(busy, need="adapter")
    r = cli("report", tmp_path / "nope", "--output", tmp_path / "rep")  # one line, exit 2, no traceback
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    assert Run.create(None, "demo", root=tmp_path).path == tmp_path / "demo"
    (tmp_path / "demo").mkdir()
    assert Run.create(None, "demo", root=tmp_path).path == tmp_path / "demo-2"


@pytest.mark.parametrize("backbone, expected", [
    ("minilm", "sentence-transformers/all-MiniLM-L6-v2"), ("roberta-base", "FacebookAI/roberta-base"),
    ("Mpnet-Base", "sentence-transformers/all-mpnet-base-v2"),
    ("FacebookAI/roberta-base", "FacebookAI/roberta-base"), ("/data/models/roberta", None), ("./local", None),
    ("", None)])
def test_hub_id_of_a_backbone(backbone, expected):
    assert hub_id(backbone) == expected


def test_a_resume_after_training_keeps_the_training_seconds_of_the_attempt_that_trained(tmp_path, monkeypatch):
    """Training finished, then the process stopped before the run was complete (here: Ctrl-C while the adapter is
    saved). The resumed attempt trains no step, and run.json still reports the first attempt's training time."""
    import newslora.train as train_module

    run_dir = tmp_path / "run"
    real_save = train_module.save_adapter

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_adapter", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(None, tiny_overrides()), run_dir=run_dir)
    first = Run.open(run_dir).read_info()
    assert first["attempts"][-1]["outcome"] == "interrupted" and first["train_runtime_s"] > 0

    monkeypatch.setattr(train_module, "save_adapter", real_save)
    r = cli("train", "--resume", run_dir)
    assert r.exit_code == 0, r.output
    info = Run.open(run_dir).read_info()
    assert info["status"] == "completed" and len(info["attempts"]) == 2
    assert first["train_runtime_s"] <= info["train_runtime_s"] < first["train_runtime_s"] + 60
    assert info["train_samples_per_second"] == first["train_samples_per_second"]
