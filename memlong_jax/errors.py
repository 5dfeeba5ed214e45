"""User-facing errors and the command-line convention: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import sys

from memlong_jax import interrupts


class UserError(Exception):
    """Bad input from the user (a path, a file, a flag): reported as one line, never a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are `UserError`s too: one line, exit code 2, like the rest."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; a `UserError` becomes `error: <message>` on stderr and exit code 2, a
    signal one line and 128 + its number (see `interrupts`), a closed stdout one line and 2."""
    try:
        with interrupts.raising():
            main(argv)
            interrupts.check()
    except UserError as err:
        message = " ".join(str(err).split())  # guarantee a single line
        print(f"error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more can be printed to stdout, even at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("error: output closed before the end (broken pipe)", file=sys.stderr)
        return 2
    except BaseException as err:
        # A signal, also one that landed inside C code (it arrives as that code's error,
        # caused by it), or Ctrl-C outside `raising()`.
        interrupted = interrupts.within(err)
        if interrupted is None and isinstance(err, KeyboardInterrupt):
            interrupted = interrupts.Interrupted(signal.SIGINT)
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr)
        interrupts.exit_now(interrupted.exit_code)
    return 0


def entry_point(main):
    """The console-script form of a command: `run_cli(main)` without arguments."""
    return functools.partial(run_cli, main)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike):
    """Yield a temporary sibling directory that becomes `path` only if the block succeeds.

    Whatever fails (bad input, Ctrl-C, a crash inside a library) leaves no partial output behind.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise UserError(f"output {path} already exists; remove it or choose another path")
    parent = os.path.dirname(path)
    created = _missing_parents(parent)
    existing = os.path.dirname(created[-1]) if created else parent
    if not os.path.isdir(existing):
        raise UserError(f"cannot create output {path}: {existing} is a file, not a directory")
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as err:
        _remove_empty(created)
        raise UserError(f"cannot create output {path}: {err.strerror or err}") from None
    done = False
    try:
        yield tmp
        interrupts.check()
        try:
            os.replace(tmp, path)
        except OSError as err:  # another process wrote `path` meanwhile
            raise UserError(f"cannot create output {path}: {err.strerror or err} (did another "
                            "command write it meanwhile?)") from None
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            _remove_empty(created)


def _missing_parents(directory: str) -> list[str]:
    """The directories `os.makedirs(directory)` would create, deepest first."""
    missing = []
    while directory and not os.path.exists(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    return missing


def _remove_empty(directories: list[str]) -> None:
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:
            return


def write_atomically(path: str, write) -> None:
    """Call `write(tmp_path)`, then rename onto `path`: readers never see a partial file."""
    path = os.path.abspath(path)
    # The suffix stays last, for writers that pick a format by it (matplotlib).
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        write(tmp)
        interrupts.check()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, data) -> None:
    """`data` as indented JSON at `path`, written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    write_atomically(path, write)


def check_writable_file(path: str) -> None:
    """Fail before long work, not after it, when an output file cannot be written."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, expected a file name")
    if not os.path.isdir(parent):
        raise UserError(f"{parent}: no such directory for output {path}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{parent}: not writable (output {path})")


def check_writable_dir(path: str, name: str = "output") -> None:
    """Fail early, before anything is written, when `path` cannot become a writable directory."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {name} {path}: {probe} is not a writable directory")
