"""The performance suite (`make bench`) runs end to end in its reduced form and prints its table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


ALL = {"1 vs PEFT", "2 FLOPs", "3 MFU", "3 peak", "4 memory", "4 FSDP", "5 compile", "5 merged", "6 long"}


@pytest.mark.parametrize("variants, only, figures", [
    pytest.param("lora", "peft,flops", {"1 vs PEFT", "2 FLOPs", "3 MFU", "3 peak"}, marks=pytest.mark.slow),  # CI's test-slow
    pytest.param("lora,dora,vera,adalora,qlora,full", "peft,flops,memory,fsdp,compile,merged,long", ALL,
                 marks=pytest.mark.slow),
])
def test_suite_quick_prints_every_figure(tmp_path, variants, only, figures):
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--variants", variants,
                           "--only", only, "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r[1].split(":")[0] for r in rows if r[0] == "1 vs PEFT"] == variants.split(",")
    assert {r[0] for r in rows} == figures
    flops = {r[1]: float(r[2]) for r in rows if r[0] == "2 FLOPs"}
    # XLA's count and the formulas agree for every variant, even at this tiny size
    assert all(0.9 < v < 1.15 for k, v in flops.items() if "/ analytic" in k), flops
    fsdp = [r for r in rows if r[0] == "4 FSDP"]
    assert [r[4] for r in fsdp] == (["", "yes", "yes", "yes"] if "fsdp" in only else [])  # frozen bytes ~ 1/devices
    assert "| figure | case | value | target | met |" in proc.stdout


def test_suite_refuses_an_unknown_figure():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--only", "flops,speed"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "unknown figure(s) ['speed']" in proc.stderr
