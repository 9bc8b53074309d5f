"""Hyper-parameter search (newslora.search): budget rejection, continuation, workers, best recipe, test isolation.

Tiny random-init RoBERTa trials (a few optimizer steps each); the whole file stays within a few minutes on 2 cores.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TEST_CSV, tiny_overrides

from newslora.config import load_recipe
from newslora.errors import NewsloraError

FAST = {"data.max_train_samples": 64, "data.validation_size": 32, "data.max_test_samples": 64,
        "model.max_length": 32, "train.batch_size": 16, "train.eval_steps": 2, "train.logging_steps": 2,
        "train.save_total_limit": 1}
SPACE = {
    "pruner": "none",
    "sampler": {"n_startup_trials": 2},
    "seed": 0,
    "params": {
        "train.lr": {"type": "loguniform", "low": "1e-3", "high": 3.0e-2},
        "lora.r": {"type": "int", "low": 2, "high": 8},
        "lora.target_modules": {"type": "categorical", "choices": [["query", "value"], ["query", "key", "value"]]},
    },
}


def fast_recipe(**extra):
    return load_recipe(None, tiny_overrides(**{**FAST, **extra}))


class _Interrupt:
    """A TrainerCallback that presses Ctrl-C after the first optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Interrupt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                raise KeyboardInterrupt

        return Interrupt()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 3-trial study interrupted by Ctrl-C in trial 1, then continued by running the same search again.

    Every read of a data file during both searches is recorded, with the time it happened.
    """
    import newslora.data
    import newslora.readers
    import newslora.train
    from newslora.search import search

    out = tmp_path_factory.mktemp("studies") / "tiny-study"
    reads: list[tuple[str, float]] = []
    real_read, real_train = newslora.data.read_table, newslora.train.train

    def spy_read(path, *a, **kw):
        reads.append((str(Path(path).resolve()), time.time()))
        return real_read(path, *a, **kw)

    def interrupting_train(recipe, *a, extra_callbacks=(), **kw):
        if recipe.name.endswith("-t1"):
            extra_callbacks = [*extra_callbacks, _Interrupt()]
        return real_train(recipe, *a, extra_callbacks=extra_callbacks, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(newslora.data, "read_table", spy_read)
        mp.setattr(newslora.readers, "read_table", spy_read)
        mp.setattr(newslora.train, "finalize", lambda run_dir: None)  # per-run plots: report's business, slow here
        mp.setattr(newslora.train, "train", interrupting_train)
        with pytest.raises(KeyboardInterrupt):
            search(fast_recipe(), SPACE, 3, output=out, study_name="tiny-study")
        import optuna

        first = optuna.load_study(study_name="tiny-study", storage=f"sqlite:///{out / 'study.db'}").get_trials()
        mp.setattr(newslora.train, "train", real_train)
        result = search(fast_recipe(), SPACE, 3, output=out, study_name="tiny-study")
    return {"out": out, "result": result, "first": first, "reads": reads}


def _trials(out: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}").get_trials()


@pytest.mark.slow  # runs a whole study
def test_interrupted_study_continues_with_the_same_numbering(study):
    first = study["first"]
    assert [t.number for t in first] == [0, 1]
    assert first[0].state.name == "COMPLETE" and first[0].user_attrs.get("baseline")
    assert first[1].state.name == "FAIL" and first[1].user_attrs["interrupted"]
    assert json.loads((study["out"] / "trials/1/run.json").read_text())["status"] == "interrupted"

    trials = _trials(study["out"], "tiny-study")
    assert [t.number for t in trials] == [0, 1, 2, 3]  # continued: grows, no duplicate numbers
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].params == first[0].params
    assert study["result"].states["COMPLETE"] == 3  # the interrupted trial does not count towards --trials 3


@pytest.mark.slow  # runs a whole study
def test_study_folder_has_table_best_recipe_and_plots(study):
    out, res = study["out"], study["result"]
    df = pd.read_csv(out / "trials.csv")
    assert list(df["number"]) == [0, 1, 2, 3]
    for col in ("state", "value", "train.lr", "lora.r", "lora.target_modules", "trainable", "duration_s", "run_dir"):
        assert col in df.columns
    assert set(df["lora.target_modules"].dropna()) <= {"[query, value]", "[query, key, value]"}
    assert (df.loc[df.state == "COMPLETE", "trainable"] > 0).all()
    assert pd.read_excel(out / "trials.xlsx").shape == df.shape
    for n in range(4):
        assert (out / "trials" / str(n) / "recipe.yaml").is_file()
    best = load_recipe(out / "best.yaml")
    stored = _trials(out, "tiny-study")[res.best_trial].params
    assert best.train.lr == pytest.approx(stored["train.lr"]) and best.lora.r == stored["lora.r"]
    assert isinstance(best.lora.target_modules, list)  # mapped back from its stored label
    assert best.data.test == str(TEST_CSV)  # ready to run: the base recipe's test data
    for name in ("optimization_history", "parallel_coordinate"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    complete = df[df.state == "COMPLETE"]
    if len(complete) >= 2 and complete[["train.lr", "lora.r"]].nunique().max() > 1:
        assert (out / "param_importances.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_trial"] == res.best_trial and summary["baseline_trial"] == 0


@pytest.mark.slow  # runs a whole study
def test_test_set_is_read_once_after_all_trials(study):
    out, reads = study["out"], study["reads"]
    test_reads = [t for p, t in reads if p == str(TEST_CSV.resolve())]
    last_trial_end = max(t.datetime_complete.timestamp() for t in _trials(out, "tiny-study"))
    assert len(test_reads) == 1 and test_reads[0] >= last_trial_end  # the final evaluation of the best trial
    assert any(p != str(TEST_CSV.resolve()) for p, _ in reads)  # the spy saw the trials' reads
    for run in (out / "trials").iterdir():
        assert load_recipe(run / "recipe.yaml").data.test is None
        if (run / "eval.json").is_file():
            assert set(json.loads((run / "eval.json").read_text())) == {"validation"}
        assert json.loads((run / "run.json").read_text())["rows"]["test"] == 0
    record = json.loads((out / "test.json").read_text())
    assert record["trial"] == study["result"].best_trial and record["test"]["n"] == 64


@pytest.mark.slow  # runs a whole study
def test_best_recipe_reproduces_the_best_trial(study, tmp_path):
    import newslora.train

    out, res = study["out"], study["result"]
    rerun = newslora.train.train(load_recipe(out / "best.yaml"), run_dir=tmp_path / "best")
    assert rerun.eval["validation"]["accuracy"] == pytest.approx(res.best_value, abs=1e-6)
    trial_curve = pd.read_csv(out / "trials" / str(res.best_trial) / "metrics_steps.csv")["eval_loss"].dropna()
    rerun_curve = pd.read_csv(tmp_path / "best" / "metrics_steps.csv")["eval_loss"].dropna()
    assert len(trial_curve) >= 2 and list(rerun_curve) == pytest.approx(list(trial_curve), abs=1e-6)
    assert "test" in rerun.eval  # best.yaml trains and tests like any recipe


def test_over_budget_trials_are_rejected_without_training(tmp_path, monkeypatch):
    import newslora.train
    from newslora.model import count_trainable
    from newslora.search import search

    count_trainable(fast_recipe())  # warm imports: the timing below is the rejection itself

    def no_training(*a, **kw):
        raise AssertionError("an over-budget trial was trained")

    monkeypatch.setattr(newslora.train, "train", no_training)
    space = {"seed": 1, "params": {"lora.r": {"type": "int", "low": 4000, "high": 5000}}}
    out = tmp_path / "budget"
    res = search(fast_recipe(**{"budget.max_params": 20000}), space, 2, output=out)
    trials = _trials(out, "tiny")
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"] and res.best_trial is None
    for t in trials:
        assert t.user_attrs["trainable"] > 20000 and "over budget" in t.user_attrs["reason"]
        folder = out / "trials" / str(t.number)
        assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml", "trial.json"]  # no run, no checkpoints
    assert not (out / "best.yaml").exists()


@pytest.mark.slow  # runs a whole study
def test_two_workers_share_one_sqlite_study(tmp_path, capfd):
    from newslora.search import search

    out = tmp_path / "pair"
    space = {**SPACE, "pruner": {"type": "threshold", "lower": 1.01}}  # every trial pruned at its first evaluation
    res = search(fast_recipe(), space, 4, workers=2, output=out)
    trials = _trials(out, "tiny")
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state.name for t in trials} == {"PRUNED"} and res.n_trials == 4
    for t in trials:
        assert t.user_attrs["reason"].startswith("pruned at step 2")
        info = json.loads((out / "trials" / str(t.number) / "run.json").read_text())
        assert info["status"] == "pruned" and not (out / "trials" / str(t.number) / "checkpoints").exists()
    captured = capfd.readouterr()
    assert "database is locked" not in captured.out + captured.err
    assert "Traceback" not in captured.err


def test_space_validation(tmp_path):
    from newslora.search import load_space

    base = fast_recipe()
    with pytest.raises(NewsloraError, match=r"unknown recipe key 'lora.rr' \(did you mean 'r'\?\)"):
        load_space({"lora.rr": {"type": "int", "low": 2, "high": 8}}, base)
    with pytest.raises(NewsloraError, match="integer key"):
        load_space({"lora.r": {"type": "float", "low": 2, "high": 8}}, base)
    with pytest.raises(NewsloraError, match="lora.dropout"):
        load_space({"lora.dropout": {"type": "float", "low": 0.0, "high": 1.5}}, base)
    with pytest.raises(NewsloraError, match="unknown pruner"):
        load_space({"pruner": "early", "train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}, base)
    with pytest.raises(NewsloraError, match="lora is a recipe section"):
        load_space({"lora": {"type": "categorical", "choices": [1, 2]}}, base)
    import optuna

    from newslora.search import make_pruner

    assert isinstance(make_pruner("successive_halving"), optuna.pruners.SuccessiveHalvingPruner)
    assert make_pruner({"type": "median", "n_startup_trials": 1})._n_startup_trials == 1
    with pytest.raises(NewsloraError, match="pruner median"):
        make_pruner({"type": "median", "patience": 1})
    space = load_space({"lora": {"layers": [None, [0], [0, 1]]}, "method": ["lora", "dora"]}, base)
    layers = space.params[0]
    assert layers.key == "lora.layers" and layers.labels == ["null", "[0]", "[0, 1]"]
    assert layers.decode("[0, 1]") == [0, 1] and layers.encode(None) == "null"
    assert space.encode(base.to_dict()) == {"lora.layers": "null", "method": "lora"}


def test_cli_reports_a_bad_space_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from newslora.cli import app

    bad = tmp_path / "space.yaml"
    bad.write_text(yaml.safe_dump({"params": {"train.batchsize": {"type": "categorical", "choices": [16, 32]}}}))
    res = CliRunner().invoke(app, ["search", "--space", str(bad), "--trials", "2", "--output", str(tmp_path / "s"),
                                   *tiny_overrides()])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown recipe key 'train.batchsize'" in lines[0]
    assert "did you mean 'batch_size'?" in lines[0]
    assert not (tmp_path / "s").exists()  # nothing written for a bad space


def test_trial_base_decides_auto_once_at_the_workers_thread_count(monkeypatch):
    """A study's workers all train from one precision: ``auto`` resolved here at the workers' thread count (the
    probe's cached measurement at that count), this process's thread count and the recipe dict left as they were."""
    import torch

    from newslora import trainer
    from newslora.search.study import trial_base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: True)
    asked = []
    before = torch.get_num_threads()
    # the probe is asked at the workers' count; this process's own count is never changed for it
    monkeypatch.setattr(trainer, "measure_bf16_speedup",
                        lambda threads: asked.append((threads, torch.get_num_threads())) or 1.5)
    base = {"train": {"precision": "auto"}}
    assert trial_base(base, 1)["train"]["precision"] == "bf16" and asked == [(1, before)]
    assert base == {"train": {"precision": "auto"}} and torch.get_num_threads() == before
    assert trial_base({"train": {"precision": "auto", "threads": 3}}, 1)["train"]["precision"] == "bf16"
    assert asked == [(1, before), (3, before)]  # the recipe's own train.threads wins
    monkeypatch.setattr(trainer, "measure_bf16_speedup", lambda threads: 0.6)
    assert trial_base(base, 1)["train"]["precision"] == "fp32"
    named = {"train": {"precision": "fp32"}}
    assert trial_base(named, 1) is named
