"""LoftQ (arXiv 2310.08659): LoRA factors that make a quantized base plus the adapter start close to the
full-precision weight, instead of QLoRA's start at the quantized weight alone.

For each adapted weight W, T times: quantize the residual R (first R = W), Q = quant(R); take the rank-r
SVD of W − deq(Q) as s·A B; R = W − s·A B. The last Q is the frozen base, A and B the adapter, so that
Q + s·A B ≈ W (Algorithm 1 of the paper; PEFT's ``loftq_init``). PEFT stores the SVD factors unscaled,
which is exact only when ``lora_alpha == r``; here A and B are divided by √s each, so Q + s·A B ≈ W at any
alpha. Stacked layers are done one at a time (one full-precision layer in memory beside the result).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.adapt import adapt
from lorax_variants.nodes.base import Node
from lorax_variants.recipes import InitRecipe, register_init
from lorax_variants.variants.lora import LoraNode
from lorax_variants.quant import QuantSpec, dequantize, quantize_array, quantize_paths, quantized_paths
from lorax_variants.spec import AdapterSpec
from lorax_variants.tree import map_with_paths

__all__ = ["loftq", "loftq_factors", "LoftQ"]


def loftq_factors(w: jax.Array, r: int, scale: float, qspec: QuantSpec, iters: int = 1,
                  path: str = "weight") -> tuple[Any, jax.Array, jax.Array]:
    """``(quantized node, A [in, r], B [r, out])`` for one weight ``w [in, out]`` (float32 math): T = ``iters``
    alternations of quantization and the rank-``r`` SVD of the residual."""
    if iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iters}")
    w32 = jnp.asarray(w, jnp.float32)
    res = w32
    for i in range(iters):
        q = quantize_array(res, qspec, path)
        u, sv, vt = jnp.linalg.svd(w32 - dequantize(q, jnp.float32), full_matrices=False)
        root = jnp.sqrt(sv[:r] / scale)
        a, b = u[:, :r] * root, root[:, None] * vt[:r]
        if i + 1 < iters:
            res = w32 - scale * (a @ b)
    return q, a, b


def loftq(params: Any, spec: AdapterSpec, qspec: QuantSpec, key: Any, iters: int = 1) -> Any:
    """``params`` adapted (``spec``, variant ``"lora"``) and quantized (``qspec``) as QLoRA would give them,
    ``quantize(adapt(params, spec, key), qspec)``, except that every adapter over a weight ``qspec.targets``
    quantizes gets LoftQ's A, B (``loftq_factors``) instead of its usual start. Adapters over weights left in
    full precision keep ``spec.init`` (there is no quantization error to make up for); quantized weights
    without an adapter are quantized plainly. Stacked weights are done layer by layer."""
    if spec.variant != "lora":
        raise ValueError(f"LoftQ initializes LoRA adapters; AdapterSpec.variant is {spec.variant!r}")
    chosen = quantized_paths(params, qspec)
    adapted = adapt(params, spec, key)
    done: set[str] = set()

    def one(path: str, node: Any) -> Any:
        if not isinstance(node, LoraNode) or path not in chosen:
            return node
        w = node.weight
        if isinstance(w, Node) or not jnp.issubdtype(getattr(w, "dtype", np.int8), jnp.floating):
            raise ValueError(f"{path}: LoftQ needs the full-precision weight (quantize after, not before)")
        r, s = node.lora_a.shape[-1], float(node.scale)
        lead = w.shape[:-2]
        flat = w.reshape((-1,) + w.shape[-2:])
        parts = [loftq_factors(flat[i], r, s, qspec, iters, path) for i in range(flat.shape[0])]
        stack = lambda xs: jnp.stack(xs).reshape(lead + xs[0].shape)  # noqa: E731
        q = parts[0][0] if not lead else jax.tree.map(lambda *xs: stack(list(xs)), *[p[0] for p in parts])
        dtype = node.lora_a.dtype
        done.add(path)
        return node.replace(weight=q, lora_a=stack([p[1] for p in parts]).astype(dtype),
                            lora_b=stack([p[2] for p in parts]).astype(dtype))

    out = map_with_paths(one, adapted, nodes_are_leaves=True)
    return quantize_paths(out, qspec, chosen - done)


@dataclasses.dataclass(frozen=True)
class LoftQ:
    """LoftQ's alternations of quantization and SVD (``iters``, PEFT's ``loftq_iter``)."""

    iters: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"LoftQ.iters must be a positive integer, got {self.iters!r}")


register_init(InitRecipe(
    "loftq", LoftQ, built_as="gaussian", full_weights=True, lora_only=True, needs_quant=True,
    on_quantized=lambda s, params, spec, qspec, key: loftq(params, spec, qspec, key, iters=s.iters)))
