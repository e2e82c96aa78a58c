"""The factored low-rank product every adapter applies, and dropout on the adapter input.

    y = ((s · x A) ∘ mid) B ∘ out

``low_rank`` has a hand-written backward pass (every gradient a matmul of operands in their natural
layout); the variants pass their own ``mid`` (a per-rank vector) and ``out`` (a per-output vector).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["low_rank", "adapter_dropout"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank(
    x: jax.Array, a: jax.Array, b: jax.Array, scale: float, mid: jax.Array | None = None, out: jax.Array | None = None
) -> jax.Array:
    """``((s·x A) ∘ mid) B ∘ out`` with a hand-written backward pass.

    ``mid`` [r] scales the rank-r intermediate (AdaLoRA's singular values, SoRA's gate, VeRA's
    λ_d, DyLoRA's per-rank scale), ``out`` [out] the result (VeRA's λ_b, DoRA's m/‖·‖); either
    may be None. Autodiff of the two thin matmuls makes XLA:CPU transpose the full
    ``[tokens, out]`` output gradient (a copy per adapted weight per layer) to form dB; here
    every gradient is a matmul of operands in their natural layout. With g = ∂L/∂y,
    h₀ = s·x A, h = h₀ ∘ mid, z = h B, gz = g ∘ out:
    ∂L/∂out = Σ_tokens g ∘ z,  ∂L/∂B = hᵀ gz,  gh = gz Bᵀ,  ∂L/∂mid = Σ_tokens gh ∘ h₀,
    gh₀ = gh ∘ mid,  ∂L/∂A = s·xᵀ gh₀,  ∂L/∂x = s·gh₀ Aᵀ   (z is recomputed: r·out per token).
    Measured on 2 CPU cores, x [2048, 512], W [512, 1344], r=16, fwd+bwd: autodiff 60 ms, this 37 ms,
    no adapter 33 ms; a whole LoRA train step of a d=512, 8-layer Llama: 3.05 s -> 2.47 s.
    """
    return _low_rank_fwd(x, a, b, scale, mid, out)[0]


def _low_rank_fwd(x, a, b, scale, mid, out):
    h0 = jnp.matmul(x, a) * jnp.asarray(scale, x.dtype)
    h = h0 if mid is None else h0 * mid.astype(x.dtype)
    z = jnp.matmul(h, b)
    return (z if out is None else z * out.astype(z.dtype)), (x, h0, a, b, mid, out)


def _low_rank_bwd(scale, res, g):
    x, h0, a, b, mid, out = res
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    x2, h02, g2 = flat(x), flat(h0), flat(g)
    h2 = h02 if mid is None else h02 * mid.astype(h02.dtype)
    d_out = None
    if out is not None:
        d_out = jnp.sum(g2.astype(jnp.float32) * jnp.matmul(h2, b).astype(jnp.float32), axis=0)
        d_out = d_out.reshape(out.shape).astype(out.dtype)
        g2 = g2 * out.astype(g2.dtype)
    gh = jnp.matmul(g2, b.T)
    d_mid = None
    if mid is not None:
        d_mid = jnp.sum(gh.astype(jnp.float32) * h02.astype(jnp.float32), axis=0).reshape(mid.shape).astype(mid.dtype)
        gh = gh * mid.astype(gh.dtype)
    gh = gh * jnp.asarray(scale, gh.dtype)
    dx = jnp.matmul(gh, a.T).reshape(x.shape).astype(x.dtype)
    return dx, jnp.matmul(x2.T, gh).astype(a.dtype), jnp.matmul(h2.T, g2).astype(b.dtype), d_mid, d_out


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def adapter_dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout on the adapter input (identity without a key: evaluation)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))
