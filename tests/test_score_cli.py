"""`python -m memlong_jax.score`: inputs, outputs, and one-line errors for bad input."""

import csv
import io
import json
import os
import sys

import numpy as np
import pytest

from memlong_jax.cli import score
from memlong_jax.errors import run_cli

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good " \
       "fortune, must be in want of a wife. " * 3   # about 390 byte tokens
FAST = ["--lengths", "32,64", "--local-window", "16", "--scored-tokens", "12", "-q"]
TINY_BLOCK = ["block_size=4", "window=32", "chunk=8", "memory_tokens=64", "top_k=16",
              "mem_dtype=float32"]


def run(argv, capsys):
    code = run_cli(score.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_scores_files_and_writes_every_output(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "book.txt").write_text(TEXT)
    rows = [json.dumps({"text": TEXT[:50], "id": 1}), "", json.dumps({"text": TEXT})]
    (tmp_path / "docs.jsonl").write_text("\n".join(rows))
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, stderr = run([tiny_checkpoint, str(tmp_path / "book.txt"),
                                str(tmp_path / "docs.jsonl"), *FAST,
                                "--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
                                "--plot", str(out / "r.png")], capsys)
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["r.csv", "r.json", "r.png"]   # no temporary files left
    results = json.loads((out / "r.json").read_text())
    names = [d["name"] for d in results["config"]["documents"]]
    assert names == [str(tmp_path / "book.txt"), f"{tmp_path / 'docs.jsonl'}:1",
                     f"{tmp_path / 'docs.jsonl'}:3"]
    assert results["config"]["memlong"]["chunk_size"] == 4      # the checkpoint's own settings
    assert results["config"]["protocol"]["local_window"] == 16
    # The 50-character JSONL row is too short for 64 tokens: skipped there with a warning.
    assert "too short for length 64" in stderr
    with open(out / "r.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(results["rows"]) == 6
    for row, entry in zip(table, results["rows"]):
        assert float(row["ppl"]) == pytest.approx(entry["ppl"])
        windows = [w["mean_nll"] for w in results["windows"]
                   if w["length"] == entry["length"] and w["mode"] == entry["mode"]]
        assert entry["ppl"] == pytest.approx(np.exp(np.mean(windows)))
        assert f"{entry['ppl']:.4f}" in stdout
    assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow   # CI time (16 s); `make test-all` runs it
def test_stdin_and_join(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode())))
    code, _, err = run([tiny_checkpoint, *FAST, "--json", str(tmp_path / "a.json")], capsys)
    assert code == 0, err
    (tmp_path / "d").mkdir()
    for i in range(3):   # three 130-token files: too short alone for 2 windows of 64, joined not
        (tmp_path / "d" / f"{i}.txt").write_text(TEXT[i * 130:(i + 1) * 130])
    code, _, err = run([tiny_checkpoint, str(tmp_path / "d"), "--join", *FAST,
                        "--json", str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    joined = json.loads((tmp_path / "b.json").read_text())
    assert [d["name"] for d in joined["config"]["documents"]] == ["joined(3 documents)"]


@pytest.mark.parametrize("setup, extra, words", [
    ("empty", [], "empty input"),
    ("latin1", [], "not UTF-8"),
    ("short", [], "nothing to score"),
    ("book", ["--lengths", "30"], "not a positive multiple of the chunk size"),
    ("book", ["--local-window", "10"], "not a positive multiple of the chunk size"),
    ("book", ["--modes", "memlong,fancy"], "unknown mode fancy"),
    ("book", ["--lengths", "2x"], "bad length"),
    ("book", ["--set", "fancy=1"], "unknown setting 'fancy'"),
    ("book", ["--bogus-flag"], "unrecognized arguments"),
    ("book", ["--modes", "block"], "trained range"),   # default window 2048 > tiny's 2048
    ("book", ["--modes", "block", "--block", "window=100"], "multiple of block_size"),
    ("book", ["--modes", "block", "--block", "depth=3"], "unknown setting 'block.depth'"),
    ("book", ["--modes", "block", *[f"--block={s.replace('chunk=8', 'chunk=24')}"
                                     for s in TINY_BLOCK]],
     "not a multiple of the block memory's chunk"),
    ("book", ["--plot", "plot.gif"], "plot.gif"),
    ("bad_jsonl", [], "not valid JSON"),
    ("missing", [], "no such file"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, capsys, setup,
                                                  extra, words):
    inputs = {"empty": ("in.txt", b"  \n"), "latin1": ("in.txt", "café".encode("latin-1")),
              "short": ("in.txt", b"too short"), "book": ("in.txt", TEXT.encode()),
              "bad_jsonl": ("in.jsonl", b'{"text": "a"}\n{oops\n')}
    path = tmp_path / "in.txt"
    if setup in inputs:
        name, data = inputs[setup]
        path = tmp_path / name
        path.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    argv = [tiny_checkpoint, str(path), *FAST, "--json", str(out / "r.json"), *extra]
    code, stdout, stderr = run([a.replace("plot.gif", str(out / "plot.gif")) for a in argv],
                               capsys)
    assert code == 2
    assert stderr.startswith("error:") and stderr.count("\n") == 1 and words in stderr, stderr
    assert os.listdir(out) == []


def test_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(TEXT)
    code, _, err = run([str(tmp_path / "nope"), str(tmp_path / "in.txt")], capsys)
    assert code == 2 and "no such checkpoint" in err


def test_baselines_alone_need_no_text_encoder(tiny_checkpoint, tmp_path, capsys):
    """`local`/`full` never retrieve: a text-retriever checkpoint scores them without an encoder."""
    (tmp_path / "in.txt").write_text(TEXT)
    code, out, err = run([tiny_checkpoint, str(tmp_path / "in.txt"), *FAST, "--modes",
                          "local,full", "--set", "retriever=text",
                          "--encoder", str(tmp_path / "no_such_encoder")], capsys)
    assert code == 0, err
    assert "PPL full" in out and "PPL memlong" not in out


def test_inputs_may_follow_options(tiny_checkpoint, tmp_path, capsys):
    """`score CKPT --lengths 2k FILE --set k=v`: files after options, as users (and
    experiments/smollm2_pg19.sh) write them, score the same as files first."""
    (tmp_path / "in.txt").write_text(TEXT)
    outputs = []
    text = str(tmp_path / "in.txt")
    for i, argv in enumerate(([text, *FAST], [*FAST, text])):
        path = tmp_path / f"r{i}.json"
        code, _, err = run([tiny_checkpoint, *argv, "--modes", "local", "--json", str(path)],
                           capsys)
        assert code == 0, err
        outputs.append(json.loads(path.read_text())["windows"])
    assert outputs[0] == outputs[1] and len(outputs[0]) > 0


def test_block_mode_with_every_block_at_true_positions_scores_as_full(tiny_checkpoint, tmp_path,
                                                                      capsys):
    """The block row goes through the scorer on the same tokens as `full`; with every block
    kept and retrieved at true positions it is full attention (tests/test_blockmem.py)."""
    (tmp_path / "book.txt").write_text(TEXT)
    argv = [tiny_checkpoint, str(tmp_path / "book.txt"), *FAST, "--modes", "block,full",
            *[f"--block={s}" for s in TINY_BLOCK + ["placement=true", "previous=false"]],
            "--json", str(tmp_path / "r.json")]
    code, _, stderr = run(argv, capsys)
    assert code == 0, stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["config"]["block"]["placement"] == "true"
    rows = {(r["length"], r["mode"]): r["ppl"] for r in results["rows"]}
    for length in (32, 64):
        assert rows[(length, "block")] == pytest.approx(rows[(length, "full")], rel=1e-5)
