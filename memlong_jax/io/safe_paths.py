"""Reading a model directory someone handed you never reads or copies a file outside it, and
never writes over the files a command reads.

Names that come from a directory (a shard index's `weight_map`, the tokenizer files, the
checkpoint's `params/`) are resolved with every symlink followed and must land inside the
directory: `../other_model/x`, an absolute path or a link to `/etc/passwd` is refused with one
line. The one exception is the Hugging Face hub cache, whose `snapshots/REV/` files are links
into the repository's own `blobs/`. Whatever is read must be a regular file (a FIFO would block
the reader for ever).
"""

from __future__ import annotations

import os
import stat

from memlong_jax.errors import UserError


def _roots(directory: str) -> list[str]:
    roots = [os.path.realpath(directory)]
    snapshots = os.path.dirname(os.path.abspath(directory))
    if os.path.basename(snapshots) == "snapshots":  # HF hub cache: REPO/snapshots/REV -> blobs
        roots.append(os.path.realpath(os.path.join(snapshots, "..", "blobs")))
    return roots


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def inside(directory: str, name: str, what: str = "file") -> str:
    """`directory/name`, checked to resolve (symlinks followed) inside `directory`; a
    `UserError` when it does not. The name is kept (its suffix says how to read it)."""
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if not any(_under(real, root) for root in _roots(directory)):
        raise UserError(f"{directory}: {what} {name!r} resolves to {real}, outside the "
                        "directory; refusing to read it")
    return path


def regular_file(path: str, what: str = "file") -> str:
    """`path` when it is a regular file (after symlinks); a `UserError` for a FIFO, a device or
    a socket, which would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise UserError(f"{what} {path}: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is not a regular file (a FIFO, device or socket); "
                        "refusing to read it")
    return path


def contained_file(directory: str, name: str, what: str = "file") -> str | None:
    """`directory/name` when it is a regular file inside `directory`, None when absent; a
    `UserError` when it escapes the directory or is not a regular file."""
    if not os.path.lexists(os.path.join(directory, name)):
        return None
    return regular_file(inside(directory, name, what), what)


def refuse_overwrite(outputs, inputs=(), directories=()) -> None:
    """Outputs must not be (or be inside) what the command reads: an input file, or a
    checkpoint directory whose own files would be overwritten."""
    for out in filter(None, outputs):
        real = os.path.realpath(out)
        for source in filter(None, inputs):
            if os.path.exists(source) and real == os.path.realpath(source):
                raise UserError(f"output {out} is the input {source}; choose another name")
        for directory in filter(None, directories):
            if _under(real, os.path.realpath(directory)):
                raise UserError(f"output {out} is inside {directory}, which this command "
                                "reads; choose a path outside it")
