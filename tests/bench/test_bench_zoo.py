"""The zoo benchmark runs; and, deterministically, a scanned model's program does not grow with depth."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from lorax_variants import hf

spec = importlib.util.spec_from_file_location("bench_zoo", Path(__file__).parents[2] / "bench" / "bench_zoo.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _hlo_lines(layers: int, scan: bool) -> int:
    model = hf.from_config(bench.llama_config(128, layers), scan=scan)
    params = jax.eval_shape(model.init, jax.random.key(0))
    ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    step = jax.jit(jax.grad(lambda p, ids: jnp.sum(model.apply(p, ids))))
    return len(step.lower(params, ids).compile().as_text().splitlines())


@pytest.mark.slow  # CI's `make test-slow`
def test_scanned_program_size_is_flat_in_depth():
    assert _hlo_lines(32, scan=True) <= 1.05 * _hlo_lines(2, scan=True)
    assert _hlo_lines(8, scan=False) > 2 * _hlo_lines(2, scan=False)  # unrolled grows: the check can see it


def test_benchmark_functions_run_small():
    assert bench.compile_seconds(128, 2, 16, 1, scan=True) > 0
    jax_s, torch_s = bench.fwd_bwd_ratio(128, 2, 16, 1, reps=1)
    assert jax_s > 0 and torch_s > 0
