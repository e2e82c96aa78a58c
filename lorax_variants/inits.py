"""Initializations of adapter factors, in our ``[in, out]`` layout.

- ``kaiming``: loralib / PEFT default, ``kaiming_uniform(a=sqrt(5))`` on A, which is
  A ~ U(-1/sqrt(in), 1/sqrt(in)); B = 0, so the adapted model starts equal to the base.
- ``gaussian``: A ~ N(0, (1/r)^2) (PEFT's ``init_lora_weights="gaussian"``); B = 0.
- ``pissa`` (arXiv 2404.02948): with W = U S Vᵀ, A = U_r sqrt(S_r / s), B = sqrt(S_r / s) V_rᵀ
  and the base becomes the residual W - s·A B, so W_res + s·A B = W at init. This is PEFT's
  ``pissa_init`` transposed to [in, out] (PEFT divides S_r by the scale the same way).
- ``olora`` (arXiv 2406.01775): with Wᵀ = Q R (torch's [out, in] weight), B = Q_rᵀ, A = R_rᵀ and the base
  becomes W - s·A B, so again W_res + s·A B = W at init; PEFT's ``olora_init`` in our layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["kaiming_a", "gaussian_a", "pissa_factors", "olora_factors"]


def kaiming_a(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """A [..., in, r] ~ U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / (shape[-2] ** 0.5)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def gaussian_a(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """A [..., in, r] ~ N(0, 1/r²)."""
    return (jax.random.normal(key, shape, jnp.float32) / shape[-1]).astype(dtype)


def pissa_factors(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(A [in, r], B [r, out], W_res [in, out])`` in float32 for one 2-D weight."""
    w32 = w.astype(jnp.float32)
    u, s, vt = jnp.linalg.svd(w32, full_matrices=False)
    root = jnp.sqrt(s[:r] / scale)
    a = u[:, :r] * root[None, :]
    b = root[:, None] * vt[:r, :]
    return a, b, w32 - scale * (a @ b)


def olora_factors(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(A [in, r], B [r, out], W_res [in, out])`` in float32 for one 2-D weight (QR of ``Wᵀ``)."""
    w32 = w.astype(jnp.float32)
    q, rr = jnp.linalg.qr(w32.T)  # [out, k], [k, in]
    a, b = rr[:r].T, q[:, :r].T
    return a, b, w32 - scale * (a @ b)
