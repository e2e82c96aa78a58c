"""Initializations of adapter factors, in our ``[in, out]`` layout.

- ``kaiming``: loralib / PEFT default, ``kaiming_uniform(a=sqrt(5))`` on A, which is
  A ~ U(-1/sqrt(in), 1/sqrt(in)); B = 0, so the adapted model starts equal to the base.
- ``gaussian``: A ~ N(0, (1/r)^2) (PEFT's ``init_lora_weights="gaussian"``); B = 0.

The inits that take A, B from the weight (PiSSA, OLoRA) live in their modules under ``variants/``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["kaiming_a", "gaussian_a"]


def kaiming_a(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """A [..., in, r] ~ U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / (shape[-2] ** 0.5)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def gaussian_a(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """A [..., in, r] ~ N(0, 1/r²)."""
    return (jax.random.normal(key, shape, jnp.float32) / shape[-1]).astype(dtype)
