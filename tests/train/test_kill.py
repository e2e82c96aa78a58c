"""``kill -9`` at chosen and at random points, then resume: the run ends with the adapters (bit for bit)
and the metrics of a run that was never interrupted; no checkpoint, adapter file or metrics row is
ever read half-written; nothing is lost beyond the steps since the last checkpoint.

The chosen points are reached with ``tests.train.crash`` (SIGKILL from inside the process at a write
that must be atomic); the random ones are SIGKILLs from outside at a random moment of training.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train.conftest import ROOT, adapters, lm_args, train
from train.checkpoint import TRASH, Checkpointer
from train.metrics import read_jsonl
from tests.env import xla_env

ENV = xla_env(1, PYTHONPATH=str(ROOT))
BASE = ["train.steps=10", "train.checkpoint_every=2", "train.keep=2", "adapter.dropout=0.1", "data.eval_fraction=0.1",
        "train.eval_every=4"]
VARIANTS = {"lora": [], "dylora": ["adapter.variant=dylora"],
            "delta_lora": ["adapter.variant=delta_lora", "adapter.delta_lora.start=1"],
            "lora_drop": ["adapter.variant=lora_drop", "adapter.lora_drop.select_at=3", "adapter.lora_drop.threshold=0.5"]}


def _argv(args: list[str]) -> list[str]:
    return [a for kv in args for a in ("--set", kv)]


def _steps(out: Path) -> list[int]:
    d = out / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _check_nothing_half_written(out: Path) -> None:
    """Every step directory a reader would see is a complete checkpoint; the adapters file, if there,
    is whole; metrics.jsonl has at most a torn last line."""
    steps = _steps(out)
    if steps:
        saver = Checkpointer(out, 2, read_only=True)
        try:
            for s in steps:
                assert (out / "checkpoints" / str(s) / "commit_success.txt").is_file(), s
                assert saver.meta(s)["step"] == s
        finally:
            saver.close()
    if (out / "adapters.safetensors").exists():
        assert len(adapters(out)) > 0
    read_jsonl(out / "metrics.jsonl")


def _killed_at(out: Path, args: list[str], point: str, n: int) -> int | None:
    """Run with a SIGKILL at the ``n``-th ``point``; the latest checkpoint step afterwards."""
    proc = subprocess.run([sys.executable, "-m", "tests.train.crash", point, str(n), *_argv(args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"{point} #{n} was not reached (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return _after_kill(out, point)


def _killed_randomly(out: Path, args: list[str], rng: random.Random, total: int = 10,
                     allow_finish: bool = False) -> int | None:
    """Run and SIGKILL it at a random moment after a random number of logged steps (fewer than are left);
    the latest checkpoint afterwards (``allow_finish``: -1 if the run finished before the kill came)."""
    steps = _steps(out)
    start = steps[-1] if steps else 0
    proc = subprocess.Popen([sys.executable, "-m", "train", *_argv(args)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    rows, delay = rng.randint(0, max(0, total - start - 2)), rng.uniform(0.0, 0.2)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if max([r["step"] for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"], default=0) >= start + rows:
            break
        time.sleep(0.02)
    time.sleep(delay)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    if allow_finish and proc.returncode == 0:
        return -1
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill (after {rows} rows + {delay:.2f} s):\n{err[-2000:]}"
    return _after_kill(out, "random")


def _after_kill(out: Path, point: str) -> int | None:
    d = out / "checkpoints"
    if point in ("ckpt_items", "ckpt_finalize"):  # the save was cut off: its temporary directory is there
        assert any("tmp" in p.name for p in d.iterdir()), sorted(p.name for p in d.iterdir())
    if point == "ckpt_delete":  # the old step was moved out of sight before its deletion began
        assert (d / TRASH).is_dir() and any((d / TRASH).iterdir())
    if point == "adapters":  # the final checkpoint is there; the adapters file is not (its temporary file is)
        assert not (out / "adapters.safetensors").exists() and list(out.glob(".adapters.safetensors.*"))
    _check_nothing_half_written(out)
    steps = _steps(out)
    return steps[-1] if steps else None


def _compare(whole: Path, cut: Path) -> None:
    a, b = adapters(whole), adapters(cut)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # bit for bit
    rows = lambda out: sorted(({k: v for k, v in r.items() if k != "time"} for r in read_jsonl(out / "metrics.jsonl")  # noqa: E731
                               if r["kind"] not in ("run", "config")),  # (one per invocation; ids differ)
                              key=lambda r: (r["step"], r["kind"]))  # (a resumed final step redoes its eval after its weights row)
    assert rows(cut) == rows(whole)  # every row (train, eval, weights, ...) once, the same values: nothing lost or doubled
    assert not list(cut.glob(".adapters.safetensors.*")) and not (cut / "checkpoints" / TRASH).exists()
    assert not [p for p in (cut / "checkpoints").iterdir() if "tmp" in p.name]
    assert json.loads((cut / "summary.json").read_text())["steps"] == 10


def _resume_message(out: Path, args: list[str], capsys) -> str:
    capsys.readouterr()
    train(args)
    return capsys.readouterr().err


# (point, n): n counts within the attempt, which resumes from the checkpoint the previous kill left.
CHOSEN = [("metrics", 3), ("ckpt_items", 2), ("ckpt_finalize", 1), ("ckpt_delete", 1), ("adapters", 1)]


@pytest.mark.slow  # CI's `make test-slow`; the default run resumes after SIGTERM/stop (tests/train/test_resume.py)
def test_kill_9_at_chosen_points_then_resume(assets, tmp_path, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(lm_args(assets, whole, *BASE))
    args = lm_args(assets, cut, *BASE)
    latest = []
    for point, n in CHOSEN:
        latest.append(_killed_at(cut, args, point, n))
    # metrics row 3 torn: checkpoint 2. From 2: killed writing the meta of 6 (4 saved); from 4: before the
    # rename of 6; from 4 again: deleting step 2 once 6 is saved (keep=2); from 6: at the adapters rename
    # after the last checkpoint (10).
    assert latest == [2, 4, 4, 6, 10]
    assert "resumed from step 10" in _resume_message(cut, args, capsys)
    _compare(whole, cut)


@pytest.mark.slow  # (the default run has the chosen points; random moments: here and below)
def test_kill_9_at_a_random_moment_then_resume(assets, tmp_path, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(lm_args(assets, whole, *BASE))
    args = lm_args(assets, cut, *BASE)
    latest = _killed_randomly(cut, args, random.Random(0))
    err = _resume_message(cut, args, capsys)
    assert (f"resumed from step {latest}" in err) if latest else "resumed" not in err
    _compare(whole, cut)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kill_9_many_times_at_random_then_resume(assets, tmp_path, capsys, variant):
    """Five random kills per variant (DyLoRA's sampled rank, Delta-LoRA's changed frozen weights and
    LoRA-drop's selection are state that must come back), then the run is finished."""
    extra = [*BASE, *VARIANTS[variant]]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(lm_args(assets, whole, *extra))
    args = lm_args(assets, cut, *extra)
    rng = random.Random(f"kill-{variant}")
    kills = 0
    for _ in range(5):
        latest = _killed_randomly(cut, args, rng, allow_finish=True)
        if latest == -1:  # the kill came after the run's end
            break
        kills += 1
    assert kills >= 3
    if latest != -1:
        err = _resume_message(cut, args, capsys)
        assert re.search(r"resumed from step \d+", err) or latest is None
    _compare(whole, cut)
