"""Generation speed: the KV cache (``model.generate``) against recomputing the whole buffer for every new
token (the generator before the cache), same model, same prompts, same process; greedy, so both must give
the same tokens.

    python bench/bench_generate.py [--new 256 --prompt 32 --batch 4 --d 512 --layers 8]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from lorax_variants import hf


@partial(jax.jit, static_argnums=(0, 1))
def recompute(model, max_new_tokens, params, input_ids):
    """Greedy over a fixed buffer, the whole buffer re-run for every new token (O(n²) per step)."""
    b, t = input_ids.shape
    total = t + max_new_tokens
    buf = jnp.zeros((b, total), jnp.int32).at[:, :t].set(input_ids)
    mask = jnp.zeros((b, total), jnp.int32).at[:, :t].set(1)

    def step(i, carry):
        buf, mask = carry
        logits = model.apply(params, buf, mask)
        token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i - 1, axis=1, keepdims=False), axis=-1)
        buf = jax.lax.dynamic_update_index_in_dim(buf, token.astype(jnp.int32)[:, None], i, axis=1)
        return buf, jax.lax.dynamic_update_index_in_dim(mask, jnp.ones((b, 1), jnp.int32), i, axis=1)

    return jax.lax.fori_loop(t, total, step, (buf, mask))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=a.d, intermediate_size=int(a.d * 2.75),
                                   num_hidden_layers=a.layers, num_attention_heads=a.d // 64, num_key_value_heads=a.d // 128,
                                   max_position_embeddings=4096)
    model = hf.from_config(cfg)
    params = model.init(jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (a.batch, a.prompt)), jnp.int32)
    cached = lambda: model.generate(params, ids, max_new_tokens=a.new)  # noqa: E731
    full = lambda: recompute(model, a.new, params, ids)  # noqa: E731
    same = np.array_equal(np.asarray(cached()), np.asarray(full()))  # (also compiles both)
    times = {"kv cache": [], "recompute": []}
    for _ in range(a.rounds):
        for name, fn in (("kv cache", cached), ("recompute", full)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    tokens = a.batch * a.new
    print(f"backend {jax.default_backend()}: Llama d={a.d}, {a.layers} layers, batch {a.batch}, prompt {a.prompt}, "
          f"{a.new} new tokens; same tokens: {same}")
    best = {k: min(v) for k, v in times.items()}
    for name, t in best.items():
        print(f"{name:10s} {t:8.2f} s  {tokens / t:9.1f} tokens/s")
    print(f"kv cache / recompute tokens/s: {best['recompute'] / best['kv cache']:.1f}x")


if __name__ == "__main__":
    main()
