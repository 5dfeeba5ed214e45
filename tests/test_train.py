"""train/: config overrides, data streams, LoRA, the tiny end-to-end run, export, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helpers import tensorboard_scalars, toy_corpus
import memlong_jax as ml
from memlong_jax import interrupts
from memlong_jax.errors import UserError, run_cli
from memlong_jax.llama.config import ConfigError
from memlong_jax.llama.model import LlamaForCausalLM
from memlong_jax.memlong.retrievers import Retriever, make_retriever
from memlong_jax.presets import PRESETS
from train import config as cfgmod
from train import data as datamod
from train import lora, metrics, step as stepmod
from train.export import main as export_main
from train.export import export_run
from train.run import Trainer, check_compatible, dry_run_report, main as run_main
from train.setup import load_base, split_params


def resolve(tmp_path, *sets, name="tiny"):
    run = cfgmod.resolve(name, [f"output_dir={tmp_path / 'out'}",
                                f"cache_dir={tmp_path / 'cache'}", "progress=false", *sets])
    model = cfgmod.model_config(run)
    return cfgmod.validate(run, model), model


# ---- config ------------------------------------------------------------------------------------

def test_overrides_parse_and_reject():
    run = cfgmod.resolve("tiny", ["lr=0.5", "train_norms=false", "memlong.top_k=3",
                                  "memlong.retrieval_layers=1,2", "steps=7"])
    assert run.train.lr == 0.5 and run.train.train_norms is False and run.train.steps == 7
    assert run.memlong.top_k == 3 and run.memlong.retrieval_layers == (1, 2)
    for bad, word in [(["nope=1"], "unknown setting"), (["steps=1", "steps=2"], "twice"),
                      (["memlong.top_k=1", "memlong.top_k=2"], "twice"), (["steps"], "key=value"),
                      (["steps=x"], "integer"), (["memlong.nope=1"], "nope"),
                      (["progress=maybe"], "true or false")]:
        with pytest.raises(ConfigError, match=word):
            cfgmod.resolve("tiny", bad)
    model = PRESETS["tiny"].model
    with pytest.raises(ConfigError, match="multiple of memlong.chunk_size"):
        cfgmod.validate(cfgmod.resolve("tiny", ["seq_len=30"]), model)


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        run_main(["--config", "tiny", "--help"])
    out = capsys.readouterr().out
    for key in cfgmod.TrainConfig.__dataclass_fields__:
        assert f"  {key} = " in out
    assert "memlong.top_k = " in out


def test_schedule_warmup_then_linear_decay():
    rng = np.random.default_rng(0)
    lr, warmup, total = float(rng.uniform(1e-4, 1e-2)), int(rng.integers(3, 10)), 40
    sched = stepmod.make_schedule(lr, warmup, total)
    for s in [0, 1, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 1, total]:
        expect = lr * s / warmup if s < warmup else lr * (total - s) / (total - warmup)
        np.testing.assert_allclose(float(sched(s)), expect, rtol=1e-6, atol=1e-12)
    log = stepmod.make_schedule(lr, warmup, total, "log")
    np.testing.assert_allclose(float(log(2)), lr * np.log(3) / np.log(warmup), rtol=1e-6)


def test_openllama3b_trainable_count_matches_recipe():
    """Dry run: trainable count = 12 layers x 4 LoRA pairs (r=64, d=3200) + their 24 norms +
    the final norm (the paper's setup: ~19.7M)."""
    run = cfgmod.resolve("openllama3b")
    report = dry_run_report(cfgmod.validate(run, PRESETS["openllama3b"].model),
                            PRESETS["openllama3b"].model)
    expect = 12 * 4 * 2 * 64 * 3200 + 12 * 2 * 3200 + 3200
    assert f"trainable {expect:,}" in report


# ---- data --------------------------------------------------------------------------------------

def test_sources_cache_and_contiguous_streams(tmp_path):
    rng = np.random.default_rng(1)
    texts = ["".join(chr(c) for c in rng.integers(97, 123, size=n)) for n in (301, 257, 199)]
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text(texts[0])
    with open(tmp_path / "d" / "sub" / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": texts[1]}) + "\n\n" + json.dumps(texts[2]) + "\n")
    (tmp_path / "d" / "ignored.bin").write_bytes(b"\x00\x01")
    files = datamod.list_sources(str(tmp_path / "d"))
    assert [os.path.basename(f) for f in files] == ["a.txt", "b.jsonl"]
    tok = datamod.ByteTokenizer()
    tokens = datamod.token_file(files, tok, str(tmp_path / "c"))
    assert isinstance(tokens, np.memmap)
    assert bytes(np.asarray(tokens).astype(np.uint8)).decode() == "".join(texts)
    cached = os.listdir(tmp_path / "c")
    mtime = os.path.getmtime(tmp_path / "c" / cached[0])
    datamod.token_file(files, tok, str(tmp_path / "c"))  # second call reads the cache
    assert os.listdir(tmp_path / "c") == cached
    assert os.path.getmtime(tmp_path / "c" / cached[0]) == mtime

    blocks = datamod.Blocks(tokens, 16, 0.1)
    assert blocks.n_val == round(len(tokens) // 16 * 0.1)
    streams = datamod.Streams(blocks, 3, 2)
    flat = np.asarray(tokens)
    per = blocks.n_train // 3
    for step in range(streams.steps_per_epoch + 1):  # wraps into the next epoch
        batch = streams.batch(step)
        for i in range(2):
            for r in range(3):
                j = (step * 2 + i) % streams.micro_per_epoch
                start = (r * per + j) * 16
                np.testing.assert_array_equal(batch[i, r], flat[start:start + 16])


# ---- LoRA --------------------------------------------------------------------------------------

_BASE: dict = {}


def _base(run, model):
    """Base params and their split, computed once per LoRA rank (compiles are the cost here)."""
    params = load_base(run, model)
    _BASE[run.train.lora_rank] = (params, *split_params(run, model, params))
    return _BASE[run.train.lora_rank]


def _random_lora(run, model, seed):
    params, frozen, trainable = _BASE.get(run.train.lora_rank) or _base(run, model)

    @jax.jit
    def perturb(tree, key):
        keys = iter(jax.random.split(key, 64))
        return jax.tree_util.tree_map(lambda x: x + jax.random.normal(next(keys), x.shape) * 0.3,
                                      tree)

    return params, frozen, perturb(trainable, jax.random.PRNGKey(seed))


def test_lora_merge_equals_unmerged_lora_model(tmp_path):
    """Merged weights W + (alpha/r) A B give the logits of the explicit LoRA model
    y = x W + (alpha/r) (x A) B, built by intercepting the projections of the base model."""
    run, model = resolve(tmp_path, "lora_rank=4", "lora_alpha=6")
    params, frozen, trainable = _random_lora(run, model, 3)
    scale = 6 / 4
    flat = traverse_util.flatten_dict(trainable)
    merged = jax.jit(lambda f, t: lora.merge(f, t, scale))(frozen, trainable)
    ids = jax.random.randint(jax.random.PRNGKey(4), (2, 24), 0, model.vocab_size)
    module = LlamaForCausalLM(model)

    def lora_branch(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = ("model",) + tuple(context.module.path[1:]) if context.module.path and \
            context.module.path[0] == "model" else tuple(context.module.path)
        if isinstance(context.module, nn.Dense) and path + ("lora_a",) in flat:
            x = args[0]
            out = out + scale * (x @ flat[path + ("lora_a",)]) @ flat[path + ("lora_b",)]
        return out

    # Unmerged: base weights, except the trained norms, plus the LoRA branch on the side.
    unmerged_params = traverse_util.flatten_dict(params)
    unmerged_params.update({k: v for k, v in flat.items() if k[-1] not in ("lora_a", "lora_b")})
    def unmerged(p, ids):
        with nn.intercept_methods(lora_branch):
            return module.apply({"params": p}, ids)

    want = jax.jit(unmerged)(traverse_util.unflatten_dict(unmerged_params), ids)
    apply = jax.jit(lambda p, ids: module.apply({"params": p}, ids))
    got, base = apply(merged, ids), apply(params, ids)
    assert float(jnp.abs(got - base).max()) > 1e-2  # the LoRA matters
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_lora_starts_at_base_model(tmp_path):
    run, model = resolve(tmp_path)
    params, frozen, trainable = _BASE.get(run.train.lora_rank) or _base(run, model)
    merged = lora.merge(frozen, trainable, run.train.lora_alpha / run.train.lora_rank)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    paths = {p[:-1] for p in traverse_util.flatten_dict(trainable)}
    layers = {int(p[1].split("_")[1]) for p in paths if p[0] == "model" and len(p) > 2}
    assert layers == set(range(run.memlong.memory_layer + 1, model.num_hidden_layers))


# ---- end to end --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tiny")
    data = toy_corpus(tmp_path / "toy.txt", seed=5)
    run, model = resolve(tmp_path, f"data={data}", "steps=24", "log_every=1", "lr=1e-2",
                         "eval_batches=1", "signal_every=8", "recall_fraction=0.5",
                         "recall_kinds=repeat", f"export_dir={tmp_path / 'export'}",
                         f"export_hf={tmp_path / 'hf'}")
    trainer = Trainer(run, model)
    trainer.train()
    return tmp_path, run, model, trainer


def test_tiny_loss_falls_and_only_trainable_moves(trained):
    tmp_path, run, model, trainer = trained
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < losses[0] - 0.2, losses
    assert any("val_loss" in r for r in rows)
    for key in ("grad_norm", "lr", "tokens_per_s", "tflops_per_device", "mem_fill",
                "retrieved_frac", "hits_per_chunk", "compile_s"):
        assert any(key in r for r in rows), key
    assert 0.5 <= rows[-2]["mem_fill"] <= 1.0 and rows[-2]["retrieved_frac"] == 1.0
    signals = [r for r in rows if "memory_gain" in r]
    assert [r["step"] for r in signals] == [0, 8, 16]
    for r in signals:
        assert r["memory_gain"] == pytest.approx(r["signal_loss_no_memory"] - r["signal_loss"])
        assert all(0 <= r[f"memory_mass_l{layer}"] <= 1 for layer in run.memlong.retrieval_layers)

    base = load_base(run, model)
    frozen0, trainable0 = split_params(run, model, base)
    for a, b in zip(jax.tree_util.tree_leaves(frozen0),
                    jax.tree_util.tree_leaves(jax.device_get(trainer.frozen))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical
    now = traverse_util.flatten_dict(jax.device_get(trainer.state["trainable"]))
    for path, before in traverse_util.flatten_dict(trainable0).items():
        assert np.abs(np.asarray(now[path]) - np.asarray(before)).max() > 0, path


def test_export_loads_and_converts_to_hf(trained):
    tmp_path, run, model, trainer = trained
    frozen = jax.device_get(trainer.frozen)
    merged = lora.merge(frozen, jax.device_get(trainer.state["trainable"]),
                        run.train.lora_alpha / run.train.lora_rank)
    loaded = ml.load(str(tmp_path / "export"))
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = jax.random.randint(jax.random.PRNGKey(7), (1, 16), 0, model.vocab_size)
    np.testing.assert_allclose(np.asarray(loaded.logits(ids)), np.asarray(
        LlamaForCausalLM(model).apply({"params": merged}, ids)), atol=1e-5)
    stored = json.load(open(tmp_path / "export" / "config.json"))
    assert stored["memlong_jax"]["memlong"] == run.memlong.to_dict()
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(
        tensors["model.layers.3.self_attn.q_proj.weight"],
        np.asarray(merged["model"]["layers_3"]["self_attn"]["q_proj"]["kernel"]).T)
    # The standalone exporter reproduces it from the checkpoint.
    export_run(str(tmp_path / "out"), str(tmp_path / "export2"))
    again = ml.load(str(tmp_path / "export2"))
    for a, b in zip(jax.tree_util.tree_leaves(again.params), jax.tree_util.tree_leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adapter_travels_and_merges_like_the_checkpoint(trained, capsys):
    tmp_path = trained[0]
    adapter = str(tmp_path / "adapter")
    assert run_cli(export_main, [str(tmp_path / "out"), adapter, "--adapter"]) == 0
    export_run(str(tmp_path / "out"), str(tmp_path / "direct"))
    assert run_cli(export_main, [adapter, str(tmp_path / "from_adapter")]) == 0
    direct = ml.load(str(tmp_path / "direct"))
    merged = ml.load(str(tmp_path / "from_adapter"))
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(merged.params), leaves(direct.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert run_cli(export_main, [adapter, str(tmp_path / "x"), "--adapter",
                                 "--hf", str(tmp_path / "h")]) == 2
    assert run_cli(export_main, [str(tmp_path), str(tmp_path / "y")]) == 2
    assert "neither a training run" in capsys.readouterr().err


def test_tensorboard_events_hold_the_logged_scalars(trained):
    """Every scalar of metrics.jsonl is in the TensorBoard event file, at its step."""
    tmp_path = trained[0]
    logged = {(step, tag): value
              for step, tag, value in tensorboard_scalars(tmp_path / "out" / "tb")}
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    expected = {(row["step"], tag): value for row in rows for tag, value in row.items()
                if tag not in ("step", "time") and isinstance(value, (int, float))}
    assert len(expected) >= 25 and set(logged) == set(expected)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key   # stored as float32


def test_an_interrupted_run_keeps_its_tensorboard_events(tmp_path):
    """Training ended by a signal (`Interrupted` out of the loop) still has every logged step in
    TensorBoard: the writer thread holds events until the log is closed, which `train` does on
    every way out (an interrupted run once lost its last steps there)."""
    log = metrics.MetricsLog(str(tmp_path), tensorboard=True)

    def loop(flag):
        for step in range(1, 4):
            log.write(step, {"loss": float(step)})
        raise interrupts.Interrupted(signal.SIGTERM)

    released = []
    trainer = types.SimpleNamespace(log=log, _loop=loop, release=lambda: released.append(1))
    with pytest.raises(interrupts.Interrupted):
        Trainer.train(trainer)
    assert released == [1]
    shown = [(step, value) for step, tag, value in tensorboard_scalars(tmp_path / "tb")]
    assert shown == [(1, 1.0), (2, 2.0), (3, 3.0)]


# ---- bad input ---------------------------------------------------------------------------------

def _cli(capsys, *argv):
    code = run_cli(run_main, list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_bad_input_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    short = tmp_path / "short.txt"
    short.write_text("x" * 20)
    (tmp_path / "file").write_text("")
    common = ["--config", "tiny", "--set", f"cache_dir={tmp_path / 'c'}", "progress=false"]
    cases = [
        ([f"data={tmp_path / 'empty'}", f"output_dir={tmp_path / 'o1'}"], "holds no text files"),
        ([f"data={short}", f"output_dir={tmp_path / 'o2'}"], "fewer than one sequence"),
        ([f"output_dir={tmp_path / 'file' / 'sub'}"], "cannot write to output_dir"),
        (["bogus_key=3"], "unknown setting 'bogus_key'"),
    ]
    for sets, words in cases:
        code, err = _cli(capsys, *common, *sets)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    code, err = _cli(capsys, "--config", "openllama3b", "--set", "init_from=" + str(tmp_path / "w"))
    assert code == 2 and "convert.from_hf" in err[0] and len(err) == 1


def test_other_config_checkpoint_is_refused_and_kept(trained, capsys):
    tmp_path, run, model, _ = trained
    ckpt = tmp_path / "out" / "checkpoints"
    before = {p: sorted(os.listdir(ckpt / p)) for p in os.listdir(ckpt)}
    assert "24" in before
    code, err = _cli(capsys, "--config", "tiny", "--set", f"data={run.train.data}",
                     f"output_dir={tmp_path / 'out'}", f"cache_dir={run.train.cache_dir}",
                     "steps=24", "lr=1e-2", "lora_rank=4", "progress=false")
    assert code == 2 and len(err) == 1 and "different config" in err[0] and "lora_rank" in err[0]
    assert {p: sorted(os.listdir(ckpt / p)) for p in os.listdir(ckpt)} == before
    # The last good checkpoint still restores: the same config resumes from it.
    trainer = Trainer(run, model)
    assert trainer.start == 24
    restored = traverse_util.flatten_dict(jax.device_get(trainer.state["trainable"]))
    for path, leaf in traverse_util.flatten_dict(
            jax.device_get(trained[3].state["trainable"])).items():
        np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(leaf))


# ---- precomputed retriever keys ----------------------------------------------------------------

def test_key_table_matches_the_encoder_and_spares_it(tmp_path, capsys):
    from memlong_jax.errors import UserError
    from train.keys import main as keys_main
    data = toy_corpus(tmp_path / "toy.txt", seed=11, repeats=30)
    sets = [f"data={data}", "memlong.retriever=text", f"cache_dir={tmp_path / 'cache'}"]
    argv = [a for s in sets for a in ("--set", s)]
    assert run_cli(keys_main, [str(tmp_path / "keys.npz"), "--config", "tiny", "-q", *argv]) == 0
    assert run_cli(keys_main, [str(tmp_path / "keys16.npz"), "--config", "tiny", "-q",
                               "--float16", *argv]) == 0
    run, model = resolve(tmp_path, *sets[:2], "steps=2", f"key_table={tmp_path / 'keys.npz'}")
    tau = run.memlong.chunk_size
    tok = datamod.load_tokenizer("auto", "", model.vocab_size)
    tokens = datamod.token_file(datamod.list_sources(data), tok, str(tmp_path / "cache"))
    ids = np.asarray(tokens[:8 * tau * 3], np.int32).reshape(2, 3, 4 * tau)  # [accum, B, S]
    live = make_retriever(run.memlong, tok)
    want, _ = datamod.host_embeddings(live, ids)
    for name, atol in (("keys.npz", 1e-5), ("keys16.npz", 2e-3)):
        table = datamod.KeyTable(str(tmp_path / name), tau)
        got, _ = datamod.host_embeddings(make_retriever(run.memlong, tok, key_table=table), ids)
        assert got.shape == want.shape == (2, 3, 4, 384)
        np.testing.assert_allclose(got, want, atol=atol)
    with pytest.raises(UserError, match="missing from the key table"):
        table(np.full((1, tau), 7, np.int32))
    with pytest.raises(UserError, match="chunk_size"):
        datamod.KeyTable(str(tmp_path / "keys.npz"), tau * 2)
    trainer = Trainer(run, model)
    trainer.train()
    assert trainer.retriever.key_table is not None and trainer.retriever._encoder is None
    assert len([json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]) >= 1


class RowRecorder(Retriever):
    """A host-side retriever that records the ids it is asked to embed; keys are all ones."""

    host_side = True

    def __init__(self, tau, dim):
        self.tau, self.dim, self.seen = tau, dim, []

    def chunk_keys(self, ids):
        self.seen.append(np.array(ids))
        return np.ones((ids.shape[0], ids.shape[1] // self.tau, self.dim), np.float32)


def test_each_host_embeds_only_its_rows(tmp_path):
    """Training batches and validation windows alike: the host-side retriever sees only the rows
    this host's devices hold (here rows 1 and 3 of 4, as if another host held 0 and 2), and the
    global key array has zeros in the other rows. (That each host's rows are assembled right
    across real processes: tests/test_multihost.py, with the text retriever.)"""
    data = toy_corpus(tmp_path / "toy.txt", seed=5, repeats=60)
    run, model = resolve(tmp_path, f"data={data}", "rows_per_replica=4", "eval_batches=1",
                         "eval_length=32", "eval_window=16", "mesh_data=1")
    trainer = Trainer(run, model)
    trainer.release()
    mine = [1, 3]
    trainer.local_rows = mine
    trainer.retriever = RowRecorder(run.memlong.chunk_size, trainer.emb_dim)
    keys = np.asarray(trainer.batch(5)["key_emb"])
    assert [x.shape for x in trainer.retriever.seen] == [(2 * 2, 32)]   # accum x mine, seq
    np.testing.assert_array_equal(trainer.retriever.seen[0].reshape(2, 2, 32),
                                  trainer.streams.batch(5)[:, mine])
    assert (keys[:, mine] == 1).all() and (keys[:, [0, 2]] == 0).all()
    trainer.retriever.seen.clear()
    assert trainer.evaluate() is not None
    windows = datamod.validation_windows(trainer.blocks, 32, 4, 1)
    assert len(trainer.retriever.seen) == 1
    np.testing.assert_array_equal(trainer.retriever.seen[0], windows[0][mine])


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policy_recomputes_and_changes_nothing(policy):
    """A remat policy puts each decoder layer under jax.checkpoint, and gives the same loss and
    gradients as none."""
    config = PRESETS["tiny"].model
    ids = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 16)), jnp.int32)
    params = LlamaForCausalLM(config).init(jax.random.PRNGKey(0), ids)["params"]

    def loss(module, p):
        return module.apply({"params": p}, ids).astype(jnp.float32).std()

    plain = LlamaForCausalLM(config)
    remat = LlamaForCausalLM(config, remat_policy=policy)
    remats = lambda module: len(re.findall(r"= (?:remat\w*|checkpoint)\[",
                                           str(jax.make_jaxpr(lambda p: loss(module, p))(params))))
    assert (remats(remat), remats(plain)) == (config.num_hidden_layers, 0)
    expected = jax.value_and_grad(lambda p: loss(plain, p))(params)
    got = jax.value_and_grad(lambda p: loss(remat, p))(params)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_train_from_trains_only_the_layers_from_there(tmp_path):
    run, model = resolve(tmp_path, "train_from=3")
    params = load_base(run, model)
    _, trainable = split_params(run, model, params)
    layers = {p[1] for p in traverse_util.flatten_dict(trainable) if p[0] == "model"
              and p[1].startswith("layers_")}
    assert layers == {"layers_3"}
    _, default = split_params(*resolve(tmp_path), params)
    assert {p[1] for p in traverse_util.flatten_dict(default)
            if p[1].startswith("layers_")} == {"layers_2", "layers_3"}   # above memory layer 1
    for bad in ("train_from=1", "train_from=4"):
        with pytest.raises(ConfigError, match="train_from"):
            resolve(tmp_path, bad)


def test_settings_added_after_a_checkpoint_resume_at_their_defaults(tmp_path):
    """A checkpoint written before a setting existed lacks it: resuming is allowed when the run
    keeps the setting's default (the behaviour from before), refused when it changes it."""
    run, model = resolve(tmp_path, "data=pydoc")
    stored = {"run": run.to_dict(), "model": model.to_hf_dict()}
    for part, key in (("memlong", "ingest_chunks"), ("train", "remat")):
        del stored["run"][part][key]
    check_compatible(stored, run, model, "out")  # defaults: the same run
    changed = dataclasses.replace(run, memlong=run.memlong.replace(ingest_chunks=3))
    with pytest.raises(UserError, match=r"ingest_chunks: 16 -> 3"):
        check_compatible(stored, changed, model, "out")
