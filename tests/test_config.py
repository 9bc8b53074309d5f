"""Recipe loading and validation: every bad value is refused with one line naming the key and the choices."""
import pytest
import yaml

from newslora.config import Recipe, apply_override, load_recipe
from newslora.errors import NewsloraError


def test_defaults_and_overrides_are_typed():
    r = load_recipe(None, ["lora.r=16", "train.lr=3e-4", "lora.target_modules=[query,key,value]", "data.test=null"])
    assert r.lora.r == 16 and isinstance(r.lora.r, int)
    assert r.train.lr == pytest.approx(3e-4)
    assert r.lora.target_modules == ["query", "key", "value"]
    assert r.data.test is None
    assert r.budget.max_params == 1_000_000


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: x\nlora: {r: 4, alpha: 8}\ntrain: {epochs: 2}\n")
    r = load_recipe(f, ["lora.alpha=32"])
    assert (r.name, r.lora.r, r.lora.alpha, r.train.epochs) == ("x", 4, 32.0, 2.0)
    # the resolved recipe round-trips through YAML
    dumped = r.to_yaml()
    assert yaml.safe_load(dumped)["lora"]["alpha"] == 32.0
    f2 = tmp_path / "resolved.yaml"
    f2.write_text(dumped)
    assert load_recipe(f2) == r


def test_every_shipped_config_validates():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs, "configs/ has no recipes"
    for c in configs:
        if "space" in c.name:
            continue
        assert isinstance(load_recipe(c), Recipe), c


@pytest.mark.parametrize("override, words", [
    ("lora.rr=3", ["lora.rr", "did you mean 'r'", "valid keys"]),
    ("nope=1", ["unknown recipe key 'nope'"]),
    ("method=lorax", ["method", "choose one of", "adalora"]),
    ("lora.r=abc", ["lora.r", "integer"]),
    ("lora.r=2.5", ["lora.r", "integer"]),
    ("lora.r=0", ["lora.r=0", "> 0"]),
    ("lora.dropout=1.5", ["lora.dropout", "[0, 1)"]),
    ("train.precision=fp8", ["train.precision", "bf16"]),
    ("train.lr=-1", ["train.lr"]),
    ("train.label_smoothing=1", ["train.label_smoothing", "[0, 1)"]),
    ("data.validation_size=0", ["data.validation_size"]),
    ("adalora.target_r=20", ["adalora.target_r", "init_r"]),
    ("model.random_init=maybe", ["model.random_init", "true or false"]),
    ("lora=3", ["lora must be a mapping"]),
    ("train.epochs=0", ["train.epochs", "max_steps"]),
    ("name=a/b", ["name"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(NewsloraError) as e:
        load_recipe(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(NewsloraError, match="key=value"):
        apply_override({}, "lora.r")
    with pytest.raises(NewsloraError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [1, 2\n")
    with pytest.raises(NewsloraError, match="not valid YAML"):
        load_recipe(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(NewsloraError, match="mapping"):
        load_recipe(lst)
