"""A DPO step against an SFT step on the same tokens, in one run: what the free reference costs.

    python bench/bench_preference.py [--d 512 --layers 4 --seq 256 --pairs 4 --r 16 --reps 5]

Model: the tiny pre-norm transformer (stacked layers under a scan), fp32, LoRA on every projection, Adam. The
same [2·pairs, seq] rows (chosen then rejected) go through: SFT (next-token loss on the completions), DPO with
the reference as the same tree with the adapters off inside the step (``reference="base"``: one more forward,
no gradient), DPO with cached reference log-probabilities (``"precomputed"``) and SimPO (no reference). Printed:
the median step time and its ratio to SFT's, and the compiled step's argument bytes (DPO-base must equal SFT's:
no second weight tree) and temporary bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_variants as lv
from lorax_variants import objectives as O
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer

TARGETS = r"layers/(attn|mlp)/\w+_proj"


def run(d: int = 512, layers: int = 4, seq: int = 256, pairs: int = 4, r: int = 16, reps: int = 5) -> dict[str, dict]:
    vocab = 512
    model = TinyTransformer(TinyConfig(vocab_size=vocab, d_model=d, n_heads=max(1, d // 64), d_ff=4 * d,
                                       n_layers=layers, max_len=seq))
    params = model.init(jax.random.key(0))
    tree = lv.adapt(params, lv.AdapterSpec(targets=TARGETS, stacked=STACKED, r=r, alpha=2 * r), 1)
    trainable, frozen = lv.split(tree)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, vocab, (2 * pairs, seq)), jnp.int32)
    mask = np.zeros((2 * pairs, seq), np.int32)
    mask[:, seq // 4:] = 1  # a quarter prompt, the rest completion
    batch = {"input_ids": ids, "completion_mask": jnp.asarray(mask)}

    def logps_fn(t, b):
        return O.completion_logps(model.apply(t, b["input_ids"]), b["input_ids"], b["completion_mask"])

    batch["ref_logps"] = jax.jit(lambda f: O.reference_logps(logps_fn, lv.combine(trainable, f), batch))(frozen)
    losses = {
        "SFT": lambda t, f, b: (lambda lp, n: -jnp.sum(lp) / jnp.sum(n))(*logps_fn(lv.combine(t, f), b)),
        "DPO (reference: base)": lambda t, f, b: O.preference_loss(logps_fn, lv.combine(t, f), b).loss,
        "DPO (reference: precomputed)": lambda t, f, b: O.preference_loss(logps_fn, lv.combine(t, f), b,
                                                                          reference="precomputed").loss,
        "SimPO": lambda t, f, b: O.preference_loss(logps_fn, lv.combine(t, f), b, objective="simpo").loss,
    }
    opt = optax.adam(1e-4)
    out = {}
    for name, loss in losses.items():
        def step(t, s, f, b, loss=loss):
            value, g = jax.value_and_grad(loss)(t, f, b)
            u, s = opt.update(g, s, t)
            return optax.apply_updates(t, u), s, value

        use = batch if "precomputed" in name else {k: v for k, v in batch.items() if k != "ref_logps"}
        state = opt.init(trainable)
        compiled = jax.jit(step).lower(trainable, state, frozen, use).compile()
        mem = compiled.memory_analysis()
        t, s = trainable, state
        t, s, v = compiled(t, s, frozen, use)
        jax.block_until_ready(v)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            t, s, v = compiled(t, s, frozen, use)
            jax.block_until_ready(v)
            times.append(time.perf_counter() - start)
        out[name] = {"seconds": statistics.median(times), "argument_bytes": mem.argument_size_in_bytes,
                     "temp_bytes": mem.temp_size_in_bytes}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    res = run(a.d, a.layers, a.seq, a.pairs, a.r, a.reps)
    sft = res["SFT"]
    print(f"d={a.d} layers={a.layers}: {2 * a.pairs} rows of {a.seq} tokens (LoRA r={a.r}, fp32, {jax.devices()[0].platform})")
    print(f"{'step':30} {'median s':>9} {'/ SFT':>6} {'argument MiB':>13} {'temp MiB':>9}")
    for name, r in res.items():
        print(f"{name:30} {r['seconds']:>9.3f} {r['seconds'] / sft['seconds']:>6.2f} "
              f"{r['argument_bytes'] / 2**20:>13.2f} {r['temp_bytes'] / 2**20:>9.2f}")


if __name__ == "__main__":
    main()
