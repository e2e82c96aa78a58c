"""bf16 on this CPU: one GEMM (2048x512 @ 512x1344, the suite's MLP shape) in float32 and bfloat16, XLA against
PyTorch, in GFLOP/s (medians of 20), and how XLA:CPU compiled the bf16 dot (its HLO: converts to float32 around
a float32 dot). The record behind retiring the bf16-on-CPU target (README, Benchmarks).

    python bench/bench_cpu_bf16.py
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

M, K, N = 2048, 512, 1344


def _gflops(fn, *args, rounds: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 2 * M * K * N / float(np.median(times)) / 1e9


def main() -> None:
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    bf16_isa = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    print(f"{platform.processor() or platform.machine()}, bf16 instructions: {bf16_isa or 'none'}; "
          f"JAX {jax.__version__} ({jax.default_backend()}), PyTorch {torch.__version__}")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((M, K)), rng.standard_normal((K, N))
    for jdt, tdt in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
        fn = jax.jit(lambda x, y: x @ y)
        xa, xb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
        hlo = fn.lower(xa, xb).compile().as_text()
        dots = sorted({line.split("=")[1].split("[")[0].strip() for line in hlo.splitlines() if " dot(" in line})
        converts = sum(" convert(" in line for line in hlo.splitlines())
        ours = _gflops(fn, xa, xb)
        ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
        theirs = _gflops(lambda x, y: torch.matmul(x, y).numpy() if tdt == torch.float32 else torch.matmul(x, y), ta, tb)
        print(f"{jnp.dtype(jdt).name:9s} XLA {ours:6.0f} GFLOP/s (compiled dot in {', '.join(dots)}, {converts} converts)"
              f"   PyTorch {theirs:6.0f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
