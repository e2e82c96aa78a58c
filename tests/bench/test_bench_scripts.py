"""The app benchmark runs end to end at a tiny size (slow: a minute of compiles)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("script, args", [
    ("bench_train_app.py", ["--d", "64", "--layers", "2", "--seq", "16", "--batch", "4", "--steps", "3",
                            "--variants", "full,lora"]),
])
def test_bench_script_runs_small(script, args):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora" in proc.stdout and "x" in proc.stdout.splitlines()[-1]


@pytest.mark.slow  # CI's `make test-slow`; the same memory equality is asserted by default in tests/test_objectives.py
def test_preference_bench_runs_small_and_the_reference_adds_no_argument_bytes():
    """The DPO-vs-SFT benchmark at a tiny size: every row printed; DPO with the in-step reference compiles to the
    SFT step's argument bytes (the printed MiB column, from the compiled memory analysis)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_preference.py"), "--d", "32", "--layers", "1",
                           "--seq", "16", "--pairs", "2", "--r", "2", "--reps", "1"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[:30].strip(): line[30:].split() for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"SFT", "DPO (reference: base)", "DPO (reference: precomputed)", "SimPO"}
    assert rows["DPO (reference: base)"][2] == rows["SFT"][2]
