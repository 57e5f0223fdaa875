"""Every categorical config key refuses a value outside its set at load time, with one line that
names the key and the allowed values; the command line exits 2 before anything loads."""
import dataclasses
import typing

import pytest

from reasonrag_jax.cli import main
from reasonrag_jax.config import Config, load_config
from reasonrag_jax.io import InputError


def literal_keys(cls=Config, prefix=""):
    """(dotted key, allowed values) of every `Literal[...]` field, found from the types alone,
    so a categorical key added later is covered without touching this file."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from literal_keys(typ, f"{prefix}{f.name}.")
        elif typing.get_origin(typ) is typing.Literal:
            yield f"{prefix}{f.name}", typing.get_args(typ)


KEYS = dict(literal_keys())


def test_the_issues_categorical_keys_are_choices():
    assert {"train.objective", "train.schedule", "retrieval.backend", "retrieval.pooling",
            "retrieval.embed_dtype", "agent.mode", "model.dtype", "model.param_dtype"} <= set(KEYS)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_every_allowed_value_loads_and_any_other_is_one_clear_error(key):
    section, name = key.rsplit(".", 1)
    for value in KEYS[key]:
        assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), name) == value
    with pytest.raises(InputError) as err:
        load_config(None, [f"{key}=nonsense"])
    message = str(err.value)
    assert f"key '{key}': 'nonsense' is not one of {', '.join(KEYS[key])}" in message
    assert "\n" not in message


def test_cli_refuses_a_bad_choice_before_doing_anything(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--set", "train.objective=stf"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    assert captured.err.count("\n") == 1
    assert "train.objective': 'stf' is not one of dpo, sft" in captured.err
