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
    ("lora.alpha=nan", ["lora.alpha=nan", "finite"]),
    ("train.lr=.inf", ["train.lr=inf", "finite"]),
    ("train.weight_decay=nan", ["train.weight_decay=nan", "finite"]),
    ("train.warmup=nan", ["train.warmup=nan", "finite"]),
    ("data.validation_size=nan", ["data.validation_size=nan", "finite"]),
    ("train.epochs=.inf", ["train.epochs=inf", "finite"]),
    ("train.max_steps=.nan", ["train.max_steps", "integer"]),
    ("model.config_overrides={layer_norm_eps: .nan}", ["model.config_overrides.layer_norm_eps=nan", "finite"]),
    ("train.seed=-1", ["train.seed=-1", "[0, 4294967295]"]),
    ("data.seed=-3", ["data.seed=-3"]),
    ("train.max_steps=20000000", ["train.max_steps", "<= 10000000"]),
    ("train.scheduler=foo", ["train.scheduler='foo'", "choose one of: linear, cosine"]),
    ("train.report_to=[wandb]", ["train.report_to[0]", "tensorboard, mlflow"]),
    ("model.truncation=middle", ["model.truncation", "head, tail, head_tail"]),
    ("train.class_weights=inverse", ["train.class_weights", "none, balanced"]),
    ("data.label_names=[no,yes]", ["data.label_names[0]", "quote it"]),
    ("lora.target_modules=[]", ["lora.target_modules is empty", "['query', 'value']"]),
    ("loraplus.ratio=0", ["loraplus.ratio=0", "> 0"]),
    ("vera.rr=1", ["vera.rr", "did you mean 'r'"]),
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


def test_new_keys_are_declared_with_their_defaults():
    r = load_recipe(None, ["data.text_columns=[title,description]", "train.report_to=tensorboard",
                           "train.tracking_uri=mlruns", "distill.unlabelled=u.csv", "distill.teachers=[t]", "data.drop_overlap=true",
                           "model.truncation=head_tail"])
    assert r.data.text_columns == ["title", "description"] and r.train.report_to == ["tensorboard"]
    assert (r.train.tracking_uri, r.distill.unlabelled, r.data.drop_overlap) == ("mlruns", "u.csv", True)
    assert r.model.truncation == "head_tail"
    assert load_recipe(None, ["train.class_weights=balanced"]).train.class_weights == "balanced"
    d = Recipe()
    assert (d.data.text_columns, d.model.truncation, d.train.class_weights, d.train.report_to, d.train.tracking_uri,
            d.data.drop_overlap, d.distill.unlabelled) == (None, "head", "none", [], None, False, None)
    with pytest.raises(NewsloraError, match="name one or more distinct columns"):
        load_recipe(None, ["data.text_columns=[title, title]"])


def test_old_keys_still_work_with_one_deprecation_line(tmp_path, capsys):
    r = load_recipe(None, ["method=loraplus", "lora.loraplus_lr_ratio=4"])
    assert r.loraplus.ratio == 4.0 and "loraplus_lr_ratio" not in r.to_dict()["lora"]
    f = tmp_path / "ada.yaml"
    f.write_text("method: adalora\nlora: {alpha: 24}\nadalora: {init_r: 6, target_r: 2}\n")
    assert load_recipe(f).adalora.alpha == 24.0
    lines = capsys.readouterr().err.strip().splitlines()
    still = " (the old key still works for now)"
    assert lines == ["deprecated: lora.loraplus_lr_ratio -> use loraplus.ratio" + still,
                     "deprecated: lora.alpha with method=adalora -> use adalora.alpha" + still]
    # the resolved recipe uses the new keys only: reading it back says nothing
    assert load_recipe(None, ["method=adalora", "adalora.alpha=8"]).adalora.alpha == 8.0
    again = tmp_path / "resolved.yaml"
    again.write_text(r.to_yaml())
    assert load_recipe(again) == r and capsys.readouterr().err == ""


def test_kinds_are_not_converted_silently():
    r = load_recipe(None, ["train.lr=3e-4", "budget.max_params=2.0e+6", "name=2024", "lora.target_modules=query"])
    assert (r.train.lr, r.budget.max_params, r.name, r.lora.target_modules) == (3e-4, 2_000_000, "2024", ["query"])
    assert isinstance(r.budget.max_params, int)
    for bad, words in [("lora.r=true", "integer"), ("train.lr=true", "number"),
                       ("model.random_init=1", "true or false"),
                       ("lora.r='8'", "integer"), ("name=yes", "quote it"), ("model.config_overrides=[1]", "mapping")]:
        with pytest.raises(NewsloraError, match=words):
            load_recipe(None, [bad])


@pytest.mark.parametrize("text, words", [
    ("lora:\n  r: 4\n  r: 8\n", ["duplicate key 'r'", "line 3", "first at line 2"]),
    ("train: {lr: 1.0e-3}\ntrain: {epochs: 1}\n", ["duplicate key 'train'", "line 2"]),
    ("lora:\n\tr: 4\n", ["not valid YAML", "line 2", "tabs"]),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nmodel: {config_overrides: {x: [*e, *e, *e, *e]}}\n",
     ["aliases", "100,000"]),
])
def test_yaml_problems_are_one_line_with_the_line(tmp_path, text, words):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(NewsloraError) as e:
        load_recipe(f)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_a_few_aliases_are_fine_and_non_utf8_is_refused(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("lora: {target_modules: &mods [query, value]}\ndistill: {teachers: *mods}\n")
    assert load_recipe(f).distill.teachers == ["query", "value"]
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(NewsloraError, match="not UTF-8"):
        load_recipe(f)


def test_the_json_schema_checks_the_shipped_recipes():
    """`newslora schema` describes every key: the shipped recipes validate against it and a wrong value does not."""
    from pathlib import Path

    from typer.testing import CliRunner

    from newslora.cli import app

    r = CliRunner().invoke(app, ["schema"])
    assert r.exit_code == 0, r.output
    import json

    schema = json.loads(r.output)
    props = schema["properties"]
    assert set(Recipe.model_fields) == set(props) and "lorax" not in props["method"]["enum"]
    assert "adalora" in props["method"]["enum"]
    train = schema["$defs"]["TrainConfig"]["properties"]
    assert train["scheduler"]["enum"][:2] == ["linear", "cosine"] and train["lr"]["exclusiveMinimum"] == 0
    assert train["lr"]["description"] and schema["$defs"]["TrainConfig"]["additionalProperties"] is False
    jsonschema = pytest.importorskip("jsonschema")
    configs = [c for c in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")) if "space" not in c.name]
    assert configs
    for c in configs:
        jsonschema.validate(yaml.safe_load(c.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"train": {"scheduler": "foo"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"lora": {"rr": 1}}, schema)


def test_yaml_merge_keys_are_not_duplicates():
    from newslora.yamlfile import parse_yaml

    assert parse_yaml("base: &base {r: 4, alpha: 8}\nlora:\n  <<: *base\n  r: 8\n")["lora"] == {"r": 8, "alpha": 8}
    with pytest.raises(NewsloraError, match="aliases"):
        parse_yaml("a: &a [*a, *a]\n")  # contains itself: expands without end
