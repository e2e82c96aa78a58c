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
