"""Signals end a command the way errors do: cleanup runs, one line, a conventional exit code.

`raising()` (what `run_cli` wraps every command in) turns SIGINT, SIGTERM and SIGHUP into an
`Interrupted` exception, so the `finally` blocks that remove temporary output run on the way
out; `run_cli` then prints one line and leaves with 128 + the signal number through `exit_now`,
which flushes and skips interpreter teardown (where XLA's and the tokenizers' threads may still
be running, and crash it).

A signal can also land where Python swallows exceptions (a gc callback, a `__del__`: printed
as "Exception ignored in ..."). So the handler also records the signal, such swallowed raises are
dropped without printing, and `check()` re-raises the recorded signal at the points that commit
output and when the command returns, so a swallowed signal still ends the command.

`deferred()` is for loops that must not stop half-way (a training step, a checkpoint): there a
signal only sets a flag the loop polls; a second signal raises at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A caught signal; a BaseException like KeyboardInterrupt, so `except Exception` lets it
    through."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}" + (f": {detail}" if detail else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def within(err: BaseException) -> Interrupted | None:
    """The `Interrupted` behind `err`, if any: a signal that lands inside C code (numpy, XLA)
    surfaces as that code's own error (a `SystemError`) caused by the `Interrupted`."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Interrupted):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


_pending: list[int] = []  # signals `_raise` raised, in case the raise was swallowed


def _raise(signum, frame):
    _pending.append(signum)
    raise Interrupted(signum)


def check() -> None:
    """Raise the signal caught inside `raising()` whose exception Python swallowed, if any."""
    if _pending:
        raise Interrupted(_pending[0])


def _quiet_unraisable(previous):
    def hook(unraisable):
        if not isinstance(unraisable.exc_value, Interrupted):
            previous(unraisable)
    return hook


@contextlib.contextmanager
def _handlers(handler):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def raising():
    """Within the block, SIGINT, SIGTERM and SIGHUP raise `Interrupted` (see `check()`)."""
    _pending.clear()
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable(previous_hook)
    try:
        with _handlers(_raise):
            yield
    finally:
        sys.unraisablehook = previous_hook


class Flag:
    """The signal `deferred()` caught, if any."""

    signum: int | None = None

    def note(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum


@contextlib.contextmanager
def deferred():
    """Within the block, the first signal only sets `flag.signum`; a second raises."""
    flag = Flag()
    with _handlers(flag.note):
        yield flag


def exit_now(code: int) -> None:
    """Flush what was printed and end the process without interpreter teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
