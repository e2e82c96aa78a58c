"""The QLoRA benchmark runs small; its weight-byte ratio is a deterministic figure, so it is asserted."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_qlora", Path(__file__).parents[2] / "bench" / "bench_qlora.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


import lorax_variants as lv


def test_weight_bytes_ratio_at_the_benchmark_size():
    """QLoRA's frozen bytes over bf16 LoRA's, d=2048 x 8 layers, from abstract shapes (target <= 0.27)."""
    frozen = [lv.tree_bytes(lv.split(bench.build(2048, 8, q, abstract=True)[1])[1]) for q in (False, True)]
    assert frozen[1] / frozen[0] <= 0.27


@pytest.mark.slow  # the default run is time-boxed; `make test-all` runs it
def test_memory_analysis_and_timing_run_small():
    lora = bench.memory(256, 2, 32, 1, quantized=False, remat="full")
    qlora = bench.memory(256, 2, 32, 1, quantized=True, remat="full")
    assert qlora["frozen"] < 0.5 * lora["frozen"] and qlora["args"] < lora["args"]
    assert bench.step_time(256, 1, 16, 1, quantized=True, reps=1) > 0
