"""In-context learning with demonstrations in memory (`memlong_jax.eval.icl`): prompts, sampling,
label scoring against the model's own logits, batching, the command line."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import SHARED_DATA, byte_tokenizer, reference_score
import memlong_jax as ml
from memlong_jax.errors import run_cli
from memlong_jax.cli.icl import main as icl_main
from memlong_jax.eval import icl
from memlong_jax.memlong import scan
from memlong_jax.memlong.retrievers import make_retriever


SST2 = icl.TASKS["sst-2"]
WORDS = "a fine film . dull and slow , great fun ; awful plot !".split()


def write_task(root, name, labels, n_train=14, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root / name, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"text": " ".join(rng.choice(WORDS, rng.integers(1, 6))),
                 "label": labels[i % len(labels)]} for i in range(n)]
        (root / name / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("icl")
    write_task(root, "sst-2", SST2.labels)
    return root


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return ml.load(tiny_checkpoint)


def decode(ids):
    return byte_tokenizer().decode(np.asarray(ids).tolist())


def groups_of(model, data_dir, **settings):
    settings = icl.Settings(**{"tasks": ("sst-2",), "ks": (2,), "ms": (3,), "seeds": (1,),
                               "limit": 4, **settings})
    data = icl.load_data(str(data_dir), settings)[0]
    groups = icl.build_groups(model.tokenizer, model.memlong_config.chunk_size, data, settings,
                              None)
    return data, {(g.row, g.k, g.m, g.seed): g for g in groups}


# --- prompts, labels, sampling -------------------------------------------------------------------

def test_templates_and_label_tokens_are_exact():
    assert SST2.demonstration("a fine film .", "positive") == \
        "Review: a fine film . Sentiment: positive. "
    assert SST2.query("dull .") == "Review: dull . Sentiment:"
    assert SST2.prompt([("good", "positive"), ("bad", "negative")], "ok") == \
        "Review: good Sentiment: positive. Review: bad Sentiment: negative. Review: ok Sentiment:"
    assert icl.TASKS["subj"].prompt([("x", "objective")], "y") == \
        "Input: x Type: objective. Input: y Type:"
    assert icl.TASKS["sst-5"].labels == ("terrible", "bad", "okay", "good", "great")
    assert [icl.TASKS[t].labels for t in ("mr", "mpqa")] == [("negative", "positive")] * 2
    tokenizer = byte_tokenizer()
    labels = icl.label_token_ids(tokenizer, SST2)
    assert [decode(t) for t in labels] == [" negative", " positive"]
    # The label continues the query exactly as the joint tokenisation would have it.
    query = tokenizer.encode(SST2.query("dull .")).ids
    assert tokenizer.encode(SST2.query("dull .") + " positive").ids == query + labels[1].tolist()


def test_memory_rule_buckets_and_sampling():
    np.testing.assert_array_equal(icl.memory_tokens(np.arange(10), 4), np.arange(2, 10))
    assert len(icl.memory_tokens(np.arange(3), 4)) == 0
    assert [icl.bucket(n) for n in (1, 5, 8, 9, 10, 11, 165, 700, 1900)] == \
        [1, 5, 8, 10, 10, 12, 192, 768, 2048]
    assert icl.bucket(3, 16) == 16
    context4 = icl.context_indices(SST2, 1, 100, 4)
    np.testing.assert_array_equal(icl.context_indices(SST2, 1, 100, 20)[:4], context4)
    assert not np.array_equal(icl.context_indices(SST2, 2, 100, 4), context4)
    mem = icl.memory_indices(SST2, 1, 7, 100, 38, context4)
    assert len(set(mem.tolist())) == 38 and not set(mem.tolist()) & set(context4.tolist())
    np.testing.assert_array_equal(icl.memory_indices(SST2, 1, 7, 100, 18, context4), mem[:18])
    assert not np.array_equal(icl.memory_indices(SST2, 1, 8, 100, 18, context4), mem[:18])
    items = icl.scored_items(SST2, 50, 10)
    assert len(items) == 10 and list(items) == sorted(set(items.tolist()))
    np.testing.assert_array_equal(icl.scored_items(SST2, 50, 10), items)
    np.testing.assert_array_equal(icl.scored_items(SST2, 50, None), np.arange(50))


def test_queries_hold_the_exact_prompts(model, data_dir):
    data, groups = groups_of(model, data_dir, rows=icl.ROWS, ms=(3,))
    tau = model.memlong_config.chunk_size
    context = [data.train[i] for i in icl.context_indices(SST2, 1, len(data.train), 2)]
    local, mem, full = (groups[(row, 2, m, 1)].queries
                        for row, m in (("local", 0), ("memlong", 3), ("full", 3)))
    for n, item in enumerate(data.items):
        prompt = SST2.prompt(context, data.test[item].text)
        assert decode(local[n].window) == prompt and len(local[n].memory) == 0
        chosen = icl.memory_indices(SST2, 1, item, len(data.train), 3,
                                    icl.context_indices(SST2, 1, len(data.train), 2))
        stream = "".join(SST2.demonstration(*data.train[i]) for i in chosen)
        assert decode(mem[n].window) == prompt
        assert decode(mem[n].memory) == stream[len(stream) % tau:]   # byte tokens: 1 per char
        assert len(mem[n].memory) % tau == 0
        assert decode(full[n].window) == stream + prompt and len(full[n].memory) == 0


# --- scoring -------------------------------------------------------------------------------------

_SCORERS: dict = {}


def scorer_for(model, mcfg=None, encoder=None, batch_size=4):
    """One scorer per MemLong setting for the whole module, so compiled shapes are shared."""
    mcfg = mcfg or model.memlong_config
    key = (mcfg.replace(memory_tokens=mcfg.chunk_size), encoder is not None)
    if key not in _SCORERS:
        _SCORERS[key] = icl.ICLScorer(model.module, model.params, mcfg,
                                      make_retriever(mcfg, model.tokenizer, encoder),
                                      capacity_chunks=128)
    _SCORERS[key].batch_size = batch_size
    return _SCORERS[key]


def direct_label_scores(model, windows, labels, shape=(12, 384)):
    """Summed log-probs of each label's tokens after each window, and the argmax next token,
    from the plain model's logits (rows right-padded to one shape: one compilation)."""
    rows = [np.concatenate([w, t]) for w in windows for t in labels]
    ids = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
    logp = np.asarray(jax.nn.log_softmax(model.logits(ids).astype(jnp.float32), axis=-1))
    scores = np.zeros((len(windows), len(labels)))
    argmax = np.zeros(len(windows), int)
    for r, (w, t) in enumerate((w, t) for w in windows for t in labels):
        n, j = divmod(r, len(labels))
        scores[n, j] = logp[r, np.arange(len(w) - 1, len(w) - 1 + len(t)), t].sum()
        argmax[n] = logp[r, len(w) - 1].argmax()
    return scores, argmax


@pytest.mark.parametrize("row", ["local", "full"])
def test_label_scores_equal_the_model_logits(model, data_dir, row):
    _, groups = groups_of(model, data_dir, rows=icl.ROWS)
    queries = groups[(row, 2, 0 if row == "local" else 3, 1)].queries
    scorer = scorer_for(model)
    single = [np.asarray([ord("+")]), np.asarray([ord("-")]), np.asarray([5])]
    for labels in (icl.label_token_ids(model.tokenizer, SST2), single):
        scores, argmax = scorer.score(queries, labels)
        expected, expected_argmax = direct_label_scores(model, [q.window for q in queries],
                                                        labels)
        np.testing.assert_allclose(scores, expected, atol=2e-4, rtol=1e-5)
        np.testing.assert_array_equal(argmax, expected_argmax)


def test_memlong_with_m_0_is_local_exactly_and_memory_matters(model, data_dir):
    _, groups = groups_of(model, data_dir, rows=("memlong", "local"), ms=(6, 0))
    scorer = scorer_for(model)
    labels = icl.label_token_ids(model.tokenizer, SST2)
    local, local_argmax = scorer.score(groups[("local", 2, 0, 1)].queries, labels)
    zero, zero_argmax = scorer.score(groups[("memlong", 2, 0, 1)].queries, labels)
    np.testing.assert_array_equal(zero, local)
    np.testing.assert_array_equal(zero_argmax, local_argmax)
    with_memory, _ = scorer.score(groups[("memlong", 2, 6, 1)].queries, labels)
    assert np.abs(with_memory - local).max() > 1e-3


def test_memlong_scores_equal_score_sequence_of_each_item(model, data_dir):
    """The batched path (left-padded memory chunks made empty, right-padded windows) against
    `scan.score_sequence` of each padded item's own memory stream + prompt."""
    _, groups = groups_of(model, data_dir, rows=("memlong",), ms=(6,))
    queries = groups[("memlong", 2, 6, 1)].queries
    cut = (40, 8, 40, 8)   # memory lengths in tokens: 2 chunks padded to 10 in the batch
    queries = [q._replace(memory=q.memory[-n:]) for q, n in zip(queries, cut)]
    # Nothing evicted; top-6 of at most 2 real chunks: any padding chunk left valid would show.
    mcfg = model.memlong_config.replace(memory_tokens=512, top_k=6)
    tau = mcfg.chunk_size
    labels = [np.asarray([ord("+")]), np.asarray([ord("-")])]
    scores, _ = scorer_for(model, mcfg).score(queries, labels)
    window = -(-max(len(q.window) for q in queries) // tau) * tau
    rows = [1, 3]   # the padded ones; alone, each is its 8 memory tokens + prompt, unpadded
    ids = np.zeros((len(rows), 8 + window), np.int32)
    for r, n in enumerate(rows):
        ids[r, :8 + len(queries[n].window)] = np.concatenate([queries[n].memory,
                                                              queries[n].window])
    state = scan.init_state(model.module, mcfg, len(rows))
    _, _, logits = reference_score(model.module, mcfg, model.params, state,
                                   jnp.asarray(ids), window)
    for r, n in enumerate(rows):
        logp = jax.nn.log_softmax(jnp.asarray(logits[r, len(queries[n].window) - 1],
                                              jnp.float32))
        np.testing.assert_allclose(scores[n], np.asarray(logp)[[ord("+"), ord("-")]],
                                   atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("setting", [{"query_mode": "segment"},
                                     {"retriever": "text", "query_mode": "segment"}])
def test_batching_does_not_change_memlong_scores(model, data_dir, setting):
    """Rows padded differently (batches of 4 and of 2) score the same; the causal in-graph
    retriever is checked against score_sequence above. Segment mode: the query comes from the
    real prompt tokens only; text retriever: each row's key embeddings land on its own chunks."""
    _, groups = groups_of(model, data_dir, rows=("memlong",), ms=(6,))
    queries = groups[("memlong", 2, 6, 1)].queries
    queries[0] = queries[0]._replace(memory=queries[0].memory[:0])
    assert len({len(q.memory) for q in queries}) > 2 and len({len(q.window) for q in queries}) > 2
    mcfg = model.memlong_config.replace(top_k=6, **setting)   # padding would be retrieved
    encoder = None
    if setting.get("retriever") == "text":
        from memlong_jax.memlong.retrievers.text_encoder import load_text_encoder
        encoder = load_text_encoder()
    labels = icl.label_token_ids(model.tokenizer, SST2)
    one, one_argmax = scorer_for(model, mcfg, encoder, batch_size=4).score(queries, labels)
    two, two_argmax = scorer_for(model, mcfg, encoder, batch_size=2).score(queries, labels)
    np.testing.assert_allclose(one, two, atol=1e-5)
    np.testing.assert_array_equal(one_argmax, two_argmax)


# --- the shared demonstration prefix, run once --------------------------------------------------

def test_shared_prefix_is_the_common_start_of_the_windows():
    a = np.asarray([5, 6, 7, 8, 9, 1])
    assert icl.shared_prefix([a, np.asarray([5, 6, 7, 8, 2, 3])]) == 4
    assert icl.shared_prefix([a, a.copy()]) == 5           # each keeps one token of its own
    assert icl.shared_prefix([a, np.asarray([5, 6, 7, 1])]) == 3
    assert icl.shared_prefix([a, np.asarray([5, 6, 1, 1, 1, 1, 1])]) == 0   # under half


_PREFIX_SCORERS: dict = {}


def prefix_scorers(model, setting):
    """(new, reference): the same scorer with and without the shared prefix, per setting."""
    key = tuple(sorted(setting.items()))
    if key not in _PREFIX_SCORERS:
        mcfg = model.memlong_config.replace(**setting)
        _PREFIX_SCORERS[key] = tuple(
            icl.ICLScorer(model.module, model.params, mcfg, capacity_chunks=64, batch_size=2,
                          share_prefix=share) for share in (True, False))
    return _PREFIX_SCORERS[key]


@pytest.mark.parametrize("row, setting", [("local", {}), ("memlong", {}),
                                          ("memlong", {"query_mode": "segment"}), ("full", {})])
def test_shared_prefix_scores_equal_the_per_item_path(model, data_dir, row, setting):
    """Every k group scored with the demonstrations run once equals each window run
    whole, one group after another through one scorer (a prefix kept from the group before
    would show), in batches of 2 whose windows after the prefix differ in length, for one-token
    and multi-token labels. `full` windows start with each item's own memory: nothing shared."""
    m = 0 if row == "local" else 6
    _, groups = groups_of(model, data_dir, rows=(row,), ks=(2, 4), ms=(m,))
    new, reference = prefix_scorers(model, setting)
    labels_sets = (icl.label_token_ids(model.tokenizer, SST2),
                   [np.asarray([ord("+")]), np.asarray([ord("-")]), np.asarray([5])])
    for group in groups.values():
        windows = [q.window for q in group.queries]
        shared = icl.shared_prefix(windows)
        assert (shared == 0) if row == "full" else (shared > len(windows[0]) // 2), shared
        assert len({len(w) - shared for w in windows}) > 1
        for labels in labels_sets[:1] if row == "full" else labels_sets:
            scores, argmax = new.score(group.queries, labels)
            expected, expected_argmax = reference.score(group.queries, labels)
            np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=1e-5)
            np.testing.assert_array_equal(argmax, expected_argmax)
        if row != "full":   # the prefix was run and kept
            assert new._last_prefix[1] == shared


# --- the command line ----------------------------------------------------------------------------

def run(argv, capsys):
    code = run_cli(icl_main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_table_json_and_csv(tiny_checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, stderr = run([tiny_checkpoint, "--data", str(data_dir), "--tasks", "sst-2",
                                "--k", "2", "--m", "3", "--seeds", "1,2", "--limit", "4",
                                "--max-context", "60", "--json", str(out / "r.json"),
                                "--csv", str(out / "r.csv"), "-q"], capsys)
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["r.csv", "r.json"]
    results = json.loads((out / "r.json").read_text())
    assert results["config"]["seeds"] == [1, 2] and results["config"]["limit"] == 4
    assert {t: len(i) for t, i in results["items"].items()} == {"sst-2": 4}
    assert len(results["runs"]) == 3 * 2 and len(results["summary"]) == 3
    for cell in results["summary"]:
        runs = [r for r in results["runs"] if (r["task"], r["row"], r["k"], r["m"]) ==
                (cell["task"], cell["row"], cell["k"], cell["m"])]
        if cell["row"] == "full":   # every full input passes --max-context 60: n/a
            assert cell["accuracy_mean"] is None and all("n/a" in r for r in runs)
            continue
        assert cell["accuracy_mean"] == pytest.approx(np.mean([r["accuracy"] for r in runs]))
        assert cell["accuracy_std"] == pytest.approx(np.std([r["accuracy"] for r in runs]))
        task = icl.TASKS[cell["task"]]
        test = icl.load_split(str(data_dir), task, "test")
        gold = [test[i].label for i in results["items"][cell["task"]]]
        for r in runs:
            assert r["items"] == 4 and len(r["predictions"]) == 4
            assert r["accuracy"] == pytest.approx(np.mean(
                [task.labels[p] == g for p, g in zip(r["predictions"], gold)]))
    with open(out / "r.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["task"], r["row"]) for r in table] == [(c["task"], c["row"])
                                                      for c in results["summary"]]
    assert "memlong m=3" in stdout and "local" in stdout and "n/a" in stdout
    assert "argmax-next-token" in stdout


@pytest.mark.parametrize("extra, damage, words", [
    (["--tasks", "sst-2,sst-7"], None, "unknown task 'sst-7'"),
    ([], "missing", "no such file"),
    (["--k", "15"], None, "k=15 is larger than the train split of sst-2 (14 examples)"),
    (["--k", "4", "--m", "11"], None, "more than the train split"),
    (["--rows", "memlong,fancy"], None, "unknown row fancy"),
    (["--k", "four"], None, "--k needs comma-separated integers"),
    (["--limit", "0"], None, "--limit must be at least 1"),
    ([], "label", "label 'meh' is not one of negative, positive"),
    ([], "json", "not valid JSON"),
    (["--data", "nowhere"], None, "no such ICL data directory"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_checkpoint, data_dir, tmp_path, capsys,
                                                  extra, damage, words):
    data = tmp_path / "data"
    write_task(data, "sst-2", SST2.labels)
    if damage == "missing":
        os.remove(data / "sst-2" / "test.jsonl")
    elif damage == "label":
        with open(data / "sst-2" / "train.jsonl", "a") as f:
            f.write(json.dumps({"text": "x", "label": "meh"}) + "\n")
    elif damage == "json":
        with open(data / "sst-2" / "test.jsonl", "a") as f:
            f.write("{oops\n")
    out = tmp_path / "out"
    out.mkdir()
    argv = [tiny_checkpoint, "--data", str(data), "--tasks", "sst-2", "--k", "2", "--m", "3",
            "--json", str(out / "r.json"), "-q", *extra]
    code, _, stderr = run([a.replace("nowhere", str(tmp_path / "nowhere")) for a in argv], capsys)
    assert code == 2
    assert stderr.startswith("error:") and stderr.count("\n") == 1 and words in stderr, stderr
    assert os.listdir(out) == []


def test_shared_icl_data_loads():
    root = os.path.join(SHARED_DATA, "icl")
    if not os.path.isdir(root):
        pytest.skip(f"shared ICL data not found at {root}")
    sizes = {"sst-2": (6920, 872), "sst-5": (8544, 1101), "mr": (8662, 2000),
             "subj": (8000, 2000), "mpqa": (8603, 2000)}
    for name, (n_train, n_test) in sizes.items():
        task = icl.TASKS[name]
        train, test = icl.load_split(root, task, "train"), icl.load_split(root, task, "test")
        assert (len(train), len(test)) == (n_train, n_test)
        assert {e.label for e in test} == set(task.labels)


def test_default_data_is_the_shared_icl_directory():
    """`--data`'s default finds ../shared/data/icl from wherever the package sits."""
    if not os.path.isdir(os.path.join(SHARED_DATA, "icl")):
        pytest.skip(f"{SHARED_DATA}/icl is absent")
    assert os.path.samefile(icl.DEFAULT_DATA, os.path.join(SHARED_DATA, "icl"))
