"""The one model-folder reader: every kind of folder described alike, and a plain PEFT adapter folder (a pickled
.bin, no tokenizer, no newslora files) loaded with the same predictions as the run folder holding its weights."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from newslora.cli import app
from newslora.errors import NewsloraError
from newslora.modelfolder import DEFAULT_MAX_LENGTH, describe, read_meta, write_meta
from newslora.predict import load_classifier

from conftest import TEST_CSV

runner = CliRunner()
TEXTS = ["Stocks rally as oil prices fall", "United win the derby in extra time", "NASA launches a new probe",
         "Talks resume in Geneva", "Chipmaker unveils a faster laptop processor"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def plain_adapter(run_dir, folder, named: bool):
    """The run's adapter weights saved the way plain PEFT saves them: ``get_peft_model`` over a base model folder,
    ``save_pretrained(..., safe_serialization=False)`` (adapter_model.bin), no tokenizer, no newslora files. The
    base (weights and tokenizer, like a hub model) keeps the run's class names (``named``) or transformers'
    LABEL_i placeholders."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    base_dir = folder / "base"
    config = AutoConfig.from_pretrained(run_dir / "backbone")
    if not named:
        config.id2label = {i: f"LABEL_{i}" for i in range(config.num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    base = AutoModelForSequenceClassification.from_pretrained(run_dir / "backbone", config=config)
    base.save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(run_dir / "adapter").save_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig.from_pretrained(run_dir / "adapter"))
    set_peft_model_state_dict(peft_model, load_file(run_dir / "adapter" / "adapter_model.safetensors"))
    adapter = folder / "adapter"
    peft_model.save_pretrained(adapter, safe_serialization=False)
    (adapter / "README.md").unlink(missing_ok=True)
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    return adapter


def test_plain_peft_adapter_predicts_like_its_run(tiny_run, tmp_path):
    run_dir = tiny_run.run_dir
    names = json.loads((run_dir / "run.json").read_text())["label_names"]
    adapter = plain_adapter(run_dir, tmp_path, named=False)

    with pytest.raises(NewsloraError, match="--label-names"):  # LABEL_i placeholders: no guessing
        describe(adapter)
    with pytest.raises(NewsloraError, match=f"predicts {len(names)}"):  # a wrong count against the saved head
        describe(adapter, label_names=names[:-1])
    folder = describe(adapter, label_names=names)
    assert (folder.kind, folder.label_names, folder.max_length, folder.truncation, folder.text_columns) == \
        ("adapter", names, DEFAULT_MAX_LENGTH, "head", None)

    ref = load_classifier(run_dir, device="cpu")
    got = load_classifier(adapter, device="cpu", label_names=names)
    p_ref, p_got = ref.predict_proba(TEXTS), got.predict_proba(TEXTS)
    assert ref.label_names == got.label_names
    np.testing.assert_array_equal(p_ref.argmax(-1), p_got.argmax(-1))
    np.testing.assert_allclose(p_ref, p_got, atol=1e-5)

    # the command line: refused without --label-names (one error line, nothing written), then the same file
    data, out, ref_out = tmp_path / "in.csv", tmp_path / "adapter.csv", tmp_path / "run.csv"
    pd.read_csv(TEST_CSV, header=None).head(40).to_csv(data, header=False, index=False)
    r = cli("predict", adapter, "-i", data, "-o", out)
    assert r.exit_code == 2 and "error:" in r.output and "--label-names" in r.output and not out.exists()
    assert cli("predict", run_dir, "-i", data, "-o", ref_out, "--extra-columns").exit_code == 0
    r = cli("predict", adapter, "-i", data, "-o", out, "--extra-columns", "--label-names", ",".join(names))
    assert r.exit_code == 0, r.output
    a, b = ref_out.read_text().splitlines(), out.read_text().splitlines()
    assert len(a) == len(b) == 41 and [x.split(",")[:3] for x in a] == [x.split(",")[:3] for x in b]

    # a run folder names its own classes: --label-names is refused there
    r = cli("classify", run_dir, "a headline", "--label-names", ",".join(names))
    assert r.exit_code == 2 and "drop --label-names" in r.output


def test_adapter_names_come_from_a_named_base_and_export_merges_it(tiny_run, tmp_path):
    run_dir = tiny_run.run_dir
    names = json.loads((run_dir / "run.json").read_text())["label_names"]
    adapter = plain_adapter(run_dir, tmp_path, named=True)
    assert describe(adapter).label_names == names
    r = cli("export", adapter)
    assert r.exit_code == 0, r.output
    merged = describe(adapter / "merged")
    assert (merged.kind, merged.label_names, merged.backbone) == ("merged", names, str(tmp_path / "base"))
    np.testing.assert_allclose(load_classifier(adapter / "merged", device="cpu").predict_proba(TEXTS),
                               load_classifier(run_dir, device="cpu").predict_proba(TEXTS), atol=1e-4)


def test_adapter_bin_is_read_as_tensors_only(tiny_run, tmp_path):
    """A .bin that would run code when unpickled is refused by torch.load(weights_only=True): nothing runs."""
    adapter = plain_adapter(tiny_run.run_dir, tmp_path, named=True)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(NewsloraError, match="as tensors"):
        load_classifier(adapter, device="cpu")
    assert not marker.exists()


def test_one_writer_one_reader(tiny_model_dir, tmp_path):
    """What write_meta writes describe reads back; a folder from before text_columns/truncation reads defaults."""
    old = describe(tiny_model_dir)
    assert (old.kind, old.max_length, old.text_columns, old.truncation) == ("merged", 48, None, "head")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    old.max_length, old.text_columns, old.truncation, old.backbone = 64, ["title", "body"], "head_tail", "x/y"
    write_meta(folder, old, merge_max_logit_diff=0.0)
    new = describe(folder)
    assert (new.max_length, new.text_columns, new.truncation, new.backbone) == (64, ["title", "body"],
                                                                               "head_tail", "x/y")
    assert new.meta == {"merge_max_logit_diff": 0.0} and read_meta(folder)["max_length"] == 64


def test_describe_refuses_what_is_no_model(tmp_path):
    with pytest.raises(NewsloraError, match="model not found"):
        describe(tmp_path / "missing")
    with pytest.raises(NewsloraError, match="PEFT adapter folder"):
        describe(tmp_path)
    with pytest.raises(NewsloraError, match="unknown runtime"):
        describe(tmp_path, runtime="tensorflow")
