"""The accuracy benchmark's protocol (bench/accuracy.py) on a tiny model and a few rows."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "ag_news"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accuracy_bench", REPO / "bench" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def files(tmp_path):
    """A 400-row training pool and a 40-row test set, with two test texts planted in the pool (one re-cased and
    re-spaced) and one validation-sized block of exact duplicates inside the pool."""
    pool = pd.read_csv(SHARED / "train_sample.csv").groupby("label").head(100).reset_index(drop=True)
    test = pd.read_csv(SHARED / "train_sample.csv").groupby("label").tail(10).reset_index(drop=True)
    planted = pd.DataFrame({"text": [test.text[0], "  " + test.text[1].upper().replace(" ", "   ") + " "],
                            "label": [test.label[0], test.label[1]]})
    pool = pd.concat([pool, planted, pool.iloc[:30]], ignore_index=True)
    (tmp_path / "src").mkdir()
    pool.to_csv(tmp_path / "src" / "pool.csv", index=False)
    test.to_csv(tmp_path / "src" / "test.csv", index=False)
    return tmp_path / "src" / "pool.csv", tmp_path / "src" / "test.csv", planted


def test_split_drops_rows_that_are_in_the_test_set(bench, files, tmp_path):
    pool, test, planted = files
    info = bench.prepare_data(tmp_path / "work", pool, test, rows=None, val_rows=40, test_rows=None)
    train = pd.read_csv(tmp_path / "work" / "data" / "train.csv")
    val = pd.read_csv(tmp_path / "work" / "data" / "validation.csv")
    norm = set(bench.normalise(pd.read_csv(test).text))
    assert info["dropped"]["train_in_test"] == 2
    assert not set(bench.normalise(train.text)) & norm and not set(bench.normalise(val.text)) & norm
    assert not set(bench.normalise(train.text)) & set(bench.normalise(val.text))
    assert len(val) == 40 and info["rows"]["train"] == len(train)


def test_a_leak_stops_the_bench(bench, files):
    pool = pd.read_csv(files[0])
    train, val, test = pool.iloc[:50], pool.iloc[100:120], pool.iloc[[7]].assign(text=lambda d: d.text.str.upper())
    with pytest.raises(SystemExit, match="1 text.* in both train and test"):
        bench.check_disjoint(train, val, test)
    bench.check_disjoint(train, val, pool.iloc[[60]])  # disjoint: passes


@pytest.mark.slow  # the whole bench twice: TF-IDF and tiny training, predictions, the report
def test_baselines_and_newslora_see_the_same_rows_and_finished_recipes_are_reused(bench, files, tmp_path):
    pool, test, _ = files
    work = tmp_path / "work"
    args = ["--recipes", "tfidf,tiny,tiny-chosen", "--rows", "48", "--val-rows", "40", "--source", str(pool), "--test", str(test),
            "--workdir", str(work), "--reference", "tiny", "--output", str(tmp_path / "ACCURACY.md")]
    assert bench.main(args) == 0
    tfidf = json.loads((work / "results" / "tfidf-s42.json").read_text())
    tiny = json.loads((work / "results" / "tiny-s42.json").read_text())
    run = json.loads((work / "runs" / "tiny-s42" / "run.json").read_text())
    assert tfidf["train_rows"] == tiny["train_rows"] == run["rows"]["train"] == 48
    assert run["rows"]["validation"] == 40 and run["rows"]["test"] == 0  # a lever recipe never sees the test set
    assert tfidf["test"]["n"] == 40 and tiny["test"] is None
    assert len(tiny["val_pred"]) == len(tfidf["val_pred"]) == 40
    md = (tmp_path / "ACCURACY.md").read_text()
    assert "| tfidf |" in md and "| tiny |" in md
    # the recipe chosen on validation: the same run (not trained again), read once on the test set
    chosen = json.loads((work / "results" / "tiny-chosen-s42.json").read_text())
    assert chosen["run_dir"] == tiny["run_dir"] and chosen["validation"] == tiny["validation"]
    assert chosen["test"]["n"] == 40 and not (work / "runs" / "tiny-chosen-s42").exists()

    stamp = (work / "runs" / "tiny-s42" / "run.json").stat().st_mtime_ns
    log_size = (work / "bench.log").stat().st_size
    assert bench.main(args) == 0  # everything is reused: no training, no prediction
    assert (work / "runs" / "tiny-s42" / "run.json").stat().st_mtime_ns == stamp
    assert (work / "bench.log").stat().st_size == log_size


def test_an_unknown_recipe_is_refused(bench, tmp_path, capsys):
    assert bench.main(["--recipes", "nope", "--workdir", str(tmp_path / "w"), "--output", "-"]) == 2
    assert "unknown recipe" in capsys.readouterr().err


def _stored(work: Path, name: str, seed: int, accuracy: float, seconds: float = 1.0) -> None:
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / f"{name}-s{seed}.json").write_text(json.dumps({"recipe": name, "seed": seed,
                                                                       "validation": {"accuracy": accuracy},
                                                                       "train_seconds": seconds}))


def test_a_best_of_recipe_chooses_on_the_mean_validation_of_its_seeds(bench, tmp_path):
    spec = {"best_of": ["a", "b", "c"], "choose_seeds": 2}
    for name, accs in {"a": (0.75, 1.0), "b": (0.875, 0.875), "c": (0.8125, 0.875)}.items():  # exact in binary
        for seed, acc in zip((42, 43), accs):
            _stored(tmp_path, name, seed, acc)
    chosen, means = bench.choose(spec, tmp_path)
    assert chosen == "a" and means == {"a": 0.875, "b": 0.875, "c": 0.84375}  # a tie: the first listed
    assert bench.choose({"best_of": ["b", "a"], "choose_seeds": 2}, tmp_path)[0] == "b"
    assert bench.choose({"best_of": ["a", "c"]}, tmp_path)[0] == "c"  # one seed: 42 alone (a wins on the mean)
    (tmp_path / "results" / "c-s43.json").unlink()
    with pytest.raises(RuntimeError, match="c-s43.json not finished"):
        bench.choose(spec, tmp_path)


def test_a_time_limited_choice_only_takes_candidates_as_fast_as_the_limit(bench, tmp_path):
    for name, acc, seconds in (("slow", 0.9, 500.0), ("quick", 0.85, 290.0), ("quicker", 0.8, 200.0),
                               ("plain", 0.7, 300.0)):
        _stored(tmp_path, name, 42, acc, seconds)
    spec = {"best_of": ["slow", "quick", "quicker"], "within_time_of": "plain"}
    chosen, means = bench.choose(spec, tmp_path)
    assert chosen == "quick" and set(means) == {"slow", "quick", "quicker"}  # slow is more accurate but too slow
    assert bench.choose({"best_of": ["slow", "quick"]}, tmp_path)[0] == "slow"  # without the limit
    with pytest.raises(RuntimeError, match="no candidate of .'slow'. trained within plain's 300 s: slow 500 s"):
        bench.choose({"best_of": ["slow"], "within_time_of": "plain"}, tmp_path)


def _driver(args: list[str]) -> int:
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(REPO / "bench" / "gpu_accuracy.py"), *args], cwd=REPO).returncode


def test_the_parallel_sweep_skips_a_job_whose_teachers_are_not_in_it(files, tmp_path):
    pool, test, _ = files
    work, out = tmp_path / "work", tmp_path / "out"
    rc = _driver(["--workdir", str(work), "--out", str(out), "--sweep", "tiny-kd:42", "--rows", "48", "--val-rows",
                  "40", "--source", str(pool), "--test", str(test), "--deadline", "60"])
    assert rc == 1 and not (work / "runs").exists()  # nothing trained
    assert not (work / "logs" / "tiny-kd-s42.out").exists()  # the job was never started
    assert (out / "results.tgz").is_file()


@pytest.mark.slow  # four tiny trainings, two at a time, the last two waiting for the first two
def test_the_parallel_sweep_runs_teachers_and_choices_after_the_runs_they_need(files, tmp_path):
    import tarfile

    pool, test, _ = files
    work, out = tmp_path / "work", tmp_path / "out"
    rc = _driver(["--workdir", str(work), "--out", str(out), "--sweep", "tiny-kd:42,tiny-best:42,tiny:42,tiny-lr:42",
                  "--jobs", "2", "--rows", "48", "--val-rows", "40", "--source", str(pool), "--test", str(test),
                  "--deadline", "400"])
    assert rc == 0
    res = {n: json.loads((work / "results" / f"{n}-s42.json").read_text()) for n in ("tiny", "tiny-lr", "tiny-best")}
    best = res["tiny-best"]
    assert best["chosen"] == max(("tiny", "tiny-lr"), key=lambda n: (res[n]["validation"]["accuracy"], n == "tiny"))
    assert best["test"]["n"] == 40 and res["tiny"]["test"] is None  # the choice alone reads the test set
    distill = json.loads((work / "runs" / "tiny-kd-s42" / "distill.json").read_text())
    assert sorted(Path(t).name for t in distill["teachers"]) == ["tiny-lr-s42", "tiny-s42"]
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    assert "work/results/tiny-kd-s42.json" in names and not [n for n in names if "checkpoints" in n]
    assert (out / f"adapter-{best['chosen']}-s42.tgz").is_file()


def test_unlabelled_files_hold_the_left_out_training_texts_only(bench, files, tmp_path):
    pool, test, _ = files
    bench.prepare_data(tmp_path / "work", pool, test, rows=120, val_rows=40, test_rows=None)
    d = tmp_path / "work" / "data"
    train, val, unl, unl6k, tst = (pd.read_csv(d / f"{n}.csv") for n in
                                   ("train", "validation", "unlabelled", "unlabelled-6000", "test"))
    assert list(unl.columns) == ["text"] and list(unl6k.columns) == ["text"]  # no labels
    norm = {n: set(bench.normalise(df.text)) for n, df in (("train", train), ("val", val), ("test", tst))}
    assert not set(bench.normalise(unl.text)) & (norm["train"] | norm["val"] | norm["test"])
    assert len(train) == 120 and len(unl) > 200 and set(unl6k.text) <= set(unl.text)


@pytest.mark.slow  # full fine-tuning of a tiny model, then its best checkpoint read on the test set
def test_ceiling_trains_every_weight_and_reads_test_from_the_kept_checkpoint(bench, files, tmp_path):
    pool, test, _ = files
    work = tmp_path / "work"
    assert bench.main(["--recipes", "tiny-full,tiny-ceiling", "--source", str(pool), "--test", str(test),
                       "--val-rows", "40", "--workdir", str(work), "--reference", "tiny-full", "--output", "-"]) == 0
    full = json.loads((work / "results" / "tiny-full-s42.json").read_text())
    ceiling = json.loads((work / "results" / "tiny-ceiling-s42.json").read_text())
    assert full["trainable"] > 1_000_000 and full["test"] is None  # every weight; test unread while choosing
    assert (work / "runs" / "tiny-full-s42" / "best" / "model.safetensors").is_file()
    # its validation predictions are in the split's row order: the kept checkpoint's accuracy, as the Trainer saw it
    assert full["validation"]["accuracy"] == pytest.approx(full["best_metric"])
    assert ceiling["chosen"] == "tiny-full" and ceiling["test"]["n"] == len(pd.read_csv(test))
