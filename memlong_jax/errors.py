"""User-facing errors and the command-line convention: one line on stderr, exit code 2."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys


class UserError(Exception):
    """Bad input from the user (a path, a file, a flag): reported as one line, never a traceback."""


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; a `UserError` becomes `error: <message>` on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as err:
        message = " ".join(str(err).split())  # guarantee a single line
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike):
    """Yield a temporary sibling directory that becomes `path` only if the block succeeds.

    Whatever fails (bad input, Ctrl-C, a crash inside a library) leaves no partial output behind.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise UserError(f"output {path} already exists; remove it or choose another path")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
