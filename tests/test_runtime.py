"""keep_host_memory: XLA:CPU's per-execution temporaries stop costing fresh pages every call."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys
    if sys.argv[1] == "keep":
        from lorax_variants.runtime import keep_host_memory
        assert not keep_host_memory("gpu") and not keep_host_memory("tpu")  # device hosts keep glibc's defaults
        assert keep_host_memory("cpu")
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))   # a [6144, 6144] f32 temporary: 151 MB
    x = jnp.ones((6144, 128))
    f(x).block_until_ready(); f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
""")


def _faults_per_call(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_host_memory_removes_the_page_faults_of_each_call():
    plain, kept = _faults_per_call("plain"), _faults_per_call("keep")
    assert plain > 10_000  # 151 MB of fresh pages each call: ~37,000 faults of 4 KiB
    assert kept < plain / 20, (plain, kept)
