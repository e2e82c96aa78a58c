"""One run per output directory: ``RunLock(out)`` holds an exclusive ``flock`` on ``out/.lock``.

A second ``python -m train`` on the same ``train.output_dir`` is refused with the directory and the
process holding it (pid, host, start time, read from the lock file). The kernel drops an ``flock`` when
its process ends, however it ends (``kill -9`` included), so a lock left by a killed run never blocks
the next start: the file stays, the lock does not. Only the lead process of a multi-host run takes it
(the others write nothing of their own into the directory).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from train.config import ConfigError

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunLock:
    """Context manager: the exclusive lock of a run directory, or ``ConfigError`` naming its holder."""

    def __init__(self, directory: str | os.PathLike, active: bool = True):
        self.path = Path(directory) / LOCK_NAME
        self.active = active
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if not self.active or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise ConfigError(f"train.output_dir: {self.path.parent} is in use by another run ({holder}); wait for "
                              "it to end or stop it, or choose another train.output_dir") from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(info: dict[str, Any]) -> str:
    if not info.get("pid"):
        return "a process that is still starting"
    where = f" on {info['host']}" if info.get("host") and info.get("host") != socket.gethostname() else ""
    since = f", started {info['started']}" if info.get("started") else ""
    return f"process {info['pid']}{where}{since}"
