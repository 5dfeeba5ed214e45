"""Write a `.safetensors` file one tensor at a time.

`safetensors.numpy.save_file` serialises everything in memory first (twice the model in RAM);
this writer computes the header from shapes alone and streams each tensor's bytes to disk.
"""

from __future__ import annotations

import json
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

_DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float64): "F64",
                np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def write_safetensors(path: str, entries: Iterable[tuple[str, tuple, np.dtype]],
                      read: Callable[[str], np.ndarray], metadata: dict | None = None,
                      progress=lambda it: it) -> None:
    """`entries` gives (name, shape, dtype) up front; `read(name)` yields each array in turn."""
    entries = list(entries)
    header, offset = {}, 0
    for name, shape, dtype in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in progress(entries):
            array = np.ascontiguousarray(read(name))
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: got {array.dtype}{array.shape}, declared "
                                 f"{np.dtype(dtype)}{tuple(shape)}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
