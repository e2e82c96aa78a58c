"""One run per output directory: a second ``python -m train`` on a directory in use is refused naming the
directory and the live process; the lock of a run killed with SIGKILL does not block the next start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train.conftest import ROOT, lm_args, main
from train.config import ConfigError
from train.lock import LOCK_NAME, RunLock


def _holder(lock_file, proc, timeout=180):
    """The pid written into the lock file once ``proc`` holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            return json.loads(lock_file.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    raise AssertionError("the first run never took the lock")


def test_second_run_on_a_directory_is_refused_and_a_killed_runs_lock_does_not_block(assets, tmp_path, capsys):
    out = tmp_path / "run"
    args = lm_args(assets, out, "train.steps=100000", "train.log_every=1000")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "train"] + [x for kv in args for x in ("--set", kv)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = _holder(out / LOCK_NAME, first)
        assert pid == first.pid
        code, err = main(args[:-2] + ["train.steps=2", "train.stop_at=1"], capsys)
        assert code == 2, err
        assert str(out) in err and f"process {first.pid}" in err and "in use by another run" in err
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # nothing written
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / LOCK_NAME).exists()  # the killed run's lock file is still there ...
    code, err = main(args[:-2] + ["train.steps=2"], capsys)  # ... and does not block this run
    assert code == 0, err
    assert (out / "adapters.safetensors").is_file()


def test_lock_is_released_on_errors_and_reentrant_runs(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match=f"{tmp_path}.*in use by another run .*process {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released by the first context: free again
        pass
    with RunLock(tmp_path, active=False), RunLock(tmp_path):  # non-lead hosts take no lock
        pass
