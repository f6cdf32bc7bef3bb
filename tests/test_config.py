"""Typed configs: YAML recipes, dotted overrides, and errors that name the key and where it came from."""

import textwrap

import pytest

import roformer
from roformer.config import (
    MLMDataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_config,
    parse_overrides,
    save_config,
)
from roformer.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

RECIPE = """\
task: mlm
output_dir: runs/tiny
model:
  hidden_size: 64
  num_heads: 4
  position: sinusoidal
  rope_base: 500
data:
  max_seq_length: 64
  train_files: corpus.txt
train:
  max_steps: 20
  learning_rate: 0.001
"""


@pytest.fixture
def recipe(tmp_path):
    def write(text: str = RECIPE):
        path = tmp_path / "recipe.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


def test_recipe_loads_into_typed_dataclasses(recipe):
    cfg = load_config(recipe())
    assert isinstance(cfg, RunConfig)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.data, MLMDataConfig)
    assert isinstance(cfg.train, TrainConfig)
    assert cfg.model.position == "sinusoidal" and cfg.model.hidden_size == 64
    assert cfg.model.num_layers == ModelConfig().num_layers  # unset keys keep their defaults
    assert cfg.train.max_steps == 20


def test_ints_are_accepted_for_floats(recipe):
    cfg = load_config(recipe())
    assert cfg.model.rope_base == 500.0 and isinstance(cfg.model.rope_base, float)
    cfg = load_config(recipe(), ["train.learning_rate=1"])
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)


def test_a_single_string_is_a_list_of_one(recipe):
    assert load_config(recipe()).data.train_files == ["corpus.txt"]
    cfg = load_config(recipe(), ["data.train_files=other.txt"])
    assert cfg.data.train_files == ["other.txt"]
    cfg = load_config(recipe(), ["data.train_files=[a.txt, b.txt]"])
    assert cfg.data.train_files == ["a.txt", "b.txt"]


def test_overrides_are_typed_and_merge_with_the_file(recipe):
    cfg = load_config(recipe(), ["model.position=rotary", "train.max_steps=200", "output_dir=runs/x"])
    assert cfg.model.position == "rotary"
    assert cfg.train.max_steps == 200 and isinstance(cfg.train.max_steps, int)
    assert cfg.output_dir == "runs/x"
    assert cfg.model.hidden_size == 64 and cfg.train.learning_rate == 0.001  # the file's other values stay
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=null"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": None}


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert load_config(None, ["train.seed=7"]).train.seed == 7


@pytest.mark.parametrize(
    ("line", "key", "hint"),
    [
        ("  hidden_sise: 64", "model.hidden_sise", "hidden_size"),  # unknown key: the allowed names are listed
        ("  num_layers: six", "model.num_layers", "int"),  # wrong type
        ("  num_layers: 2.5", "model.num_layers", "int"),
        ("  tie_word_embeddings: 1", "model.tie_word_embeddings", "bool"),
        ("  position: xpos", "model.position", "'rotary'"),  # bad choice: the choices are listed
        ("  rotary_pairing: adjacent", "model.rotary_pairing", "'interleaved'"),
    ],
)
def test_errors_in_the_file_name_the_key_and_the_file(recipe, line, key, hint):
    path = recipe(RECIPE.replace("  position: sinusoidal", line))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert key in message and str(path) in message and hint in message
    assert "\n" not in message  # one line on stderr


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("model.positon=rotary", "model.positon", "position"),
        ("train.max_steps=lots", "train.max_steps", "int"),
        ("model.position=xpos", "model.position", "'learned'"),
        ("data.mlm_probability=high", "data.mlm_probability", "float"),
        ("nonsense=1", "nonsense", "output_dir"),
    ],
)
def test_errors_on_the_command_line_say_so(recipe, override, key, hint):
    with pytest.raises(ConfigError) as info:
        load_config(recipe(), [override])
    message = str(info.value)
    assert key in message and "command line" in message and hint in message


def test_malformed_override_and_value_checks(recipe):
    with pytest.raises(ConfigError, match="command line.*dotted.key=value"):
        load_config(recipe(), ["model.position"])
    with pytest.raises(ConfigError, match="num_heads"):  # __post_init__ checks, with the file named
        load_config(recipe(), ["model.num_heads=5"])
    with pytest.raises(ConfigError, match="recipe.yaml.*task"):
        load_config(recipe("task: pretraining\n"))


def test_missing_and_malformed_files(tmp_path, recipe):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"line 2"):
        load_config(recipe("model:\n  hidden_size: 64: 3\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(recipe("- a\n- b\n"))
    with pytest.raises(ConfigError, match="model must be a mapping"):
        load_config(recipe("model: 3\n"))


def test_config_errors_are_user_errors():
    assert issubclass(ConfigError, roformer.UserError)


@pytest.mark.parametrize("overrides", [[], ["task=glue", "data.max_seq_length=32"], ["task=translation"]])
def test_yaml_round_trip(tmp_path, recipe, overrides):
    base = recipe() if not overrides else None
    cfg = load_config(base, overrides)
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert type(again.data) is type(cfg.data)
    assert again.to_yaml() == cfg.to_yaml()


def test_exponent_without_a_dot_is_a_float(recipe):
    """PyYAML (YAML 1.1) reads 5e-4 as a string; a float field must still take it, from the file or the command line."""
    assert load_config(None, ["train.learning_rate=5e-4"]).train.learning_rate == 5e-4
    cfg = load_config(recipe(RECIPE.replace("learning_rate: 0.001", "learning_rate: 3e-5")))
    assert cfg.train.learning_rate == 3e-5 and isinstance(cfg.train.learning_rate, float)
    with pytest.raises(ConfigError, match="train.max_steps"):  # ints stay strict
        load_config(None, ["train.max_steps=1e3"])


def test_sinusoidal_scales_its_token_embeddings_unless_told_otherwise():
    """The unit-amplitude sinusoidal table drowns std-0.02 word embeddings; Vaswani's sqrt(d) scaling is its default."""
    assert load_config(None, ["model.position=sinusoidal"]).model.scale_embeddings is True
    assert load_config(None, ["model.position=rotary"]).model.scale_embeddings is False
    assert load_config(None, ["model.position=learned"]).model.scale_embeddings is False
    explicit = load_config(None, ["model.position=sinusoidal", "model.scale_embeddings=false"])
    assert explicit.model.scale_embeddings is False
