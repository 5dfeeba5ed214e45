"""Top-k chunk retrieval behind one interface: exact on device, or host FAISS via `pure_callback`.

    indices, found = retrieve(backend, emb, valid, query, k)

emb `[B, C, d]`, valid bool `[B, C]`, query `[B, d]` -> indices int32 `[B, k]`, found bool `[B, k]`
(picks beyond the row's stored chunks are `found=False` with index 0). Scores are inner
products (cosine for the L2-normalised retriever embeddings). Each row searches its own memory.

Tie-breaking: both exact backends rank by (score descending, slot ascending), so exact ties
(identical embeddings, e.g. repeated text) resolve to the lowest slots in both and the device and
exact-FAISS backends return the same chunks. Their float32 dot products are summed in different
orders, so two *distinct* chunks whose scores differ by less than that rounding (~1e-7) can still
rank differently at the k-th place; either answer is equally right.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from memlong_jax.llama.config import ConfigError

INDEX_CACHE_SIZE = 8  # approximate indexes kept for reuse (LRU, keyed by content)
_INDEX_CACHE: collections.OrderedDict = collections.OrderedDict()


@dataclasses.dataclass(frozen=True)
class DeviceTopK:
    """Exact top-k on device: inner products, empty slots at -inf, `lax.top_k`. Fully jittable.

    Scores are an elementwise product reduced over d rather than a matmul: XLA's reduction gives
    identical embeddings identical scores wherever they sit, a matmul does not (measured on CPU),
    and `lax.top_k` then breaks exact ties by the lower slot. The reduction runs in two steps,
    over d / w groups of w lanes and then over the lanes, with the same order for every slot:
    XLA:CPU vectorises that across the lanes; a single reduction over d was not vectorised and,
    at thousands of slots, cost more than the rest of a prefix chunk's bookkeeping.
    """

    def __call__(self, emb, valid, query, k: int):
        dim = emb.shape[-1]
        w = next(w for w in (16, 8, 4, 2, 1) if dim % w == 0)
        split = lambda a: a.reshape(*a.shape[:-1], dim // w, w)
        scores = jnp.sum(jnp.sum(split(emb) * split(query)[:, None], axis=-2), axis=-1)
        _, indices = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
        found = jnp.take_along_axis(valid, indices, axis=1)
        return jnp.where(found, indices, 0).astype(jnp.int32), found


@dataclasses.dataclass(frozen=True)
class FaissSearch:
    """Host FAISS search through `jax.pure_callback`; works under `jit`, `lax.scan` and `vmap`.

    `factory` is a `faiss.index_factory` string built with the inner-product metric: "Flat" is
    exact (IndexFlatIP), "HNSW32" or "IVF1024,Flat" approximate; `params` are search-time
    `ParameterSpace` settings such as "efSearch=128" or "nprobe=32". FAISS's GPU indexes are used
    when faiss has GPUs (HNSW has none and stays on the CPU).

    The memory is a functional pytree, so every call hands the host the rows' current emb/valid
    and each row's index is built from its valid chunks. For "Flat" that build is a copy, as cheap
    as the search itself, so it is not cached. Approximate indexes are expensive to build and are
    kept in a small LRU keyed by a hash of the exact vectors they hold: a memory searched
    repeatedly without writes (several queries, `vmap` over queries, rows with equal content)
    builds once, and any change to the contents misses the cache, so results never come from a
    stale index. The price: hashing the row (O(C d), like the transfer itself), and in the usual
    retrieve-forward-write loop every step changes the memory and rebuilds the index, which makes
    approximate indexes slower there than "Flat"; they pay off when one memory state serves many
    queries. An IVF index with too few vectors to train its centroids (faiss's
    `min_points_per_centroid` per list) searches exactly instead.
    """

    factory: str = "Flat"
    params: str = ""

    def __call__(self, emb, valid, query, k: int):
        self._new_index(emb.shape[-1])  # a bad factory or params fails here, at trace time
        out = (jax.ShapeDtypeStruct(query.shape[:-1] + (k,), jnp.int32),
               jax.ShapeDtypeStruct(query.shape[:-1] + (k,), jnp.bool_))
        search = functools.partial(self._search, k=k)
        return jax.pure_callback(search, out, jax.lax.stop_gradient(emb), valid,
                                 jax.lax.stop_gradient(query), vmap_method="expand_dims")

    def _search(self, emb, valid, query, k):
        """Host side: any leading (batch, vmap) dims, size-1 ones broadcast (`expand_dims`)."""
        emb, valid, query = np.asarray(emb, np.float32), np.asarray(valid), np.asarray(query)
        lead = np.broadcast_shapes(emb.shape[:-2], valid.shape[:-1], query.shape[:-1])
        indices, found = np.zeros(lead + (k,), np.int32), np.zeros(lead + (k,), bool)
        for row in np.ndindex(*lead):
            slots = np.flatnonzero(_at(valid, row))
            if slots.size:
                index = self._index(_at(emb, row)[slots])
                best = self._top_k(index, _at(query, row), k, slots.size)
                indices[row][:best.size], found[row][:best.size] = slots[best], True
        return indices, found

    @staticmethod
    def _top_k(index, query, k, n):
        """Positions of the top k by (score desc, position asc), whatever faiss's order of ties.

        Searches deeper until the first score past the k-th is strictly lower (or all n are
        returned), so every vector tied with the k-th is among the candidates.
        """
        depth = min(k + 1, n)
        while True:
            scores, ids = index.search(query[None], depth)
            scores, ids = scores[0], ids[0]
            if depth == n or scores[k] < scores[k - 1] or ids[k] < 0:
                break
            depth = min(2 * depth, n)
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        return ids[np.lexsort((ids, -scores))[:k]]

    def _index(self, vectors):
        if self.factory == "Flat":
            return self._build(vectors)
        key = (self.factory, self.params, vectors.shape,
               hashlib.blake2b(vectors, digest_size=16).digest())
        index = _INDEX_CACHE.pop(key, None)
        if index is None:
            index = self._build(vectors)
        _INDEX_CACHE[key] = index  # (re)inserted as the most recently used
        while len(_INDEX_CACHE) > INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
        return index

    def _new_index(self, dim: int):
        """The empty index with its search params set; a bad factory or params is a ConfigError."""
        faiss = _faiss()
        try:
            index = faiss.index_factory(dim, self.factory, faiss.METRIC_INNER_PRODUCT)
            if self.params:
                faiss.ParameterSpace().set_index_parameters(index, self.params)
        except RuntimeError as err:
            raise ConfigError(f"faiss index {self.factory!r} (params {self.params!r}, dim {dim}): "
                              f"{err}") from None
        return index

    def _build(self, vectors):
        faiss = _faiss()
        index = self._new_index(vectors.shape[1])
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and len(vectors) < ivf.nlist * ivf.cp.min_points_per_centroid:
            index = faiss.IndexFlatIP(vectors.shape[1])
        if _gpu_resources() is not None and not isinstance(index, faiss.IndexHNSW):
            index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)  # keeps nprobe
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
        return index


def _at(a, row):
    """`a[row]`, where a size-1 leading dim broadcasts (pure_callback's `expand_dims`)."""
    return a[tuple(i if n > 1 else 0 for i, n in zip(row, a.shape))]


@functools.cache
def _faiss():
    """faiss, imported on first use: the device backend (and GPU machines without faiss) never
    need it."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before faiss loads OpenMP
    try:
        import faiss   # optional: only the faiss backends load it
    except ImportError:
        raise ConfigError("the faiss backends need faiss (pip install faiss-cpu, or the gpu "
                          "extra's faiss-gpu-cu12); backend=device needs nothing") from None
    return faiss


@functools.cache
def _gpu_resources():
    faiss = _faiss()
    return faiss.StandardGpuResources() if faiss.get_num_gpus() > 0 else None


BACKENDS = {
    "device": DeviceTopK(),
    "faiss": FaissSearch(),
    "faiss-hnsw": FaissSearch("HNSW32", "efSearch=128"),
}


def get_backend(backend):
    """A backend object from a name in `BACKENDS` (or a backend object, returned as is)."""
    if isinstance(backend, (DeviceTopK, FaissSearch)):
        return backend
    if backend not in BACKENDS:
        raise ConfigError(
            f"retrieval backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return BACKENDS[backend]


def retrieve(backend, emb, valid, query, k: int):
    """Top-k chunks of each row's memory for that row's query; see the module docstring."""
    backend = get_backend(backend)
    batch, capacity, dim = emb.shape
    if valid.shape != (batch, capacity):
        raise ValueError(f"valid must have shape {(batch, capacity)}, got {valid.shape}")
    if query.shape != (batch, dim):
        raise ValueError(f"query must have shape {(batch, dim)}, got {query.shape}")
    if not isinstance(k, int) or not 1 <= k <= capacity:
        raise ConfigError(f"retrieval k must be an integer in [1, capacity={capacity}], got {k!r}")
    return backend(emb.astype(jnp.float32), valid.astype(bool), query.astype(jnp.float32), k)
