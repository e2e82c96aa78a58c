"""`make demo`: adapt a small transformer with LoRA, fine-tune it, show the loss fall.

A character-level causal transformer (random base weights) gets rank-8 LoRA adapters on every
attention and MLP projection of its stacked layers; only the adapters train (Adam, jit, scan
over layers, dropout keys set per step) on the Zen of Python. The run then checks that the
merged weights give the same logits as the factored adapters and samples a line.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_variants as lv
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer, lm_loss


def corpus() -> str:
    """The Zen of Python (stdlib ``this``, which prints it on import: silenced)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def main(steps: int = 150, seq: int = 64, batch: int = 16) -> int:
    text = corpus().encode("ascii")
    data = np.frombuffer(text, np.uint8).astype(np.int32)
    model = TinyTransformer(TinyConfig(vocab_size=256, d_model=128, n_heads=4, d_ff=512, n_layers=4))
    base = model.init(jax.random.key(0))
    spec = lv.AdapterSpec(
        targets=r"layers/(attn|mlp)/\w+_proj", stacked=STACKED, r=8, alpha=16, dropout=0.05
    )
    adapted = lv.adapt(base, spec, jax.random.key(1))
    trainable, frozen = lv.split(adapted, extra=r"lm_head")
    count = lv.count_params(adapted, extra=r"lm_head")
    print(f"model: {model.config}")
    print(f"adapters: {spec}")
    print(
        f"trainable {count.trainable:,} of {count.total:,} params ({100 * count.trainable_fraction:.2f}%), "
        f"adapter bytes {lv.tree_bytes(trainable):,}"
    )

    opt = optax.adam(3e-3)
    opt_state = opt.init(trainable)

    @jax.jit
    def step(trainable, opt_state, ids, key):
        def loss_fn(t):
            tree = lv.with_dropout(lv.combine(t, frozen), key)
            return lm_loss(model.apply(tree, ids), ids)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    rng = np.random.default_rng(0)
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        starts = rng.integers(0, len(data) - seq, batch)
        ids = jnp.asarray(np.stack([data[s : s + seq] for s in starts]))
        trainable, opt_state, loss = step(trainable, opt_state, ids, jax.random.key(i))
        losses.append(float(loss))
        if i % 25 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {losses[-1]:.3f}  ({time.perf_counter() - t0:.1f}s)")

    tuned = lv.combine(trainable, frozen)
    probe = jnp.asarray(data[None, :seq])
    gap = float(jnp.max(jnp.abs(model.apply(lv.merge(tuned), probe) - model.apply(tuned, probe))))
    print(f"merged vs factored logits: max |diff| = {gap:.2e}")

    next_token = jax.jit(lambda tree, ids: jnp.argmax(model.apply(tree, ids)[0, -1]))
    out = list(text[:seq])
    for _ in range(80):
        out.append(int(next_token(tuned, jnp.asarray([out[-seq:]], jnp.int32))))
    print("greedy sample:", bytes(out).decode("ascii", "replace").replace("\n", " | "))

    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"loss fell from {first:.3f} to {last:.3f}")
    ok = last < 0.5 * first and gap < 1e-3
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
