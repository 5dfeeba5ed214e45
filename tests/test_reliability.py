"""Issue 17, in-process: bad input of every kind gives one line and exit code 2 and leaves nothing
behind; files a model directory names never resolve outside it; outputs never overwrite inputs;
one training run per output directory. (Signals and damaged checkpoints: test_faults.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest

from convert import from_hf, to_hf
from helpers import LLAMA_SHAPES, random_torch_llama, save_torch_llama
from memlong_jax.cli import generate, score
from memlong_jax.errors import UserError, atomic_output_dir, run_cli
from train import resume
from train.run import main as train_main
from train.run_lock import RunLock

TEXT = "It is a truth universally acknowledged, that a single man in possession. " * 6
FAST = ["--lengths", "32,64", "--local-window", "16", "--scored-tokens", "12", "-q"]


def cli(capsys, main, *argv):
    code = run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def assert_one_line(code, err, *words):
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    for word in words:
        assert word in err[0], err[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "model"
    save_torch_llama(random_torch_llama(seed=3, **LLAMA_SHAPES["mha_untied"]), directory,
                     "sharded_safetensors")
    return directory


def copy_of(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path, change):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


# ---- path containment (item 3) -------------------------------------------------------------

def _index_entry(value):
    def change(index):
        name = sorted(index["weight_map"])[0]
        index["weight_map"][name] = value(index["weight_map"][name])
        return index
    return change


def test_index_entries_that_leave_the_directory_are_refused(tmp_path, hf_dir, capsys):
    """`../elsewhere/shard` and an absolute path both point at a complete copy of the model, so
    reading them would convert without error: only the containment check stops it."""
    elsewhere = copy_of(hf_dir, tmp_path / "elsewhere")
    for i, value in enumerate([lambda f: f"../elsewhere/{f}", lambda f: str(elsewhere / f)]):
        src = copy_of(hf_dir, tmp_path / f"src{i}")
        edit_json(src / "model.safetensors.index.json", _index_entry(value))
        out = tmp_path / f"out{i}"
        code, _, err = cli(capsys, from_hf.main, src, out, "-q")
        assert_one_line(code, err, "outside the directory")
        assert not out.exists() and not list(tmp_path.glob(f".out{i}.tmp*"))


def test_symlinks_out_of_the_directory_are_refused(tmp_path, hf_dir, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours\n")
    src = copy_of(hf_dir, tmp_path / "src")
    os.symlink(secret, src / "merges.txt")
    code, _, err = cli(capsys, from_hf.main, src, tmp_path / "out", "-q")
    assert_one_line(code, err, "merges.txt", "outside the directory")
    assert not (tmp_path / "out").exists()

    shard = sorted(p for p in os.listdir(hf_dir) if p.endswith(".safetensors"))[0]
    src2 = copy_of(hf_dir, tmp_path / "src2")
    os.remove(src2 / shard)
    os.symlink(hf_dir / shard, src2 / shard)  # the same bytes, but outside src2
    code, _, err = cli(capsys, from_hf.main, src2, tmp_path / "out2", "-q")
    assert_one_line(code, err, shard, "outside the directory")


def test_hub_cache_links_into_blobs_still_convert(tmp_path, hf_dir, capsys):
    """The HF hub cache: snapshots/REV/* are links into the repository's own blobs/."""
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(hf_dir))):
        shutil.copyfile(hf_dir / name, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / name)
    code, _, err = cli(capsys, from_hf.main, snap, tmp_path / "out", "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").is_file()


def test_to_hf_does_not_carry_a_linked_file_on(tmp_path, tiny_checkpoint, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours\n")
    ckpt = copy_of(tiny_checkpoint, tmp_path / "ckpt")
    os.symlink(secret, ckpt / "merges.txt")
    code, _, err = cli(capsys, to_hf.main, ckpt, tmp_path / "hf", "-q")
    assert_one_line(code, err, "merges.txt", "outside the directory")
    assert not (tmp_path / "hf").exists()


# ---- bad converter input (item 5) ------------------------------------------------------------

CONFIG_CASES = {
    "list": lambda c: [],
    "null": lambda c: {**c, "hidden_size": None},
    "string": lambda c: {**c, "intermediate_size": "96"},
    "list_value": lambda c: {**c, "num_hidden_layers": [3]},
    "heads_0": lambda c: {**{k: v for k, v in c.items() if k != "head_dim"},
                          "num_attention_heads": 0},
    "eps_abc": lambda c: {**c, "rms_norm_eps": "abc"},
    "vocab_1e12": lambda c: {**c, "vocab_size": 10**12},
    "max_pos_-5": lambda c: {**c, "max_position_embeddings": -5},
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_values(tmp_path, hf_dir, capsys, case):
    src = copy_of(hf_dir, tmp_path / "src")
    edit_json(src / "config.json", CONFIG_CASES[case])
    code, _, err = cli(capsys, from_hf.main, src, tmp_path / "out", "-q")
    assert_one_line(code, err)
    assert not (tmp_path / "out").exists()


def test_gguf_without_head_count(tmp_path, capsys):
    import gguf
    path = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, _, err = cli(capsys, from_hf.main, path, tmp_path / "out", "-q")
    assert_one_line(code, err, "head_count")


def test_output_under_a_file_and_parents_removed_after_failure(tmp_path, hf_dir, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, from_hf.main, hf_dir, tmp_path / "file" / "out", "-q")
    assert_one_line(code, err, "cannot create output")
    src = copy_of(hf_dir, tmp_path / "src")
    edit_json(src / "config.json", lambda c: {**c, "num_hidden_layers": 4})  # fails mid-way
    code, _, err = cli(capsys, from_hf.main, src, tmp_path / "new" / "deeper" / "out", "-q")
    assert_one_line(code, err, "lacks")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_output_in_a_read_only_directory(tmp_path, hf_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = cli(capsys, from_hf.main, hf_dir, locked / "out", "-q")
    assert_one_line(code, err, "cannot create output")


def test_output_written_by_another_process_meanwhile(tmp_path):
    """Two conversions into one OUT: the second to finish finds OUT there, keeps it intact and
    reports it; its own temporary directory is gone."""
    out = tmp_path / "out"
    with pytest.raises(UserError, match="another command"):
        with atomic_output_dir(out) as tmp:
            (out / "sub").mkdir(parents=True)
            (out / "sub" / "theirs").write_text("theirs")
            (open(os.path.join(tmp, "mine"), "w")).close()
    assert (out / "sub" / "theirs").read_text() == "theirs"
    assert os.listdir(tmp_path) == ["out"]


# ---- bad checkpoints for score, to_hf and training (item 5) ----------------------------------

def _damage(ckpt, what):
    if what == "config_not_json":
        (ckpt / "config.json").write_text("{not json")
    elif what == "params_incomplete":
        files = sorted(p for p in (ckpt / "params").rglob("*") if p.is_file())
        os.remove(max(files, key=os.path.getsize))
    elif what == "tokenizer_garbage":
        (ckpt / "tokenizer.json").write_bytes(os.urandom(300))


@pytest.mark.parametrize("what", ["config_not_json", "params_incomplete", "tokenizer_garbage"])
def test_damaged_converted_checkpoint(tmp_path, tiny_checkpoint, capsys, what):
    ckpt = copy_of(tiny_checkpoint, tmp_path / "ckpt")
    _damage(ckpt, what)
    (tmp_path / "book.txt").write_text(TEXT)
    code, _, err = cli(capsys, score.main, ckpt, tmp_path / "book.txt", *FAST,
                       "--set", "retriever=hidden")
    assert_one_line(code, err)
    code, _, err = cli(capsys, to_hf.main, ckpt, tmp_path / "hf", "-q")
    assert_one_line(code, err)
    assert not (tmp_path / "hf").exists()
    data = tmp_path / "book.txt"
    sets = [f"data={data}", f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'c'}",
            "progress=false", "steps=1"]
    code, _, err = cli(capsys, train_main, "--config", "tiny", "--set", *sets,
                       f"init_from={ckpt}")
    assert_one_line(code, err)
    if what == "tokenizer_garbage":
        code, _, err = cli(capsys, train_main, "--config", "tiny", "--set", *sets,
                           f"tokenizer={ckpt / 'tokenizer.json'}")
        assert_one_line(code, err, "tokenizer")


# ---- settings and arguments (items 5 and 7) ---------------------------------------------------

@pytest.mark.parametrize("setting", ["lr=nan", "lr=-1", "lr=0", "clip=inf", "adam_b2=1",
                                     "weight_decay=-0.1"])
def test_bad_training_numbers_are_settings_errors(tmp_path, capsys, setting):
    code, _, err = cli(capsys, train_main, "--config", "tiny", "--set", setting,
                       f"output_dir={tmp_path / 'o'}", "progress=false")
    assert_one_line(code, err, setting.split("=")[0])
    assert not (tmp_path / "o").exists()


def test_bad_arguments(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "book.txt").write_text(TEXT)
    code, _, err = cli(capsys, score.main, tiny_checkpoint, tmp_path / "book.txt",
                       "--lengths", "\u00b2")
    assert_one_line(code, err, "bad length")
    code, _, err = cli(capsys, generate.main, tiny_checkpoint, "--prompt", "hi",
                       "--seed", "99999999999999999999999")
    assert_one_line(code, err, "--seed")


def test_outputs_never_overwrite_inputs(tmp_path, tiny_checkpoint, capsys):
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    for flag, target in [("--json", book), ("--csv", book),
                         ("--json", os.path.join(tiny_checkpoint, "config.json")),
                         ("--plot", os.path.join(tiny_checkpoint, "x.png"))]:
        before = {p: open(p, "rb").read() for p in (book, os.path.join(tiny_checkpoint,
                                                                         "config.json"))}
        code, _, err = cli(capsys, score.main, tiny_checkpoint, book, *FAST,
                           "--set", "retriever=hidden", flag, target)
        assert_one_line(code, err, "choose")
        assert {p: open(p, "rb").read() for p in before} == before
    code, _, err = cli(capsys, to_hf.main, tiny_checkpoint,
                       os.path.join(tiny_checkpoint, "hf"), "-q")
    assert_one_line(code, err, "inside")


def test_fifo_in_an_input_directory_is_refused(tmp_path, tiny_checkpoint, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(TEXT)
    os.mkfifo(docs / "b.txt")
    def hung(signum, frame):
        raise TimeoutError("blocked reading the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)  # a regression blocks on open(): fail
    signal.alarm(60)
    try:
        code, _, err = cli(capsys, score.main, tiny_checkpoint, docs, *FAST,
                           "--set", "retriever=hidden")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert_one_line(code, err, "not a regular file")


# ---- training output directory: lock ----------------------------------------------------------

def test_lock_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(str(out))  # another open file description: flock conflicts in-process too
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        RunLock(str(out))
    held.release()
    (out / ".lock").write_text("pid 999999999 on elsewhere\n")  # left by a dead run
    RunLock(str(out)).release()
    assert str(os.getpid()) in (out / ".lock").read_text()


def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 5)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo'  # torn last line
    (tmp_path / "metrics.jsonl").write_text(text)
    resume.drop_metrics_after(str(tmp_path), 3)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:3]
