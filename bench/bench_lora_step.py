"""One training step: factored LoRA vs the merged() path vs full fine-tuning, in one run.

    python bench/bench_lora_step.py [--d 1024 --layers 8 --seq 256 --batch 4 --r 16 --reps 5]

Model: the tiny pre-norm transformer (4 d x d attention projections + d x 4d / 4d x d MLP per
layer, stacked, scan over layers), fp32, Adam. Adapters on all 6 projections of every layer.

Printed per mode, as ratios to full fine-tuning measured in the same process:
- XLA cost-analysis FLOPs of the jitted step, compiled unrolled (cost analysis counts a scan
  body once), next to the analytic count: full 6·N·T, factored LoRA 4·N·T (+ adapters),
  N = matmul weights, T = tokens; attention score/value matmuls are added to both.
- median wall time of the step (scan build, the way one trains).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax

import lorax_variants as lv
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer, lm_loss


def make_step(model: TinyTransformer, mode: str, opt: optax.GradientTransformation, scan: bool) -> Callable:
    """A jitted step; the frozen tree is an argument (closing over it would embed the weights
    as constants, which XLA then constant-folds: minutes of compile at d=2048)."""
    forward = lv.merged(model.apply) if mode == "merged" else model.apply

    def step(trainable, opt_state, frozen, ids):
        def loss_fn(t):
            tree = t if frozen is None else lv.combine(t, frozen)
            return lm_loss(forward(tree, ids, scan=scan), ids)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def analytic_flops(c: TinyConfig, tokens: int, seq: int, r: int, mode: str) -> float:
    d, f, L = c.d_model, c.d_ff, c.n_layers
    n_matmul = L * (4 * d * d + 2 * d * f) + d * c.vocab_size
    n_adapter = L * r * (4 * (d + d) + (d + f) + (f + d))
    attention = L * 2 * (2 * seq * d) * tokens  # QKᵀ and PV, forward, causal mask not exploited
    if mode == "full":
        return 6 * n_matmul * tokens + 3 * attention
    # Frozen: forward + input gradient (the head's too); adapters: forward, input and weight grads;
    # minus the gradient into layer 0's attention input (q/k/v frozen and A), which nothing
    # trainable needs: XLA drops it.
    unused = 2 * tokens * 3 * (d * d + d * r)
    return 4 * n_matmul * tokens + 6 * n_adapter * tokens + 3 * attention - unused


def run(d: int, layers: int, seq: int, batch: int, r: int, reps: int) -> dict[str, dict[str, float]]:
    config = TinyConfig(vocab_size=256, d_model=d, n_heads=max(1, d // 64), d_ff=4 * d, n_layers=layers, max_len=seq)
    model = TinyTransformer(config)
    params = model.init(jax.random.key(0))
    spec = lv.AdapterSpec(targets=r"layers/(attn|mlp)/\w+_proj", stacked=STACKED, r=r, alpha=2 * r)
    adapted = jax.tree.map(lambda x: x + 1e-3, lv.adapt(params, spec, jax.random.key(1)))
    ids = jax.random.randint(jax.random.key(2), (batch, seq), 0, config.vocab_size)
    opt = optax.adam(1e-4)
    results: dict[str, dict[str, float]] = {}
    for mode in ("full", "lora", "merged"):
        if mode == "full":
            trainable, frozen = params, None
        else:
            trainable, frozen = lv.split(adapted)
        fresh = lambda: (jax.tree.map(jnp.copy, trainable), opt.init(trainable))  # noqa: E731
        unrolled = make_step(model, mode, opt, scan=False).lower(*fresh(), frozen, ids).compile()
        flops = float(unrolled.cost_analysis()["flops"])
        step = make_step(model, mode, opt, scan=True)
        t, s = fresh()
        t, s, loss = step(t, s, frozen, ids)  # compile + warm up
        loss.block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            t, s, loss = step(t, s, frozen, ids)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
        results[mode] = {
            "flops": flops,
            "analytic": analytic_flops(config, batch * seq, seq, r, "full" if mode == "full" else "lora"),
            "time": statistics.median(times),
            "trainable": lv.count_params(trainable, extra=".*" if mode == "full" else None).trainable,
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    res = run(a.d, a.layers, a.seq, a.batch, a.r, a.reps)
    full = res["full"]
    print(f"one train step, d={a.d} layers={a.layers} seq={a.seq} batch={a.batch} r={a.r}, fp32, "
          f"{jax.devices()[0].platform} x{jax.device_count()}, median of {a.reps}")
    print(f"{'mode':8} {'trainable':>12} {'XLA GFLOP':>10} {'analytic':>10} {'XLA/analytic':>12} "
          f"{'FLOPs/full':>10} {'time s':>8} {'time/full':>9}")
    for mode, r in res.items():
        print(f"{mode:8} {r['trainable']:>12,} {r['flops'] / 1e9:>10.1f} {r['analytic'] / 1e9:>10.1f} "
              f"{r['flops'] / r['analytic']:>12.3f} {r['flops'] / full['flops']:>10.3f} "
              f"{r['time']:>8.3f} {r['time'] / full['time']:>9.3f}")


if __name__ == "__main__":
    main()
