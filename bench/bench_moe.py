"""The mixture-of-experts block, forward + backward with LoRA on every expert bank: our tiles of one expert's
rows (``lorax_variants.models.moe``) against two baselines in the same process, as ratios:

- dense: every expert over every token, outputs masked by the routing weights (E/k times the FLOPs);
- ragged: ``jax.lax.ragged_dot`` over the rows sorted by expert (one grouped matmul per bank).

    python bench/bench_moe.py [--tokens 4096 --d 1024 --ffn 768 --experts 32 --top-k 4 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import lorax_variants as lv
from lorax_variants.models.moe import MoeConfig, moe_mlp, route


def _dense(x, p, cfg):
    """Every expert over every token; the routing weights select (the formulation we avoid)."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    weights, experts = route(flat, p["router"], cfg)
    gate = jnp.einsum("nd,edf->enf", flat, lv.merge(p["gate_proj"]).astype(x.dtype))
    up = jnp.einsum("nd,edf->enf", flat, lv.merge(p["up_proj"]).astype(x.dtype))
    out = jnp.einsum("enf,efd->end", jax.nn.silu(gate) * up, lv.merge(p["down_proj"]).astype(x.dtype))
    mix = jnp.zeros((flat.shape[0], cfg.num_experts), jnp.float32).at[jnp.arange(flat.shape[0])[:, None], experts].add(weights)
    return jnp.einsum("end,ne->nd", out.astype(jnp.float32), mix).astype(x.dtype).reshape(b, t, d)


def _ragged(x, p, cfg):
    """Rows sorted by expert, one ``ragged_dot`` per bank (LoRA factored: x W + s (x A) B per group)."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    weights, experts = route(flat, p["router"], cfg)
    k = cfg.top_k
    rows = jnp.repeat(flat, k, axis=0)
    e = experts.reshape(-1)
    order = jnp.argsort(e, stable=True)
    sizes = jnp.bincount(e, length=cfg.num_experts).astype(jnp.int32)
    xs = rows[order]

    def grouped(h, node):
        y = jax.lax.ragged_dot(h, node.weight.astype(h.dtype), sizes)
        mid = jax.lax.ragged_dot(h, node.lora_a.astype(h.dtype), sizes) * node.scale
        return y + jax.lax.ragged_dot(mid, node.lora_b.astype(h.dtype), sizes)

    h = jax.nn.silu(grouped(xs, p["gate_proj"])) * grouped(xs, p["up_proj"])
    ys = grouped(h, p["down_proj"])
    y = jnp.zeros_like(ys).at[order].set(ys).astype(jnp.float32) * weights.reshape(-1, 1)
    return jnp.sum(y.reshape(-1, k, d), axis=1).astype(x.dtype).reshape(b, t, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=384)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-dense", action="store_true", help="leave out the dense baseline (large E)")
    a = ap.parse_args()
    dtype = jnp.dtype(a.dtype)
    cfg = MoeConfig(num_experts=a.experts, top_k=a.top_k, intermediate_size=a.ffn, normalize=True, tile=a.tile)
    ks = jax.random.split(jax.random.key(0), 5)
    E, d, f = a.experts, a.d, a.ffn
    params = {"router": jax.random.normal(ks[0], (d, E), dtype) * 0.05,
              "gate_proj": (jax.random.normal(ks[1], (E, d, f)) * 0.02).astype(dtype),
              "up_proj": (jax.random.normal(ks[2], (E, d, f)) * 0.02).astype(dtype),
              "down_proj": (jax.random.normal(ks[3], (E, f, d)) * 0.02).astype(dtype)}
    banks = "(gate|up|down)_proj"
    tree = lv.adapt(params, lv.AdapterSpec(targets=banks, stacked=banks, r=a.r), 1)
    tree = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.01) if isinstance(n, lv.LoraNode) else n, tree,
                        is_leaf=lambda n: isinstance(n, lv.LoraNode))
    trainable, frozen = lv.split(tree)
    x = jax.random.normal(ks[4], (1, a.tokens, d), dtype)
    forms = {"tiles (ours)": lambda t, f: moe_mlp(x, lv.combine(t, f), jax.nn.silu, cfg),
             "ragged_dot": lambda t, f: _ragged(x, lv.combine(t, f), cfg)}
    if not a.skip_dense:
        forms["dense"] = lambda t, f: _dense(x, lv.combine(t, f), cfg)
    steps = {k: jax.jit(jax.value_and_grad(lambda t, f, fn=fn: jnp.sum(fn(t, f).astype(jnp.float32) ** 2)))
             for k, fn in forms.items()}
    ref = None
    for name, step in steps.items():
        out = step(trainable, frozen)
        jax.block_until_ready(out)
        ref = out[0] if ref is None else ref
        rel = abs(float(out[0]) - float(ref)) / max(abs(float(ref)), 1e-9)
        print(f"{name:14s} loss {float(out[0]):.6g} (relative to ours {rel:.1e})")
    times = {k: [] for k in steps}
    for _ in range(a.rounds):  # alternate the forms every round: the machine's drift hits all alike
        for name, step in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(trainable, frozen))
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["tiles (ours)"])
    print(f"backend {jax.default_backend()}, tokens {a.tokens}, d {d}, ffn {f}, experts {E}, top-{a.top_k}, r {a.r}, "
          f"{a.dtype}; median of {a.rounds}, fwd+bwd")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:14s} {m * 1e3:9.2f} ms   {m / base:5.2f}x ours")


if __name__ == "__main__":
    main()
