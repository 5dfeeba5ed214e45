"""The recall benchmark: exact prompts, answers and depths; the rows' answers and NLL against
direct computations; copy gain on SmolLM2 (slow); the command line's outputs and errors."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from helpers import SHARED_DATA, byte_tokenizer, real_text
import memlong_jax as ml
from memlong_jax import recall
from memlong_jax.cli.recall import main as recall_main
from memlong_jax.errors import run_cli
from memlong_jax.eval import generation
from memlong_jax.eval.recall import Settings
from memlong_jax.io.tokenizer import load_tokenizer
from memlong_jax.memlong import scan
from memlong_jax.memlong.blockmem import BlockConfig
from memlong_jax.memlong.config import QUERY_MODES

TOK = byte_tokenizer()
WINDOW, BUDGET = 16, 8
# Block memory that is full attention (every block kept and retrieved, at true positions), and
# the default kind (fixed placement, few blocks) at the same small scale.
BLOCK_FULL = BlockConfig(block_size=8, sink_tokens=2, window=16, chunk=8, top_k=8,
                         representatives=2, memory_tokens=64, placement="true", previous=False)
BLOCK_SMALL = BLOCK_FULL.replace(top_k=2, placement="fixed")


def text_of(ids) -> str:
    return TOK.decode(np.asarray(ids).tolist())


def filler(n_chars: int) -> str:
    return " ".join([recall.FILLER] * (n_chars // len(recall.FILLER) + 1))[:n_chars]


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_strings_length_and_depth_are_exact(depth):
    """Byte tokens: one per character, so the expected text can be written out in full."""
    item = recall.passkey(TOK, 600, depth, 40321)
    key_line = "The pass key is 40321. Remember it. 40321 is the pass key."
    question = "What is the pass key? The pass key is"
    filler_total = 600 - len("\n".join([recall.INTRO, key_line, question])) - 2
    before = round(depth * filler_total)
    after = filler_total - before
    if after == 0:      # an empty filler part has no line: its line break goes to the other
        before += 1
    elif before == 0:
        after += 1
    lines = [recall.INTRO, filler(before), key_line, filler(after), question]
    expected = "\n".join(line for line in lines if line)
    assert len(item.ids) == 600 and text_of(item.ids) == expected
    assert item.position == expected.index(key_line)
    assert item.answer == "40321" and text_of(item.answer_ids) == " 40321"


def test_passkey_keys_are_seeded_five_digit_and_depths_exact_in_smollm2_tokens(smollm2_converted):
    tokenizer = load_tokenizer(smollm2_converted)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    keys = set()
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        item = recall.passkey_item(tokenizer, 2040, depth, 0, 2048, 0)
        text = tokenizer.decode(item.ids.tolist())
        # the pieces join at word boundaries: the text tokenizes back to the very same ids
        assert encode(text) == item.ids.tolist()
        assert len(item.ids) == 2040 and text.startswith(recall.INTRO + "\n")
        assert text.endswith("\n" + recall.QUESTION)
        key_line = recall.KEY_LINE.format(key=item.answer)
        assert tokenizer.decode(item.ids[item.position:].tolist()).startswith(key_line)
        filler_total = 2040 - len(encode("\n".join([recall.INTRO, key_line, recall.QUESTION]))) - 2
        key_offset = item.position - len(encode(recall.INTRO + "\n"))
        assert abs(key_offset - depth * filler_total) <= 2
        assert len(item.answer) == 5 and item.answer == str(int(item.answer))
        again = recall.passkey_item(tokenizer, 2040, depth, 0, 2048, 0)
        assert np.array_equal(item.ids, again.ids)
        keys.add(item.answer)
    assert len(keys) > 1    # a key per cell


def test_needle_sits_at_a_sentence_start_near_the_depth_and_the_question_ends_the_prompt():
    sentences = " ".join(f"Sentence number {i} is about nothing at all." for i in range(400))
    haystack = recall.Haystack(TOK, [sentences])
    for depth in (0.0, 0.5, 1.0):
        item = recall.needle_item(TOK, haystack, 3000, depth, 1, 4096, 0)
        text = text_of(item.ids)
        assert len(item.ids) == 3000
        fact, question = next((f.format(value=item.answer), q) for f, q in recall.NEEDLES
                              if f.format(value=item.answer) in text)
        assert text.endswith("\n\n" + question)
        assert text_of(item.ids[item.position:]).startswith(
            " " + fact + ("\nSentence number " if depth == 0 else " Sentence number ")) \
            or depth == 1.0
        inside = 3000 - len(" " + fact) - len("\n\n" + question)
        # moved back to the start of the sentence the depth falls in (sentences are < 50 bytes)
        assert 0 <= round(depth * inside) - item.position < 50
        assert item.position == 0 or text[:item.position].endswith(".")
        assert text_of(item.answer_ids) == " " + item.answer and item.answer in recall.VALUES


def test_repeat_item_repeats_its_first_passage_at_the_end():
    haystack = recall.Haystack(TOK, [real_text()])
    item = recall.repeat_item(TOK, haystack, 2048, 300, 5, 0)
    assert len(item.ids) == 2048 and np.array_equal(item.ids[:300], item.ids[-300:])
    assert item.position == 2048 - 300
    assert text_of(item.ids[:1748]) in haystack.text + "\n\n" + haystack.text
    other = recall.repeat_item(TOK, haystack, 2048, 300, 5, 1)
    assert not np.array_equal(other.ids, item.ids)


@pytest.mark.parametrize("task,answer,ok", [("passkey", "12345", " 12345. Remember"),
                                             ("passkey", "12345", "The key is 12345"),
                                             ("needle", "cobalt", " Cobalt, of course")])
def test_answer_rules(task, answer, ok):
    assert recall.answer_correct(task, ok, answer)
    assert not recall.answer_correct(task, ok.replace(answer, answer[:-1]).replace(
        answer.capitalize(), answer.capitalize()[:-1]), answer)
    assert not recall.answer_correct(task, " no answer here", answer)


# ---- the rows against direct computations (tiny model, byte tokenizer) -----------------------

@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return ml.load(tiny_checkpoint)


def direct_greedy_and_logprob(model, context, answer):
    """Greedy tokens by re-running the plain forward on the growing context, and the answer's
    log-probability from one plain forward over context + answer."""
    ids = list(context)
    for _ in range(BUDGET):
        ids.append(int(np.argmax(np.asarray(model.logits(np.asarray([ids]))[0, -1]))))
    logits = np.asarray(model.logits(np.asarray([list(context) + list(answer)])), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = logp[len(context) - 1:len(context) - 1 + len(answer)]
    return ids[len(context):], float(picked[np.arange(len(answer)), answer].sum())


@pytest.mark.slow   # CI time: a cheaper test covers the same property in the default run
def test_full_and_local_answers_equal_the_plain_forward(model):
    rng = np.random.default_rng(0)
    reader = recall.Reader(model, model.memlong_config, None, WINDOW, BUDGET)
    prompts = rng.integers(0, 256, size=(2, 56)).astype(np.int32)
    answers = [rng.integers(0, 256, size=3).astype(np.int32),
               rng.integers(0, 256, size=BUDGET).astype(np.int32)]
    for row, seen in (("full", prompts), ("local", prompts[:, -(WINDOW - BUDGET):])):
        greedy, logprob = reader.answers(row, prompts, answers)
        for b in range(2):
            tokens, lp = direct_greedy_and_logprob(model, seen[b], answers[b])
            assert greedy[b].tolist() == tokens, row
            np.testing.assert_allclose(logprob[b], lp, rtol=1e-4, atol=1e-4)


@pytest.mark.slow   # CI time: a cheaper test covers the same property in the default run
def test_memlong_answers_equal_the_scoring_path_and_shared_memory_is_exact(model):
    """The memory built once and handed to `Generator.start` gives, in every query mode, what
    generation from the whole prompt gives (an answer budget under one chunk: the generator
    splits the prompt where the reader does). causal: the teacher-forced answer also equals
    `score_sequence`'s NLL of the same tokens (prompt and answer fill the length exactly)."""
    budget, length = 3, 64
    mcfg = model.memlong_config.replace(memory_tokens=256)    # the 48-token head never evicts
    reader = recall.Reader(model, mcfg, None, WINDOW, budget)
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, 256, size=(2, length - budget)).astype(np.int32)
    answers = rng.integers(0, 256, size=(2, budget)).astype(np.int32)
    head = prompts[:, :reader.head_tokens(length)]
    assert reader.shares_memory(length) and head.shape[1] == length - WINDOW
    memory = reader.memory(head)
    for mode in QUERY_MODES:
        greedy, logprob = reader.answers(f"memlong:{mode}", prompts, list(answers), memory)
        generator = generation.Generator(model.module, reader.mode_config(mode), WINDOW)
        reference = np.stack(list(generator.tokens(model.params, prompts, budget)), axis=1)
        assert np.array_equal(greedy, reference), mode
        if mode == "causal":
            state = scan.init_state(model.module, reader.mode_config(mode), 2)
            _, nll = scan.score_sequence(model.module, reader.mode_config(mode), model.params,
                                            state, np.concatenate([prompts, answers], 1), WINDOW)
            np.testing.assert_allclose(logprob, -np.asarray(nll)[:, -budget:].sum(1),
                                       rtol=1e-4, atol=1e-4)


def test_repeat_nll_rows_equal_the_plain_forward(model):
    reader = recall.Reader(model, model.memlong_config, None, WINDOW, BUDGET)
    ids = np.random.default_rng(2).integers(0, 256, size=(2, 64)).astype(np.int32)
    passage = 12
    for row, seen in (("full", ids), ("local", ids[:, -WINDOW:])):
        logits = np.asarray(model.logits(seen), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        direct = -np.take_along_axis(logp[:, -passage:-1], seen[:, -passage + 1:, None], -1)[..., 0]
        np.testing.assert_allclose(reader.nll(row, ids, passage), direct, rtol=1e-4, atol=1e-4)


@pytest.mark.slow   # CI time: a cheaper test covers the same property in the default run
def test_block_row_with_every_block_at_true_positions_equals_full(model):
    """The block row reads through `BlockGenerator` and the block scorer: with every block
    retrieved at its true position that is plain causal attention, so its answers, answer
    log-probabilities and repeat NLL are the full row's (fp32; the joint softmax only reorders
    sums). With two blocks at one position they differ."""
    rng = np.random.default_rng(3)
    prompts = rng.integers(0, 256, size=(2, 56)).astype(np.int32)
    answers = [rng.integers(0, 256, size=3).astype(np.int32),
               rng.integers(0, 256, size=BUDGET).astype(np.int32)]
    ids = rng.integers(0, 256, size=(2, 64)).astype(np.int32)
    full = recall.Reader(model, model.memlong_config, None, WINDOW, BUDGET)
    greedy, logprob = full.answers("full", prompts, answers)
    nll = full.nll("full", ids, 12)
    block = recall.Reader(model, model.memlong_config, None, WINDOW, BUDGET, BLOCK_FULL)
    block_greedy, block_logprob = block.answers("block", prompts, answers)
    assert np.array_equal(block_greedy, greedy)
    np.testing.assert_allclose(block_logprob, logprob, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(block.nll("block", ids, 12), nll, rtol=1e-4, atol=1e-4)
    small = recall.Reader(model, model.memlong_config, None, WINDOW, BUDGET, BLOCK_SMALL)
    assert np.abs(small.nll("block", ids, 12) - nll).max() > 1e-2


@pytest.mark.slow   # CI time: a cheaper test covers the same property in the default run
def test_evaluate_runs_every_row_on_the_same_items(model):
    settings = Settings(tasks=("passkey", "repeat"), lengths=(512,), depths=(0.0, 1.0), items=1,
                        local_window=WINDOW, passage=8, max_context=256)
    results = recall.evaluate(model, settings, haystack_texts=[real_text()])
    rows = [f"memlong:{m}" for m in QUERY_MODES] + ["local", "full"]
    assert results["rows"] == rows
    passkey = [r for r in results["records"] if r["task"] == "passkey"]
    assert {r["row"] for r in passkey} == set(rows)
    answers = {(r["depth"], r["index"]): r["answer"] for r in passkey if "answer" in r}
    assert all(r.get("answer", answers[(r["depth"], r["index"])]) ==
               answers[(r["depth"], r["index"])] for r in passkey)
    full = [c for c in results["summary"] if c["row"] == "full"]
    assert full and all("n/a" in c for c in full)      # 512 > max_context 256
    repeat = [c for c in results["summary"] if c["task"] == "repeat" and "n/a" not in c]
    assert all(abs(c["copy_gain"] - (c["nll_first"] - c["nll_second"])) < 1e-9 for c in repeat)


def test_items_run_in_batches_give_the_same_records(model):
    """Batches of 4 (a full one, then a short one of 2) and 2 against all six items at once:
    same answers, log-probs and second-copy NLLs (the memory is built per batch), one timing
    per (task, length, row). One query mode: batching does not depend on it."""
    settings = Settings(tasks=("passkey", "repeat"), lengths=(512,), depths=(0.0, 0.5, 1.0),
                        items=2, rows=("memlong", "local"), query_modes=("chunk",),
                        local_window=WINDOW, passage=8, batch=6)
    key = lambda r: (r["task"], r["row"], r["depth"], r["index"])
    runs = [recall.evaluate(model, dataclasses.replace(settings, batch=b),
                            haystack_texts=[real_text()]) for b in (6, 4, 2)]
    whole = {key(r): r for r in runs[0]["records"]}
    for run_ in runs[1:]:
        assert sorted(map(key, run_["records"])) == sorted(whole)   # each item once
        for r in run_["records"]:
            w = whole[key(r)]
            assert r.get("generated") == w.get("generated")
            for field in ("logprob", "nll_second", "nll_first"):
                if field in w:
                    assert abs(r[field] - w[field]) < 1e-4, (field, r, w)
        assert sorted((t["task"], t["row"]) for t in run_["timing"]) == \
            sorted((t["task"], t["row"]) for t in runs[0]["timing"])


def test_block_row_in_evaluate_and_results_saved_after_every_cell(model):
    settings = Settings(tasks=("repeat",), lengths=(64, 128), items=1, rows=("local", "block"),
                        local_window=WINDOW, passage=8, block=BLOCK_SMALL)
    saved = []
    results = recall.evaluate(model, settings, haystack_texts=[real_text()],
                              on_cell=lambda partial: saved.append(len(partial["records"])))
    assert results["rows"] == ["local", "block"]
    assert {(c["row"], c["length"]) for c in results["summary"]} == \
        {(r, n) for r in ("local", "block") for n in (64, 128)}
    assert all(np.isfinite(c["copy_gain"]) for c in results["summary"])
    assert saved == [2, 4]   # repeat: after each length, once the first copy is scored


# ---- SmolLM2 on real text (slow) -------------------------------------------------------------

@pytest.mark.slow
def test_full_copies_the_repeated_passage_and_local_cannot(smollm2_converted):
    data = os.path.join(SHARED_DATA, "pg19_like")
    if not os.path.isdir(data):
        pytest.skip(f"{data} absent")
    model = ml.load(smollm2_converted)
    settings = Settings(tasks=("repeat",), lengths=(2048,), items=1, rows=("local", "full"),
                        local_window=1024, passage=256)
    texts = [open(os.path.join(data, "jane_eyre.txt")).read()]
    summary = recall.evaluate(model, settings, haystack_texts=texts)["summary"]
    gain = {c["row"]: c["copy_gain"] for c in summary}
    assert gain["full"] > 2.0 and abs(gain["local"]) < 0.3, gain


# ---- the command line ------------------------------------------------------------------------

def run(argv, capsys):
    code = run_cli(recall_main, argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def haystack_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hay") / "book.txt"
    path.write_text(real_text())
    return str(path)


def test_cli_writes_table_json_csv_and_heatmap(tiny_checkpoint, haystack_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r"
    code, stdout, err = run([tiny_checkpoint, "--lengths", "512", "--depths", "0,100",
                             "--tasks", "passkey,needle,repeat", "--local-window", "16",
                             "--passage", "8", "--haystack", haystack_file, "-q",
                             "--set", "memory_tokens=1024",
                             "--json", f"{out}.json", "--csv", f"{out}.csv",
                             "--plot", f"{out}.png"], capsys)
    assert code == 0, err
    assert "passkey: exact-match accuracy" in stdout and "repeat: copy gain" in stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["config"]["git"]["commit"] and data["config"]["versions"]["jax"]
    assert data["config"]["memlong"]["memory_tokens"] == 1024
    assert {c["task"] for c in data["summary"]} == {"passkey", "needle", "repeat"}
    assert (tmp_path / "r.csv").read_text().startswith("task,row,length,depth")
    assert (tmp_path / "r.png").stat().st_size > 0
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.json", "r.png"]


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "passkey,sing"], "unknown task sing"),
    (["--rows", "memlong,half"], "unknown row half"),
    (["--query-modes", "psychic"], "unknown query mode psychic"),
    (["--depths", "50,150"], "depths must lie in 0..100%"),
    (["--depths", "middle"], "--depths needs comma-separated percentages"),
    (["--lengths", "514"], "not a positive multiple of the chunk size"),
    (["--items", "0"], "--items must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--tasks", "repeat", "--lengths", "512", "--passage", "300"], "passage must be"),
    (["--tasks", "repeat", "--haystack", "/nonexistent/book.txt"], "no such file"),
    (["--set", "top_k=many"], "top_k"),
    (["--rows", "block", "--block", "top_k=many"], "top_k"),
    (["--rows", "block", "--block", "chunk=256", "--lengths", "128"],
     "not a multiple of the block memory's chunk"),
    (["--tasks", "passkey", "--rows", "block", "--block", "window=100"],
     "multiple of block_size"),
    (["--plot", "OUT.gif"], "use a .png"),
    (["--json", "/nonexistent/dir/r.json"], "no such directory"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_checkpoint, haystack_file,
                                                          tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "r")) for a in argv]
    outputs = ["--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]
    # a haystack of its own: the default one (../shared/data) may be absent
    code, stdout, err = run([tiny_checkpoint, "--local-window", "16", "-q",
                             "--haystack", haystack_file, *argv,
                             *([] if "--json" in argv else outputs)], capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert os.listdir(tmp_path) == []


def test_reader_memory_in_host_blocks_is_the_whole_prefix_ingested_at_once(model):
    """The reader feeds a long head in host blocks (3 chunks here, not whole 16-token windows)
    with the previous block's tail as `prefix_overlap` context: the memory equals one
    `ingest_prefix` call over the whole head."""
    mcfg = model.memlong_config.replace(prefix_context="window", prefix_overlap=1,
                                        memory_kv="per_layer", host_block_chunks=3,
                                        memory_tokens=256)
    reader = recall.Reader(model, mcfg, None, WINDOW, BUDGET)
    head = np.random.default_rng(3).integers(0, 256, size=(2, 56)).astype(np.int32)
    got = reader.memory(head)
    state = scan.init_state(model.module, mcfg, 2)
    want = scan.ingest_prefix(model.module, mcfg, model.params, state, head, window=WINDOW)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=1e-5)
