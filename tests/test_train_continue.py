"""Continuing a finished run under other settings: `init_adapter` starts from its trained
parameters, `data_start` from the data after it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from helpers import toy_corpus
from memlong_jax.errors import UserError
from memlong_jax.llama.config import ConfigError
from train import adapter
from train import config as cfgmod
from train import data as datamod
from train.export import export_run
from train.recall_mix import RecallMix
from train.run import Trainer

SEQ, ACCUM, ROWS = 64, 2, 2


def _streams(start, mix=True):
    rng = np.random.default_rng()
    tokens = rng.integers(97, 123, size=SEQ * 40).astype(np.uint16)
    blocks = datamod.Blocks(tokens, SEQ, 0.0)
    recall = RecallMix(datamod.ByteTokenizer(), SEQ, 0.5, 3, 11) if mix else None
    return (datamod.Streams(blocks, ROWS, ACCUM, recall, start),
            datamod.Streams(blocks, ROWS, ACCUM, recall))


@pytest.mark.parametrize("mix", [False, True])
def test_data_start_reads_what_the_longer_run_would_have_read(mix):
    start = int(np.random.default_rng().integers(1, 9))
    shifted, plain = _streams(start, mix)
    for step in range(4):
        batch = shifted.batch(step)
        context, has = shifted.context(step, 8)
        assert has.all()        # even the first micro-step follows a block
        for i in range(ACCUM):
            micro = step * ACCUM + i + start
            for r in range(ROWS):
                np.testing.assert_array_equal(batch[i, r], plain.tokens(micro, r))
                np.testing.assert_array_equal(context[i, r], plain.tokens(micro - 1, r)[-8:])
    assert shifted.cursor(1)["micro_step"] == ACCUM + start


def _resolve(tmp_path, name, *sets):
    run = cfgmod.resolve("tiny", [f"output_dir={tmp_path / name}",
                                  f"cache_dir={tmp_path / 'cache'}", "progress=false",
                                  "tensorboard=false", *sets])
    model = cfgmod.model_config(run)
    return cfgmod.validate(run, model), model


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("continue")
    data = toy_corpus(tmp_path / "toy.txt", seed=3)
    run, model = _resolve(tmp_path, "first", f"data={data}", "steps=3", "lr=1e-2",
                          "eval_batches=0")
    trainer = Trainer(run, model)
    trainer.train()
    trainer.release()
    export_run(str(tmp_path / "first"), str(tmp_path / "adapter"), adapter_only=True)
    return tmp_path, data, trainer


def test_init_adapter_starts_from_the_trained_parameters(first_run):
    tmp_path, data, first = first_run
    run, model = _resolve(tmp_path, "second", f"data={data}", "steps=2", "lr=1e-3",
                          f"init_adapter={tmp_path / 'adapter'}", "data_start=6",
                          "eval_batches=0")
    second = Trainer(run, model)
    try:
        trained = traverse_util.flatten_dict(jax.device_get(first.state["trainable"]))
        start = traverse_util.flatten_dict(jax.device_get(second.state["trainable"]))
        assert trained.keys() == start.keys()
        for path, value in trained.items():
            np.testing.assert_array_equal(np.asarray(start[path]), np.asarray(value))
        assert int(second.state["step"]) == 0            # a fresh schedule and optimizer
        np.testing.assert_array_equal(second.streams.batch(0), first.streams.batch(3))
    finally:
        second.release()


def test_init_adapter_of_other_lora_settings_or_no_adapter_is_refused(first_run):
    tmp_path, data, _ = first_run
    run, model = _resolve(tmp_path, "third", f"data={data}", "lora_alpha=3.0",
                          f"init_adapter={tmp_path / 'adapter'}")
    with pytest.raises(UserError, match="lora_alpha"):
        Trainer(run, model)
    with pytest.raises(ConfigError, match="not an adapter"):
        _resolve(tmp_path, "fourth", f"data={data}", f"init_adapter={tmp_path}")
    stored, step, tree = adapter.read(str(tmp_path / "adapter"))
    flat = traverse_util.flatten_dict(tree)
    path = next(iter(flat))
    flat[path] = flat[path][..., :-1]       # a tree of other shapes
    adapter.write(str(tmp_path / "cut"), stored, step, traverse_util.unflatten_dict(flat))
    run, model = _resolve(tmp_path, "fifth", f"data={data}", f"init_adapter={tmp_path / 'cut'}")
    with pytest.raises(UserError, match="do not match"):
        Trainer(run, model)
    stored["model"] = {**stored["model"], "hidden_size": 1}
    adapter.write(str(tmp_path / "other_model"), stored, step, tree)
    run, model = _resolve(tmp_path, "sixth", f"data={data}",
                          f"init_adapter={tmp_path / 'other_model'}")
    with pytest.raises(UserError, match="model"):
        Trainer(run, model)
    assert json.load(open(tmp_path / "adapter" / adapter.ADAPTER_CONFIG))["step"] == 3
