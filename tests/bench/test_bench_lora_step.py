"""The benchmark runs, and its XLA FLOP counts agree with the analytic formula it prints."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_lora_step", Path(__file__).parents[2] / "bench" / "bench_lora_step.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.slow  # the default run is time-boxed; `make test-all` runs it
def test_small_run_matches_analytic_flops():
    res = bench.run(d=256, layers=2, seq=64, batch=2, r=4, reps=1)
    for mode in ("full", "lora"):
        assert res[mode]["flops"] == pytest.approx(res[mode]["analytic"], rel=0.05), mode
    # Factored LoRA skips the frozen weights' gradients: a third of the frozen matmul work.
    assert res["lora"]["flops"] < 0.8 * res["full"]["flops"]
    # merged() forms the deltas and back-propagates through them: as costly as full fine-tuning.
    assert res["merged"]["flops"] > 0.95 * res["full"]["flops"]
    assert res["full"]["trainable"] > 40 * res["lora"]["trainable"]


def test_reference_config_meets_the_flop_target_analytically():
    c = bench.TinyConfig(vocab_size=256, d_model=1024, n_heads=16, d_ff=4096, n_layers=8, max_len=256)
    tokens = 4 * 256
    ratio = bench.analytic_flops(c, tokens, 256, 16, "lora") / bench.analytic_flops(c, tokens, 256, 16, "full")
    assert ratio <= 0.70
