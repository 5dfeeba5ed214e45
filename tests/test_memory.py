"""The external memory: eviction policies against a slow reference, write/gather, jit and scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memlong_jax.llama.config import ConfigError
from memlong_jax.memlong import memory as M

TAU, N_KV, HEAD_DIM, EMB_DIM = 3, 2, 4, 5

write = jax.jit(M.write_chunk, static_argnames="policy")
evict = jax.jit(M.evict, static_argnames="policy")
count_hits = jax.jit(M.count_hits)
reset_rows = jax.jit(M.reset_rows)


# ---- slow reference: the rule exactly as upstream's dead code words it -------------------------

def reference_survivors(time, hits, policy):
    """Slots kept when a full row {slot: insert time} with {slot: hit count} is evicted."""
    order = sorted(time, key=time.get)  # oldest first
    n = len(order)
    if policy == "fifo_half":
        return set(order[n - n // 2:])
    before, upper = int(n * 10 / 100), int(n * 90 / 100)
    deleted = set(order[:before])
    middle = order[before:upper]
    for count in sorted({hits[s] for s in middle}):
        if len(deleted) >= n // 2:
            break
        deleted |= {s for s in middle if hits[s] == count}
    return set(order) - deleted


class ReferenceMemory:
    """Per row: {slot: [insert time, hits, tag]} and a clock, as plain Python."""

    def __init__(self, batch, capacity, policy):
        self.capacity, self.policy = capacity, policy
        self.rows = [{} for _ in range(batch)]
        self.clock = [0] * batch

    def write(self, row, tag):
        chunks = self.rows[row]
        if len(chunks) == self.capacity:
            keep = reference_survivors({s: c[0] for s, c in chunks.items()},
                                       {s: c[1] for s, c in chunks.items()}, self.policy)
            self.rows[row] = chunks = {s: c for s, c in chunks.items() if s in keep}
        slot = min(set(range(self.capacity)) - set(chunks))
        chunks[slot] = [self.clock[row], 0, tag]
        self.clock[row] += 1

    def count_hits(self, indices, found):
        for row, (idx, fnd) in enumerate(zip(indices, found)):
            for slot, f in zip(idx, fnd):
                if f and slot in self.rows[row]:
                    self.rows[row][slot][1] += 1

    def reset(self, row):
        self.rows[row], self.clock[row] = {}, 0

    def assert_matches(self, mem):
        valid, time, hits = map(np.asarray, (mem.valid, mem.insert_time, mem.hits))
        tags = np.asarray(mem.emb[..., 0])
        for row, chunks in enumerate(self.rows):
            assert set(np.flatnonzero(valid[row])) == set(chunks)
            for slot, (t, h, tag) in chunks.items():
                assert (time[row, slot], hits[row, slot], tags[row, slot]) == (t, h, tag)
        assert list(np.asarray(mem.clock)) == self.clock


def random_chunk(rng, batch, tags=None):
    keys = rng.standard_normal((batch, TAU, N_KV, HEAD_DIM), np.float32)
    values = rng.standard_normal((batch, TAU, N_KV, HEAD_DIM), np.float32)
    emb = rng.standard_normal((batch, EMB_DIM), np.float32)
    if tags is not None:
        emb[:, 0] = tags  # small integers: exact in float32, identify chunks after eviction
    return keys, values, emb


def full_memory(rng, time, hits, mem_dtype=jnp.float32):
    """A memory whose rows are full, with the given insert times and hit counts `[B, C]`."""
    batch, capacity = time.shape
    mem = M.init_memory(batch, capacity, TAU, N_KV, HEAD_DIM, EMB_DIM, mem_dtype)
    keys = rng.standard_normal(mem.keys.shape, np.float32)
    return mem.replace(keys=jnp.asarray(keys, mem_dtype), valid=jnp.ones((batch, capacity), bool),
                       insert_time=jnp.asarray(time, jnp.int32), hits=jnp.asarray(hits, jnp.int32),
                       clock=jnp.asarray(time.max(axis=1) + 1, jnp.int32))


# ---- eviction ----------------------------------------------------------------------------------

def test_paper_eviction_hand_example():
    # n=10: drop the oldest 1, keep the newest 1, target 5. Middle hits by age: 3 0 1 0 2 1 0 5.
    # Count 0 goes (ages 2, 4, 7: 4 gone), then count 1 (ages 3, 6: 6 gone >= 5), then stop.
    hits_by_age = np.array([7, 3, 0, 1, 0, 2, 1, 0, 5, 0])
    slot_of_age = np.random.default_rng(0).permutation(10)
    time, hits = np.empty((1, 10), int), np.empty((1, 10), int)
    time[0, slot_of_age], hits[0, slot_of_age] = np.arange(10), hits_by_age
    mem = evict(full_memory(np.random.default_rng(1), time, hits), policy="paper")
    assert set(np.flatnonzero(mem.valid[0])) == set(slot_of_age[[1, 5, 8, 9]])
    assert reference_survivors(dict(enumerate(time[0])), dict(enumerate(hits[0])),
                               "paper") == set(slot_of_age[[1, 5, 8, 9]])
    kept = np.asarray(mem.valid[0])
    np.testing.assert_array_equal(mem.hits[0][kept], hits[0][kept])  # survivors keep counters
    np.testing.assert_array_equal(mem.insert_time[0][kept], time[0][kept])


def test_paper_eviction_overshoots_by_whole_groups():
    # n=6: nothing before, keep the newest (age 5), target 3; all middle chunks share count 2.
    time, hits = np.arange(6)[None], np.array([[2, 2, 2, 2, 2, 9]])
    mem = evict(full_memory(np.random.default_rng(2), time, hits), policy="paper")
    assert list(np.flatnonzero(mem.valid[0])) == [5]


@pytest.mark.parametrize("capacity", [5, 10])
def test_fifo_half_keeps_the_newest_half(capacity):
    time = np.random.default_rng(capacity).permutation(capacity)[None] + 3
    hits = np.random.default_rng(7).integers(0, 5, (1, capacity))
    mem = evict(full_memory(np.random.default_rng(3), time, hits), policy="fifo_half")
    newest = np.argsort(time[0])[capacity - capacity // 2:]
    assert set(np.flatnonzero(mem.valid[0])) == set(newest)


@pytest.mark.parametrize("policy", M.POLICIES)
@pytest.mark.parametrize("capacity", [2, 3, 7, 10, 23, 40])
def test_eviction_matches_reference(policy, capacity):
    rng = np.random.default_rng(capacity)
    time = np.stack([rng.permutation(capacity) * 3 + 1 for _ in range(3)])
    hits = rng.integers(0, 4, (3, capacity))  # few distinct counts: large groups
    mem = full_memory(rng, time, hits)
    mem = mem.replace(valid=mem.valid.at[2, 0].set(False))  # row 2 is not full: untouched
    out = evict(mem, policy=policy)
    for row in range(2):
        expected = reference_survivors(dict(enumerate(time[row])), dict(enumerate(hits[row])),
                                       policy)
        assert set(np.flatnonzero(out.valid[row])) == expected
    np.testing.assert_array_equal(out.valid[2], mem.valid[2])
    np.testing.assert_array_equal(out.hits[2], mem.hits[2])


# ---- random operation sequences against the reference ------------------------------------------

operations = st.lists(st.one_of(
    st.tuples(st.just("write"), st.tuples(st.booleans(), st.booleans())),
    st.tuples(st.just("hits"), st.integers(0, 2**31)),
    st.tuples(st.just("reset"), st.tuples(st.booleans(), st.booleans()))),
    min_size=1, max_size=40)


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(M.POLICIES), capacity=st.sampled_from([2, 3, 5, 10]),
       ops=operations, seed=st.integers(0, 2**31))
def test_operation_sequences_match_reference(policy, capacity, ops, seed):
    rng = np.random.default_rng(seed)
    mem = M.init_memory(2, capacity, TAU, N_KV, HEAD_DIM, EMB_DIM, jnp.float32)
    ref = ReferenceMemory(2, capacity, policy)
    tag = 1
    for op, arg in ops:
        if op == "write":
            before = mem
            mem = write(mem, *random_chunk(rng, 2, [tag, tag + 1]), policy=policy,
                        rows=np.array(arg))
            for row in np.flatnonzero(arg):
                if policy == "paper" and before.valid[row].all():  # the newest 10% survive
                    time = np.asarray(before.insert_time[row])
                    newest = np.argsort(time)[capacity * 90 // 100:]
                    assert mem.valid[row][newest].all()
                    np.testing.assert_array_equal(mem.insert_time[row][newest], time[newest])
                ref.write(row, tag + row)
            tag += 2
        elif op == "hits":
            indices = rng.integers(0, capacity, (2, 4))
            found = rng.random((2, 4)) < 0.7
            before = mem
            mem = count_hits(mem, indices, found)
            picks = (found & np.take_along_axis(np.asarray(before.valid), indices, 1)).sum()
            assert int(mem.hits.sum() - before.hits.sum()) == picks
            ref.count_hits(indices, found)
        else:
            mem = reset_rows(mem, np.array(arg))
            for row in np.flatnonzero(arg):
                ref.reset(row)
        assert int(mem.valid.sum(axis=1).max()) <= capacity
        ref.assert_matches(mem)


@settings(max_examples=15, deadline=None)
@given(policy=st.sampled_from(M.POLICIES), n_writes=st.integers(0, 12),
       seed=st.integers(0, 2**31))
@example(policy="paper", n_writes=12, seed=0)  # both rows full
def test_rows_are_independent(policy, n_writes, seed):
    rng = np.random.default_rng(seed)
    mem = M.init_memory(2, 5, TAU, N_KV, HEAD_DIM, EMB_DIM, jnp.bfloat16)
    for _ in range(n_writes):
        mem = write(mem, *random_chunk(rng, 2), policy=policy, rows=rng.random(2) < 0.8)
        mem = count_hits(mem, rng.integers(0, 5, (2, 3)), np.ones((2, 3), bool))
    row0 = np.array([True, False])
    changed = [write(mem, *random_chunk(rng, 2), policy=policy, rows=row0),
               reset_rows(mem, row0),
               count_hits(mem, rng.integers(0, 5, (2, 3)), np.array([[True] * 3, [False] * 3]))]
    for after in changed:
        for field, a, b in zip(M.Memory.__dataclass_fields__, jax.tree.leaves(mem),
                               jax.tree.leaves(after)):
            np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]), err_msg=field)


def test_reset_rows_empties_only_the_selected_rows():
    rng = np.random.default_rng(4)
    mem = M.init_memory(3, 4, TAU, N_KV, HEAD_DIM, EMB_DIM, jnp.float32)
    for _ in range(6):
        mem = write(mem, *random_chunk(rng, 3), policy="paper", rows=np.ones(3, bool))
    out = reset_rows(mem, np.array([False, True, False]))
    assert not out.valid[1].any() and int(out.clock[1]) == 0
    np.testing.assert_array_equal(out.valid[np.array([0, 2])], mem.valid[np.array([0, 2])])
    out = count_hits(write(out, *random_chunk(rng, 3), policy="paper", rows=np.ones(3, bool)),
                     np.array([[0], [0], [0]]), np.ones((3, 1), bool))
    assert list(np.flatnonzero(out.valid[1])) == [0]
    assert (int(out.insert_time[1, 0]), int(out.hits[1, 0])) == (0, 1)


# ---- payload -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mem_dtype", [jnp.bfloat16, jnp.float32])
def test_write_then_gather_is_bit_exact(mem_dtype):
    rng = np.random.default_rng(5)
    batch, capacity, n = 2, 6, 9
    mem = M.init_memory(batch, capacity, TAU, N_KV, HEAD_DIM, EMB_DIM, mem_dtype)
    written = []
    for step in range(n):
        chunk = random_chunk(rng, batch, [step + 1] * batch)
        written.append(tuple(np.asarray(jnp.asarray(x, mem_dtype)) for x in chunk[:2]))
        mem = write(mem, *chunk, policy="paper", rows=np.ones(batch, bool))
    tags = np.asarray(mem.emb[..., 0]).astype(int)
    valid = np.asarray(mem.valid)
    assert 0 < valid.sum(axis=1).min() and valid.sum(axis=1).max() < capacity  # eviction ran
    # per row: three stored chunks, then an evicted slot; found masks one stored pick per row
    indices = np.stack([np.concatenate([rng.permutation(np.flatnonzero(v))[:3],
                                        np.flatnonzero(~v)[:1]]) for v in valid])
    found = np.array([[True, False, True, True], [False, True, True, True]])
    k_mem, v_mem, mask = jax.jit(M.gather_chunks)(mem, indices, found)
    assert k_mem.shape == (batch, 4 * TAU, N_KV, HEAD_DIM) and k_mem.dtype == mem_dtype
    usable = found & np.take_along_axis(valid, indices, 1)
    assert usable.sum() == 4
    np.testing.assert_array_equal(mask, np.repeat(usable, TAU, axis=1))
    for b in range(batch):
        for j, slot in enumerate(indices[b]):
            if usable[b, j]:
                keys, values = written[tags[b, slot] - 1]
                got = slice(j * TAU, (j + 1) * TAU)
                assert np.asarray(k_mem[b, got]).tobytes() == keys[b].tobytes()
                assert np.asarray(v_mem[b, got]).tobytes() == values[b].tobytes()


def test_memory_is_not_trained_through():
    rng = np.random.default_rng(9)
    keys, values, emb = random_chunk(rng, 2)
    mem = M.init_memory(2, 3, TAU, N_KV, HEAD_DIM, EMB_DIM, jnp.float32)

    def read_back(keys):
        k_mem, _, _ = M.gather_chunks(M.write_chunk(mem, keys, values, emb),
                                      np.zeros((2, 1), int), np.ones((2, 1), bool))
        return jnp.sum(k_mem * keys)

    grad = jax.grad(read_back)(keys)
    np.testing.assert_array_equal(grad, keys)  # only the direct use; none through the memory


def test_write_chunks_equals_a_loop_of_write_chunk():
    rng = np.random.default_rng(6)
    batch, n = 2, 11
    keys = rng.standard_normal((batch, n, TAU, N_KV, HEAD_DIM), np.float32)
    values = rng.standard_normal((batch, n, TAU, N_KV, HEAD_DIM), np.float32)
    emb = rng.standard_normal((batch, n, EMB_DIM), np.float32)
    rows = rng.random((batch, n)) < 0.8
    mem = M.init_memory(batch, 4, TAU, N_KV, HEAD_DIM, EMB_DIM, jnp.bfloat16)
    mem = count_hits(write(mem, keys[:, 0], values[:, 0], emb[:, 0], policy="paper",
                           rows=np.ones(batch, bool)), np.zeros((batch, 1), int),
                     np.ones((batch, 1), bool))
    looped = mem
    for i in range(n):
        looped = write(looped, keys[:, i], values[:, i], emb[:, i], policy="paper", rows=rows[:, i])
    together = jax.jit(M.write_chunks, static_argnames="policy")(mem, keys, values, emb,
                                                                 policy="paper", rows=rows)
    for a, b in zip(jax.tree.leaves(looped), jax.tree.leaves(together)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(together.clock.min()) > 1


@pytest.mark.parametrize("policy", M.POLICIES)
def test_inside_scan_equals_eager(policy):
    """A scan of retrieve-by-slot, count hits, write: same memory as the step-by-step loop."""
    rng = np.random.default_rng(7)
    batch, n, capacity = 2, 14, 5
    chunks = random_chunk(rng, batch * n)
    chunks = tuple(x.reshape((n, batch) + x.shape[1:]) for x in chunks)
    picks = rng.integers(0, capacity, (n, batch, 2))
    mem = M.init_memory(batch, capacity, TAU, N_KV, HEAD_DIM, EMB_DIM, jnp.float32)

    def step(m, xs):
        keys, values, emb, idx = xs
        m = M.count_hits(m, idx, jnp.ones(idx.shape, bool))
        return M.write_chunk(m, keys, values, emb, policy), m.hits.sum()

    scanned, totals = jax.jit(lambda m: jax.lax.scan(step, m, chunks + (picks,)))(mem)
    eager = mem
    for i in range(n):
        eager, total = step(eager, tuple(x[i] for x in chunks) + (picks[i],))
        assert int(total) == int(totals[i])
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(scanned)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(scanned.hits.sum()) > 0 and bool(scanned.valid.any(axis=1).all())


def reference_write(mem, keys, values, emb, policy, rows):
    """`write_chunk` spelled out in numpy: evict each selected full row (`M.evict`, checked
    against `reference_survivors` above), then store the chunk in the row's first free slot."""
    evicted = np.asarray(M.evict(mem, policy).valid)
    out = {field: np.array(getattr(mem, field)) for field in M.Memory.__dataclass_fields__}
    for b in np.flatnonzero(rows):
        if out["valid"][b].all():
            out["valid"][b] = evicted[b]
        slot = int(np.argmin(out["valid"][b]))
        for field, value in (("keys", keys[b]), ("values", values[b]), ("emb", emb[b]),
                             ("valid", True), ("insert_time", out["clock"][b]), ("hits", 0)):
            out[field][b, slot] = np.asarray(value).astype(out[field].dtype)
        out["clock"][b] += 1
    return out


@pytest.mark.parametrize("mem_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("policy", M.POLICIES)
def test_scanned_writes_match_reference_write(policy, mem_dtype):
    """`write_chunks` (the scan every ingestion path runs) leaves every field bit for bit where
    the plain write puts it, through many evictions, with hits counted in between."""
    rng = np.random.default_rng()
    batch, capacity, n = 3, int(rng.integers(2, 8)), 5
    mem = M.init_memory(batch, capacity, TAU, N_KV, HEAD_DIM, EMB_DIM, mem_dtype)
    write_n = jax.jit(M.write_chunks, static_argnames="policy", donate_argnums=0)
    expected = {field: np.asarray(getattr(mem, field)) for field in M.Memory.__dataclass_fields__}
    for _ in range(6):
        keys, values = (rng.standard_normal((batch, n, TAU, N_KV, HEAD_DIM), np.float32)
                        for _ in range(2))
        emb = rng.standard_normal((batch, n, EMB_DIM), np.float32)
        rows = rng.random((batch, n)) < 0.8
        indices, found = rng.integers(0, capacity, (batch, 3)), rng.random((batch, 3)) < 0.7
        mem = count_hits(M.Memory(**{f: jnp.asarray(a) for f, a in expected.items()}),
                         indices, found)
        expected = {field: np.asarray(getattr(mem, field)) for field in expected}
        for i in range(n):
            expected = reference_write(M.Memory(**{f: jnp.asarray(a) for f, a in expected.items()}),
                                       keys[:, i], values[:, i], emb[:, i], policy, rows[:, i])
        mem = write_n(mem, keys, values, emb, policy=policy, rows=rows)
        for field, want in expected.items():
            got = np.asarray(getattr(mem, field))
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), field
        expected = {field: np.asarray(getattr(mem, field)) for field in expected}
    assert int(mem.clock.min()) > capacity  # every row was evicted at least once


def test_a_write_does_not_convert_the_whole_memory():
    """XLA:CPU computes a dynamic_update_slice into a bf16 buffer in float32, converting the
    whole memory up and back for every chunk written; `write_chunks` must not compile to that."""
    mem = M.init_memory(1, 64, TAU, N_KV, HEAD_DIM, EMB_DIM, jnp.bfloat16)
    chunks = jnp.zeros((1, 4, TAU, N_KV, HEAD_DIM))
    compiled = jax.jit(M.write_chunks, donate_argnums=0).lower(
        mem, chunks, chunks, jnp.zeros((1, 4, EMB_DIM))).compile().as_text()
    whole = f"[1,64,{TAU},{N_KV},{HEAD_DIM}]"
    converts = [line for line in compiled.splitlines()
                if f"{whole}" in line and " convert(" in line]
    assert "dynamic-update-slice" in compiled and not converts, converts


# ---- validation --------------------------------------------------------------------------------

def test_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match="capacity"):
        M.init_memory(1, 0, TAU, N_KV, HEAD_DIM, EMB_DIM, jnp.float32)
    with pytest.raises(ConfigError, match="emb_dim"):
        M.init_memory(1, 4, TAU, N_KV, HEAD_DIM, 2.5, jnp.float32)
    mem = M.init_memory(2, 4, TAU, N_KV, HEAD_DIM, EMB_DIM, jnp.float32)
    chunk = random_chunk(np.random.default_rng(8), 2)
    with pytest.raises(ConfigError, match="policy"):
        M.write_chunk(mem, *chunk, policy="lru")
    with pytest.raises(ConfigError, match="policy"):
        M.evict(mem, "newest")
    with pytest.raises(ValueError, match="keys"):
        M.write_chunk(mem, chunk[0][:, :2], *chunk[1:])
    with pytest.raises(ValueError, match="emb"):
        M.write_chunk(mem, *chunk[:2], chunk[2][:, :3])
    tiny = M.init_memory(2, 1, TAU, N_KV, HEAD_DIM, EMB_DIM, jnp.float32)
    with pytest.raises(ConfigError, match="capacity"):
        M.write_chunk(tiny, *chunk, policy="paper")
    for _ in range(3):  # fifo_half empties a full one-slot row, so every write lands
        tiny = M.write_chunk(tiny, *chunk, policy="fifo_half")
    assert bool(tiny.valid.all()) and list(np.asarray(tiny.insert_time[:, 0])) == [2, 2]
