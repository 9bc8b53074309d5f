"""notebooks/colab.ipynb, the notebook for a GPU host, runs top to bottom in its tiny mode against a local hub
cache (tests/hubcache.py): hub roberta-base + ag_news, the seed's precision (fp32 override on a CPU), plots, the
budget table, a submission from a pickled Dataset, classify()."""
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

import hubcache

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "notebooks" / "colab.ipynb"


def test_colab_notebook_has_no_committed_outputs_and_matches_its_script():
    nb = nbformat.read(NB, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    script = (REPO / "notebooks" / "make_colab.py").read_text()
    assert all(line in script for c in nb.cells for line in c.source.splitlines()[:1] if len(line) > 20)


@pytest.mark.slow  # runs the whole notebook (a tiny training included)
def test_colab_notebook_runs_in_tiny_mode_against_the_hub_cache(hub_cache, tmp_path, monkeypatch):
    for k, v in {**hubcache.env(hub_cache), "NEWSLORA_NB_TINY": "1", "NEWSLORA_NB_RUNS": str(tmp_path / "runs"),
                 "PYTHONPATH": str(REPO / "src")}.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NB.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "train.precision=fp32" in text or "GPU:" in text  # the precision cell says what it runs in
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # loss per epoch, loss and accuracy per step, confusion matrix
    tables = "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "seed-004-lora-r6-qkv.yaml" in tables and "seed-003-student.yaml" in tables  # the budget table
    run = tmp_path / "runs" / "seed-002-lora-r10"
    assert (run / "plots" / "loss_epochs.png").is_file()
    sub = pd.read_csv(tmp_path / "runs" / "submission.csv")
    assert list(sub.columns) == ["ID", "Label"] and len(sub) == 100  # the cache's 100 AG News test texts
    assert "Sports" in text or "World" in text or "Business" in text or "Sci/Tech" in text  # classify()
