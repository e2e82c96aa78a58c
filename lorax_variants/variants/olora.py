"""OLoRA, orthonormal low-rank adaptation (arXiv 2406.01775; PEFT ``init_lora_weights="olora"``).

A LoRA-shaped adapter starts from a QR decomposition of the weight instead of a random A and a zero B, and
the base becomes the residual: with Wᵀ = Q R (torch's [out, in] weight),

    B = Q_rᵀ,   A = R_rᵀ,   W_res = W - s·A B

so W_res + s·A B = W at init; PEFT's ``olora_init`` in our [in, out] layout. ``AdapterSpec(init="olora")``;
the app's ``adapter.init: olora``. Quantized bases and exports as for PiSSA (``variants/pissa.py``): the
residual is quantized after the init, and PEFT re-runs the QR on the base when it loads the adapter (PEFT
refuses OLoRA with DoRA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax_variants.recipes import InitRecipe, register_init
from lorax_variants.registry import FactorInit, register_factor_init

__all__ = ["olora_factors"]


def olora_factors(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(A [in, r], B [r, out], W_res [in, out])`` in float32 for one 2-D weight (QR of ``Wᵀ``)."""
    w32 = w.astype(jnp.float32)
    q, rr = jnp.linalg.qr(w32.T)  # [out, k], [k, in]
    a, b = rr[:r].T, q[:, :r].T
    return a, b, w32 - scale * (a @ b)


register_factor_init(FactorInit("olora", "OLoRA", factors=olora_factors))
register_init(InitRecipe("olora", built_as="olora", full_weights=True, moves_base=True, peft_reruns=True))
