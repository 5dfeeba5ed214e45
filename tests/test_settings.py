"""The one settings plumbing: `key=value` overrides on a tree of configs, checks and help that
come from the field metadata."""

import dataclasses

import pytest

from memlong_jax.cli import score
from memlong_jax.memlong.blockmem import BlockConfig
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.presets import PRESETS
from memlong_jax.settings import ConfigError, apply_overrides, check, describe, setting
from memlong_jax.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Toy:
    size: int = setting(4, help="how big", least=1)
    colour: str = setting("red", help="which colour", choices=("red", "blue"))
    scale: float = setting(1.5, help="a factor")
    loud: bool = setting(False, help="shout")
    layers: tuple = setting((1, 2), help="which layers")


def test_overrides_parse_by_type_on_every_part_of_a_tree():
    parts = {"": Toy(), "other": Toy(size=9)}
    out = apply_overrides(parts, ["size=7", "other.colour=blue", "other.loud=yes",
                                  "scale=0.25", "other.layers=3,5"])
    assert out[""] == Toy(size=7, scale=0.25)
    assert out["other"] == Toy(size=9, colour="blue", loud=True, layers=(3, 5))
    assert apply_overrides(Toy(), ["size=2"]) == Toy(size=2)
    assert apply_overrides(Toy(), []) == Toy()


@pytest.mark.parametrize("items, words", [
    (["other.sise=1"], "unknown setting 'other.sise' \\(did you mean other.size\\?\\)"),
    (["colour=green"], "colour must be one of red, blue, got 'green'"),
    (["other.colour=green"], "other.colour must be one of"),
    (["size=big"], "size needs an integer"),
    (["scale=x"], "scale needs a number"),
    (["loud=perhaps"], "loud needs true or false"),
    (["size=1", "size=2"], "setting 'size' given twice"),
    (["size"], "bad setting 'size': expected key=value"),
])
def test_bad_overrides_are_one_line_config_errors(items, words):
    with pytest.raises(ConfigError, match=words) as err:
        apply_overrides({"": Toy(), "other": Toy()}, items)
    assert "\n" not in str(err.value)


def test_check_reads_allowed_and_least_values_from_the_metadata():
    check(Toy())
    with pytest.raises(ConfigError, match="x.size must be an integer >= 1, got 0"):
        check(Toy(size=0), "x.")
    with pytest.raises(ConfigError, match="colour must be one of red, blue"):
        check(Toy(colour="green"))


def test_describe_shows_values_per_column_help_and_choices():
    lines = describe([Toy(), Toy(size=8)], "toy.")
    assert lines[:2] == ["  toy.size = 4 | 8", "      how big"]
    assert lines[2:4] == ["  toy.colour = 'red'", "      which colour (one of: red, blue)"]
    assert describe(Toy)[0] == "  size"


@pytest.mark.parametrize("cls", [MemLongConfig, BlockConfig, TrainConfig])
def test_every_setting_a_command_takes_has_help(cls):
    assert [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")] == []


def test_score_help_lists_every_memlong_and_block_setting():
    text = " ".join(score.build_parser().format_help().split())
    for cls in (MemLongConfig, BlockConfig):
        for field in dataclasses.fields(cls):
            assert " ".join(field.metadata["help"].split()[:6]) in text, field.name


def test_every_preset_is_valid():
    for name, preset in PRESETS.items():
        preset.memlong.validate(preset.model)
        check(preset.train)
