"""Resuming a run from its output directory: the newest checkpoint that restores completely,
written by the same config on the same data.

A checkpoint that does not restore (a file in it truncated, emptied or deleted: a disk that
filled up mid-save, a copy cut short) is moved to OUTPUT/checkpoints-damaged/STEP with one
warning line that names it and the reason, and the next older one is tried; the run goes on from
there and writes the skipped steps again. Each checkpoint records the fingerprint of its training
data (`train.data.fingerprint`); resuming on other data stops with one line unless
`allow_data_change=true`. Rows that `metrics.jsonl` holds beyond the restored step are dropped,
so a resumed run does not log a step twice.
"""

from __future__ import annotations

import json
import os
import sys

from memlong_jax.errors import UserError

DAMAGED_DIR = "checkpoints-damaged"
FINGERPRINT = "data_fingerprint"


def reason(err: Exception) -> str:
    """An exception as a short single-line phrase."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def restore_newest(ckpt, target, check, warn=None):
    """(step, cursor, restored state) of the newest checkpoint that restores completely, or None
    when there is none. `check(step, cursor, stored_config)` raises a `UserError` for a
    checkpoint that restores but must not be resumed (other config, other data): that stops the
    search, as an older checkpoint of the same run would fail the same way."""
    warn = warn or (lambda line: print(line, file=sys.stderr))
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            cursor, stored = ckpt.read_json(step)
            check(step, cursor, stored)
            return step, cursor, ckpt.restore_state(step, target)
        except UserError:
            raise
        except Exception as err:  # whatever orbax, tensorstore or json raise on damaged files
            moved = ckpt.set_aside(step, os.path.join(os.path.dirname(ckpt.directory),
                                                      DAMAGED_DIR))
            warn(f"warning: skipped checkpoint {step} ({reason(err)}); moved it to {moved}")
    return None


def check_newest(ckpt, check) -> None:
    """`check` (as in `restore_newest`) the newest checkpoint whose config and cursor read; the
    ones that do not are left to `restore_newest`. Run before the model is built, so a resume on
    other data or with another config stops before minutes of loading."""
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            cursor, stored = ckpt.read_json(step)
        except Exception:  # damaged: restore_newest sets it aside, with its warning
            continue
        check(step, cursor, stored)
        return


def check_data(step: int, cursor: dict, expected: dict, fingerprint: str, allow_change: bool,
               where: str) -> None:
    """The stored data cursor and fingerprint against this run's data."""
    stored = {k: v for k, v in cursor.items() if k != FINGERPRINT}
    if stored != expected:
        raise UserError(f"checkpoint {step} in {where} has data cursor {stored}, but this data "
                        f"gives {expected}; the data changed since it was written")
    recorded = cursor.get(FINGERPRINT)
    if recorded and recorded != fingerprint and not allow_change:
        raise UserError(f"checkpoint {step} in {where} was written on other training data "
                        f"(fingerprint {recorded[:12]}, now {fingerprint[:12]}); restore the "
                        "data, use another output_dir, or --set allow_data_change=true to "
                        "resume on this data anyway")


def drop_metrics_after(directory: str, step: int) -> None:
    """Remove the rows of `metrics.jsonl` logged after `step` (and a torn last line)."""
    path = os.path.join(directory, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if line.endswith("\n") and isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    if keep != lines:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
