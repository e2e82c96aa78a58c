"""PiSSA, principal singular values and vectors adaptation (arXiv 2404.02948; PEFT ``init_lora_weights="pissa"``).

A LoRA-shaped adapter (LoRA, DoRA, rsLoRA, LoRA-FA, ...: any variant built from ``lora_factors``) starts from
the weight's top-r singular triplets instead of a random A and a zero B, and the base becomes the residual:

    W = U S Vᵀ,   A = U_r sqrt(S_r / s),   B = sqrt(S_r / s) V_rᵀ,   W_res = W - s·A B

so W_res + s·A B = W at init (s the LoRA scale). This is PEFT's ``pissa_init`` (exact SVD) transposed to our
[in, out] layout; PEFT divides S_r by the scale the same way. ``AdapterSpec(init="pissa")``; the app's
``adapter.init: pissa``. Over a quantized base the weights it adapts are read in full precision, adapted, and
their residuals quantized (PiSSA + NF4, as QLoRA users of PiSSA do). PEFT re-runs the SVD on the base when it
loads an adapter saved with ``init_lora_weights="pissa"``, so the export needs no initial factors; with them
(``save_peft(..., initial=...)``) it is converted to plain LoRA on the original base."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax_variants.recipes import InitRecipe, register_init
from lorax_variants.registry import FactorInit, register_factor_init

__all__ = ["pissa_factors"]


def pissa_factors(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(A [in, r], B [r, out], W_res [in, out])`` in float32 for one 2-D weight."""
    w32 = w.astype(jnp.float32)
    u, s, vt = jnp.linalg.svd(w32, full_matrices=False)
    root = jnp.sqrt(s[:r] / scale)
    a = u[:, :r] * root[None, :]
    b = root[:, None] * vt[:r, :]
    return a, b, w32 - scale * (a @ b)


register_factor_init(FactorInit("pissa", "PiSSA", factors=pissa_factors))
register_init(InitRecipe("pissa", built_as="pissa", full_weights=True, moves_base=True, peft_reruns=True))
