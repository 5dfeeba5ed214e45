"""Retrieval backends: device top-k and exact FAISS pick the same chunks; approximate ones mostly."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlong_jax.llama.config import ConfigError
from memlong_jax.memlong import memory as M
from memlong_jax.memlong import retrieval as R

EXACT = ("device", "faiss")
SMALL_IVF = R.FaissSearch("IVF16,Flat", "nprobe=4")  # too few vectors to train here: exact


def unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_top_k(emb, valid, query, k):
    """Per row, the set of top-k valid slots by (float64 score desc, slot asc)."""
    out = []
    for e, v, q in zip(*map(np.asarray, (emb, valid, query))):
        slots = np.flatnonzero(v)
        scores = e[slots].astype(np.float64) @ q.astype(np.float64)
        out.append(set(slots[np.lexsort((slots, -scores))[:k]].tolist()))
    return out


def found_sets(indices, found):
    return [set(np.asarray(i)[np.asarray(f)].tolist()) for i, f in zip(indices, found)]


def tied_memory(rng, batch, capacity, dim, k, fills):
    """Random unit embeddings; in each row a group of 4 identical vectors straddles the k-th place."""
    emb, query = unit(rng, batch, capacity, dim), unit(rng, batch, dim)
    valid = np.zeros((batch, capacity), bool)
    for row, fill in enumerate(fills):
        slots = rng.permutation(capacity)[:fill]
        valid[row, slots] = True
        if fill >= k + 3:
            ranked = slots[np.argsort(-(emb[row, slots] @ query[row]))]
            emb[row, ranked[-3:]] = emb[row, ranked[k - 2]]  # ranks k-2 .. k+1 tie
    return emb, valid, query


@pytest.fixture(scope="module")
def retrieve_jit():
    return jax.jit(R.retrieve, static_argnums=(0, 4))


def test_exact_backends_agree_inside_jit(retrieve_jit):
    rng = np.random.default_rng(0)
    k = 6
    emb, valid, query = tied_memory(rng, 5, 48, 32, k, fills=[48, 30, 9, 4, 0])
    expected = reference_top_k(emb, valid, query, k)
    assert [len(s) for s in expected] == [6, 6, 6, 4, 0]
    for backend in EXACT + (SMALL_IVF,):
        indices, found = retrieve_jit(backend, emb, valid, query, k)
        assert indices.shape == (5, k) and indices.dtype == jnp.int32
        assert found_sets(indices, found) == expected, backend
        np.testing.assert_array_equal(found.sum(axis=1), [6, 6, 6, 4, 0])
        assert not np.asarray(indices)[~np.asarray(found)].any()  # not-found picks carry 0


def test_exact_ties_go_to_the_lowest_slots(retrieve_jit):
    """Repeated text gives identical embeddings: wherever they sit, the lowest slots win.

    300 slots: XLA's CPU matmul scores some identical rows differently by an ulp (position
    dependent), which would pick later copies; the device backend must not use it.
    """
    rng = np.random.default_rng(1)
    batch, capacity = 8, 300
    emb, query = unit(rng, batch, capacity, 16), unit(rng, batch, 16)
    expected = []
    for row in range(batch):
        copies = np.concatenate([rng.permutation(290)[:140] + 5, np.arange(295, 300)])
        emb[row, copies] = emb[row, copies[0]]
        query[row] += 5 * emb[row, copies[0]]  # the copies are the best match
        expected.append(set(sorted(copies)[:5]))
    for backend in EXACT:
        indices, found = retrieve_jit(backend, emb, np.ones((batch, capacity), bool), query, 5)
        assert found_sets(indices, found) == expected, backend


def test_exact_backends_agree_inside_scan():
    """A scan of retrieve (both backends), count hits, write over a growing memory."""
    rng = np.random.default_rng(2)
    batch, steps, capacity, dim, k = 2, 14, 8, 24, 3
    mem = M.init_memory(batch, capacity, 2, 1, 4, dim, jnp.float32)
    emb = unit(rng, steps, batch, dim)
    emb[5:9, 1] = emb[4, 1]  # repeated text in row 1: exact ties
    kv = rng.standard_normal((steps, batch, 2, 1, 4)).astype(np.float32)
    queries = unit(rng, steps, batch, dim)

    def step(m, xs):
        e, kv, q = xs
        picks = [R.retrieve(b, m.emb, m.valid, q, k) for b in EXACT]
        m = M.count_hits(m, *picks[0])
        return M.write_chunk(m, kv, kv, e, "paper"), (picks, m.emb, m.valid)

    _, (picks, mems, valids) = jax.jit(lambda m: jax.lax.scan(step, m, (emb, kv, queries)))(mem)
    (dev_i, dev_f), (fai_i, fai_f) = picks
    assert not dev_f[0].any() and not fai_f[0].any()  # the first step sees an empty memory
    for t in range(steps):
        expected = reference_top_k(mems[t], valids[t], queries[t], k)
        assert found_sets(dev_i[t], dev_f[t]) == expected
        assert found_sets(fai_i[t], fai_f[t]) == expected
    assert int(dev_f[1].sum()) == batch and int(dev_f[-1].sum()) == batch * k


def test_vmap_over_queries_and_gradients():
    rng = np.random.default_rng(3)
    emb, valid, _ = tied_memory(rng, 2, 16, 8, 4, fills=[16, 5])
    queries = unit(rng, 7, 2, 8)
    picked = {b: jax.jit(jax.vmap(lambda q, b=b: R.retrieve(b, emb, valid, q, 4)))(queries)
              for b in EXACT}
    for v in range(7):
        expected = reference_top_k(emb, valid, queries[v], 4)
        for b in EXACT:
            assert found_sets(picked[b][0][v], picked[b][1][v]) == expected, b

    def loss(q, e):  # retrieval sits in a differentiated function: the callback is cut off
        indices, found = R.retrieve("faiss", e, valid, q, 4)
        return jnp.sum(q * q) + jnp.sum(e[0, indices[0]] * found[0][:, None])

    grad_q, grad_e = jax.jit(jax.grad(loss, argnums=(0, 1)))(queries[0], emb)
    np.testing.assert_allclose(grad_q, 2 * queries[0], rtol=1e-6)
    assert int((np.abs(grad_e[0]).sum(axis=1) > 0).sum()) == 4


@pytest.mark.parametrize("backend, threshold", [
    (R.BACKENDS["faiss-hnsw"], 0.9),
    (R.FaissSearch("IVF16,Flat", "nprobe=4"), 0.6),
])
def test_approximate_index_recall(backend, threshold, retrieve_jit):
    rng = np.random.default_rng(4)
    batch, capacity, dim, k, n_queries = 2, 1500, 32, 10, 8
    centers = unit(rng, 64, dim)  # clustered like real text embeddings
    emb = centers[rng.integers(0, 64, (batch, capacity))] + 0.3 * unit(rng, batch, capacity, dim)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    valid = rng.random((batch, capacity)) < 0.9
    queries = unit(rng, n_queries, batch, dim)
    search = jax.jit(jax.vmap(lambda q: R.retrieve(backend, emb, valid, q, k)))
    indices, found = search(queries)
    recalls = [len(found_sets(indices[v], found[v])[b] & expected) / k
               for v in range(n_queries)
               for b, expected in enumerate(reference_top_k(emb, valid, queries[v], k))]
    assert np.mean(recalls) >= threshold, np.mean(recalls)
    assert found.all() and np.asarray(valid)[np.arange(batch)[:, None], indices].all()


def test_approximate_index_is_reused_until_the_memory_changes(monkeypatch):
    rng = np.random.default_rng(5)
    builds = []
    build = R.FaissSearch._build
    monkeypatch.setattr(R.FaissSearch, "_build", lambda self, x: builds.append(len(x))
                        or build(self, x))
    backend = R.FaissSearch("HNSW16", "efSearch=32")
    emb, valid, query = unit(rng, 1, 64, 16), np.ones((1, 64), bool), unit(rng, 1, 16)
    search = jax.jit(lambda e, v, q: R.retrieve(backend, e, v, q, 3))
    first = search(emb, valid, query)
    again = search(emb, valid, query)
    np.testing.assert_array_equal(first[0], again[0])
    assert builds == [64]
    emb[0, 17] = query[0]  # a new chunk that matches the query exactly
    indices, found = search(emb, valid, query)
    assert builds == [64, 64] and int(indices[0, 0]) == 17 and found.all()
    valid[0, 17] = False  # evicted: the cached index must not return it
    indices, found = search(emb, valid, query)
    assert builds == [64, 64, 63] and 17 not in np.asarray(indices[0])


def test_bad_arguments(retrieve_jit):
    rng = np.random.default_rng(6)
    emb, valid, query = unit(rng, 2, 8, 4), np.ones((2, 8), bool), unit(rng, 2, 4)
    with pytest.raises(ConfigError, match="backend"):
        R.retrieve("annoy", emb, valid, query, 2)
    for k in (0, 9):
        with pytest.raises(ConfigError, match="k must be"):
            R.retrieve("device", emb, valid, query, k)
    with pytest.raises(ValueError, match="query"):
        R.retrieve("faiss", emb, valid, query[:, :3], 2)
    with pytest.raises(ConfigError, match="NotAnIndex"):
        R.retrieve(R.FaissSearch("NotAnIndex"), emb, valid, query, 2)
    with pytest.raises(ConfigError, match="efSerch"):
        R.retrieve(R.FaissSearch("HNSW8", "efSerch=3"), emb, valid, query, 2)


def test_faiss_is_imported_only_by_the_faiss_backends():
    """GPU machines without faiss run the device backend: nothing else may import it."""
    import subprocess
    import sys
    code = ("import sys, memlong_jax.memlong.scan, memlong_jax.eval.scoring, train.run; "
            "assert 'faiss' not in sys.modules, 'faiss imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))
