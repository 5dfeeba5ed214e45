"""MemLong settings: overrides, persistence in checkpoints, defaults for unknown shapes."""

import dataclasses
import json

import pytest

from memlong_jax.io import checkpoint
from memlong_jax.memlong.config import MemLongConfig
from memlong_jax.presets import PRESETS, default_for, load_for_checkpoint
from memlong_jax.settings import ConfigError, apply_overrides

BASE = PRESETS["smollm2-135m"].memlong


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(BASE, ["retrieval_layers=16,20", "top_k=4", "eviction=fifo_half"])
    assert cfg.retrieval_layers == (16, 20) and cfg.top_k == 4 and cfg.eviction == "fifo_half"
    assert cfg.memory_layer == BASE.memory_layer


@pytest.mark.parametrize("assignments, words", [
    (["nonsense=1"], "unknown setting 'nonsense'"),
    (["top_kk=1"], "did you mean top_k"),
    (["top_k"], "bad setting 'top_k': expected key=value"),
    (["top_k=2", "top_k=3"], "given twice"),
    (["top_k=many"], "an integer"),
    (["retrieval_layers=1,x"], "integer list"),
    (["continuation=maybe"], "true or false"),
    (["eviction=lru"], "eviction must be one of paper, fifo_half"),
])
def test_bad_overrides(assignments, words):
    with pytest.raises(ConfigError, match=words):
        apply_overrides(BASE, assignments)


def test_dict_round_trip_and_unknown_keys():
    assert MemLongConfig.from_dict(BASE.to_dict()) == BASE
    with pytest.raises(ConfigError, match="unknown MemLong setting"):
        MemLongConfig.from_dict({**BASE.to_dict(), "gate": True})


def test_default_is_the_preset_for_known_shapes_and_scaled_otherwise():
    assert default_for(PRESETS["openllama3b"].model) == PRESETS["openllama3b"].memlong
    deeper = dataclasses.replace(PRESETS["tiny"].model, num_hidden_layers=10)
    cfg = default_for(deeper).validate(deeper)
    assert cfg.memory_layer == 5 and cfg.retrieval_layers == (5, 9)


def test_checkpoint_carries_its_memlong_settings(tmp_path):
    model = PRESETS["tiny"].model
    checkpoint.write_config(str(tmp_path), model)
    assert load_for_checkpoint(str(tmp_path), model) == PRESETS["tiny"].memlong
    trained = PRESETS["tiny"].memlong.replace(top_k=3, query_mode="segment")
    checkpoint.write_config(str(tmp_path), model, memlong=trained.to_dict())
    assert json.loads((tmp_path / "config.json").read_text())["memlong_jax"]["memlong"]
    assert load_for_checkpoint(str(tmp_path), model) == trained
