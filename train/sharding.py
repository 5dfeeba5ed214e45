"""Scale-out with JAX's own tools: a `data` x `fsdp` mesh.

* Params (frozen and trainable) and optimizer state are sharded along `fsdp` on their largest
  axis that the axis size divides (replicated when none does), and replicated along `data`.
* Every device of the mesh is a data-parallel replica (FSDP is data parallelism with sharded
  params, as ZeRO is): the batch rows and the per-replica MemLong memory are sharded over
  (`data`, `fsdp`), so each device owns `rows_per_replica` streams and their memories; with
  `mesh_fsdp=1` this is exactly "memory sharded on `data`".
* Multi-host: `jax.distributed.initialize` (flags in `train.run --help`) before anything touches
  a device; each host then feeds only its addressable rows (`make_array_from_callback`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memlong_jax.errors import UserError

BATCH = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
    """`data=-1` takes every device; explicit sizes may use the first data*fsdp devices."""
    if data == -1:
        if n_devices % fsdp:
            raise UserError(f"mesh_fsdp={fsdp} does not divide the {n_devices} devices")
        data = n_devices // fsdp
    if data * fsdp > n_devices:
        raise UserError(f"mesh {data} (data) x {fsdp} (fsdp) = {data * fsdp} devices, but "
                        f"only {n_devices} are present; set mesh_data / mesh_fsdp to match")
    return data, fsdp


def make_mesh(data: int, fsdp: int) -> Mesh:
    devices = jax.devices()
    data, fsdp = mesh_shape(data, fsdp, len(devices))
    return Mesh(np.asarray(devices[:data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def param_spec(shape, fsdp: int) -> P:
    """Shard the largest axis divisible by `fsdp` (first on ties); replicate otherwise."""
    if fsdp == 1 or not shape:
        return P()
    axes = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
    for axis in axes:
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(tree, mesh: Mesh):
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), tree)


def rows_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    spec = [None] * ndim
    spec[axis] = BATCH
    return NamedSharding(mesh, P(*spec))


def memory_shardings(state, mesh: Mesh):
    """Every leaf of the MemLong state has the batch (replica row) axis first."""
    return jax.tree_util.tree_map(lambda x: rows_sharding(mesh, x.ndim, 0), state)


def local_rows(mesh: Mesh, n_rows: int) -> list[int]:
    """The batch rows held by this process's devices (every row on a single host)."""
    index_map = rows_sharding(mesh, 1).addressable_devices_indices_map((n_rows,))
    return sorted({r for (index,) in index_map.values() for r in range(n_rows)[index]})


def gather(tree):
    """Host (numpy) copies of global arrays. Across hosts an array's shards are not all local:
    every process must join the all-gather (then only one of them writes)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def any_process(value: bool) -> bool:
    """Whether `value` holds on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return value
    return bool(np.max(multihost_utils.process_allgather(np.int32(value))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(array, sharding):
    """A global array from a host array every process can index (single or multi-host)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def shard_bytes(shape, dtype, spec: P, mesh_sizes: dict) -> int:
    """Bytes one device holds of an array laid out as `spec` (for --dry-run)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    for axis in spec:
        for name in (axis if isinstance(axis, tuple) else (axis,)):
            if name is not None:
                n //= mesh_sizes[name]
    return n
