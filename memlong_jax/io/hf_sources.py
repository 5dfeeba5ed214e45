"""Tensor sources: read a checkpoint one tensor at a time, whatever its on-disk format.

Each source exposes `hf_config` (a transformers-style config dict), `names()`, `shape(name)`
(without reading data), `read(name)` (one numpy array in HF layout) and `save_tokenizer(out_dir)`. Files are memory-mapped, so converting a
large model holds the output copy plus one tensor, never the whole input as well.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable
from typing import NamedTuple

import ml_dtypes
import numpy as np
from safetensors import safe_open

from memlong_jax.errors import UserError
from memlong_jax.io.gguf_source import GGUFSource
from memlong_jax.io.safe_paths import contained_file, inside, regular_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "added_tokens.json",
                   "vocab.json", "merges.txt")
# Buffers some old checkpoints carry that are not parameters.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def open_source(path: str):
    """The right source for an HF directory or a `.gguf` file, or a one-line `UserError`."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return GGUFSource(path)
        raise UserError(f"{path}: expected an HF model directory or a .gguf file")
    return HFDirectorySource(path)


class HFDirectorySource:
    """An HF model directory: `config.json` plus safetensors or `.bin` weights, sharded or not."""

    def __init__(self, directory: str):
        self.directory = directory
        config_path = contained_file(directory, "config.json", "config")
        if config_path is None:
            raise UserError(f"{directory}: no config.json")
        try:
            with open(config_path) as f:
                self.hf_config = json.load(f)
        except (OSError, ValueError) as err:
            raise UserError(f"{config_path}: unreadable JSON ({err})") from None
        self._open: dict[str, object] = {}
        self._file_of = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        d = self.directory
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = contained_file(d, index_name, "shard index")
            if index_path:
                try:
                    with open(index_path) as f:
                        mapping = dict(json.load(f)["weight_map"])
                    files = {file: inside(d, file, "shard") for file in set(mapping.values())}
                except (OSError, ValueError, KeyError, TypeError) as err:
                    raise UserError(f"{index_path}: not a valid shard index ({err})") from None
                return {name: files[file] for name, file in mapping.items()}
        files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
        if not files:
            files = sorted(glob.glob(os.path.join(d, "pytorch_model*.bin")))
        if not files:
            raise UserError(f"{d}: no weights found (model.safetensors, sharded safetensors with "
                            "an index, or pytorch_model.bin)")
        files = [inside(d, os.path.basename(file), "weights file") for file in files]
        return {name: file for file in files for name in self._load_file(file).keys()}

    def _load_file(self, file: str):
        if file not in self._open:
            if not os.path.exists(file):
                raise UserError(f"{file}: listed in the shard index but missing")
            regular_file(file, "weights file")
            opener = _open_safetensors if file.endswith(".safetensors") else _open_bin
            self._open[file] = opener(file)
        return self._open[file]

    def names(self) -> list[str]:
        return [n for n in self._file_of if not n.endswith(IGNORED_SUFFIXES)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._call(name, "shape")

    def read(self, name: str) -> np.ndarray:
        return self._call(name, "get")

    def _call(self, name: str, method: str):
        file = self._file_of[name]
        try:
            return getattr(self._load_file(file), method)(name)
        except UserError:
            raise
        except Exception as err:  # the readers' own errors on damaged files
            raise UserError(f"{file}: cannot read tensor {name} ({err})") from None

    def save_tokenizer(self, out_dir: str) -> list[str]:
        return copy_tokenizer_files(self.directory, out_dir)


def copy_tokenizer_files(directory: str, out_dir: str, names=TOKENIZER_FILES) -> list[str]:
    """Copy the tokenizer files `directory` has; each must be a regular file inside it."""
    copied = []
    for name in names:
        src = contained_file(directory, name, "tokenizer file")
        if src:
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


class _TensorFile(NamedTuple):
    """One open weight file, whatever its format: names, shapes, numpy tensors."""

    keys: Callable[[], list]
    shape: Callable[[str], tuple]
    get: Callable[[str], np.ndarray]


def _open_safetensors(file: str):
    try:
        handle = safe_open(file, framework="numpy")
        return _TensorFile(lambda: list(handle.keys()),
                           lambda name: tuple(handle.get_slice(name).get_shape()),
                           handle.get_tensor)
    except Exception as err:
        raise UserError(f"{file}: corrupted or truncated safetensors ({err})") from None


def _open_bin(file: str):
    try:
        import torch   # heavy and optional: only .bin checkpoints need it
    except ImportError:
        raise UserError(f"{file}: reading .bin checkpoints needs torch "
                        "(pip install torch), or convert from safetensors") from None
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return _TensorFile(lambda: list(state.keys()), lambda name: tuple(state[name].shape),
                           lambda name: torch_to_numpy(state[name]))
    except Exception as err:
        raise UserError(f"{file}: corrupted or unreadable PyTorch checkpoint ({err})") from None


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as numpy, keeping bfloat16 (which numpy only knows via ml_dtypes)."""
    import torch   # heavy and optional: only reached with a torch tensor in hand
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
