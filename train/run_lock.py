"""One training run per output directory: OUTPUT/.lock, held with `flock` for the run's life.

Two runs writing the same checkpoints and `metrics.jsonl` would corrupt both; the second one
stops with one line naming the holder's PID. The kernel drops the lock when its process dies
however it dies (SIGKILL included), so a lock file left by a dead run is simply taken over.
"""

from __future__ import annotations

import fcntl
import os
import socket

from memlong_jax.errors import UserError

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise UserError(f"{directory} is in use by another training run ({holder}); wait "
                            f"for it to finish or use another output_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, harmlessly
            self._fd = None
