"""Blockwise 4/8-bit quantization of frozen weights: NF4 (QLoRA, arXiv 2305.14314) exactly as
bitsandbytes, symmetric int4 and int8, each with optional double quantization.

For a weight W [in, out] (our layout; torch's is [out, in]), blocks of ``block_size`` run
along the input axis of each output unit, which is bitsandbytes' order over torch's
row-major [out, in] tensor:

    absmax_b = max |w| over block b
    NF4:   q = #{midpoints m_j of the sorted NF4 code : m_j < clip(w · (1/absmax_b), -1, 1)}
           (nearest code, a tie goes to the lower one, as ``torch.bucketize``)
    int4:  q = round(w / (absmax_b / 7)) ∈ [-7, 7];  int8: q = round(w / (absmax_b / 127))
    int4_asym (min-max with a zero point, as GPTQ/AWQ/HQQ groups): range_b = max_b - min_b,
           q = round((w - min_b) / (range_b / 15)) ∈ [0, 15],  ŵ = q · range_b / 15 + zero_b,  zero_b = min_b.
           The zero point is a float (float32) per block, so an adapter constant over a block folds into it
           exactly (QA-LoRA, ``nodes/qalora.py``); the range is stored where the others keep absmax.

Double quantization (QLoRA §3): c = mean(absmax); absmax - c is quantized to 8 bits with
bitsandbytes' signed dynamic code in blocks of 256 (in bitsandbytes' flat order), with one
fp32 scale per block, rounding to the nearest code as bitsandbytes' CPU kernel does;
dequantized absmax = code8[q8] · scale + c.

Storage keeps the weight's 2-D layout, so the weight's sharding applies unchanged:
4-bit codes ``[in/2, out]`` uint8 (rows 2i and 2i+1 in the high and low nibble), int8 codes
``[in, out]``, absmax (or its 8-bit codes) ``[in/block, out]``; the second-level scales
``[n/256]`` and the offset are tiny and replicated; int4_asym's zero points ``[in/block, out]`` float32.
Double quantization applies to absmax (the range for int4_asym), never to zero points. NF4 with double quantization costs
4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import AdapterNode, Node
from lorax_variants.nodes.quantized import DYNAMIC_CODE, FP4_CODE, NF4_CODE, QuantizedNode
from lorax_variants.tree import closest_paths, compile_patterns, leaves_with_paths, map_with_paths, matches

__all__ = ["QuantSpec", "quantize", "quantize_array", "dequantize", "NF4_CODE", "FP4_CODE", "DYNAMIC_CODE", "KINDS"]

KINDS = ("nf4", "int4", "int4_asym", "int8")



@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Which leaves to quantize and how (``kind`` nf4 | int4 | int8)."""

    targets: str | tuple[str, ...]
    kind: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    block_size2: int = 256
    stacked: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        compile_patterns(self.targets, what="QuantSpec.targets")
        if self.kind not in KINDS:
            raise ValueError(f"QuantSpec.kind must be one of {KINDS}, got {self.kind!r}")
        for field in ("block_size", "block_size2"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2 or v % 2:
                raise ValueError(f"QuantSpec.{field} must be an even integer >= 2, got {v!r}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"QuantSpec.double_quant must be true or false, got {self.double_quant!r}")
        if self.stacked is not None:
            compile_patterns(self.stacked, what="QuantSpec.stacked")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-able dict (saved with checkpoints and plans)."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        return d


def _blockwise(x: jax.Array, code: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [n_blocks, block] -> (nearest code index uint8, absmax [n_blocks]) as bitsandbytes."""
    absmax = jnp.max(jnp.abs(x), axis=-1)
    scaled = jnp.clip(x * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0)
    bounds = (code[:-1] + code[1:]) / 2
    return jnp.searchsorted(bounds, scaled, side="left").astype(jnp.uint8), absmax


def _blockwise_nearest(x: jax.Array, code: jax.Array) -> tuple[jax.Array, jax.Array]:
    """8-bit blockwise as bitsandbytes' CPU kernel (``quantize_block``): v = x / absmax; the code
    at or left of v by binary search (with code[0] taken as -1), moved right when strictly nearer."""
    absmax = jnp.max(jnp.abs(x), axis=-1)
    v = x / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    search = code.at[0].set(-1.0)
    left = jnp.clip(jnp.searchsorted(search, v, side="right") - 1, 0, code.shape[0] - 1)
    right = jnp.minimum(left + 1, code.shape[0] - 1)
    nearer = jnp.abs(v - search[right]) < jnp.abs(v - search[left])
    return jnp.where(nearer & (left < code.shape[0] - 1), right, left).astype(jnp.uint8), absmax


def _double_quant(absmax: jax.Array, block2: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """absmax [nb, out] -> (codes uint8 [nb, out], scales [ceil(n / block2)], offset [])."""
    flat = absmax.T.reshape(-1)  # bitsandbytes' order: output-major
    offset = jnp.mean(flat)
    n = flat.shape[0]
    padded = jnp.pad(flat - offset, (0, -n % block2)).reshape(-1, block2)
    q, scale = _blockwise_nearest(padded, jnp.asarray(DYNAMIC_CODE))
    return q.reshape(-1)[:n].reshape(absmax.shape[::-1]).T, scale, offset


def _quantize_2d(w: jax.Array, spec: QuantSpec) -> dict[str, jax.Array]:
    d_in, d_out = w.shape
    bs = spec.block_size
    blocks = w.astype(jnp.float32).T.reshape(d_out * d_in // bs, bs)
    if spec.kind == "nf4":
        q, absmax = _blockwise(blocks, jnp.asarray(NF4_CODE))
    elif spec.kind == "int4_asym":
        low, high = jnp.min(blocks, axis=-1), jnp.max(blocks, axis=-1)
        absmax = high - low  # the block's range
        step = jnp.maximum(absmax, 1e-38) / 15.0
        q = jnp.clip(jnp.round((blocks - low[:, None]) / step[:, None]), 0, 15).astype(jnp.uint8)
    else:
        qmax = 7.0 if spec.kind == "int4" else 127.0
        absmax = jnp.max(jnp.abs(blocks), axis=-1)
        scale = jnp.maximum(absmax, 1e-38) / qmax
        q = jnp.clip(jnp.round(blocks / scale[:, None]), -qmax, qmax).astype(jnp.int8)
        if spec.kind == "int4":
            q = (q + 8).astype(jnp.uint8)
    q = q.reshape(d_out, d_in)
    if spec.kind == "int8":
        codes = q.T
    else:
        codes = ((q[:, 0::2] << 4) | q[:, 1::2]).T  # [in/2, out]
    absmax = absmax.reshape(d_out, d_in // bs).T  # [in/bs, out]
    out = {"codes": codes}
    if spec.kind == "int4_asym":
        out["zeros"] = low.reshape(d_out, d_in // bs).T
    if spec.double_quant:
        out["qabsmax"], out["absmax2"], out["offset"] = _double_quant(absmax, spec.block_size2)
    else:
        out["absmax"] = absmax
    return out


def quantize_array(w: jax.Array, spec: QuantSpec, path: str = "weight") -> QuantizedNode:
    """Quantize one weight ``[..., in, out]`` (leading axes: stacked layers, each its own scales)."""
    if w.ndim < 2:
        raise ValueError(f"{path}: only weights [in, out] can be quantized, got shape {tuple(w.shape)}")
    d_in = w.shape[-2]
    if d_in % spec.block_size:
        raise ValueError(f"{path}: input dimension {d_in} is not a multiple of QuantSpec.block_size={spec.block_size}")
    fn = lambda m: _quantize_2d(m, spec)  # noqa: E731
    for _ in w.shape[:-2]:
        fn = jax.vmap(fn)
    fields = fn(w)
    return QuantizedNode(
        **fields, kind=spec.kind, block_size=spec.block_size, block_size2=spec.block_size2,
        in_out=tuple(w.shape[-2:]), orig_dtype=jnp.dtype(w.dtype).name,
    )


def dequantize(node: QuantizedNode, dtype: Any = None) -> jax.Array:
    """The dense weight ``[..., in, out]`` a quantized node stands for (float32 math, then ``dtype``)."""
    return node.dequantize(dtype)


def quantize(params: Any, spec: QuantSpec) -> Any:
    """Replace every leaf matching ``spec.targets`` by a ``QuantizedNode``.

    A target that is an adapter node has its frozen ``weight`` quantized (e.g. PiSSA's residual,
    then QLoRA on top). Errors name the path: a pattern matching nothing, a leaf already
    quantized, a non-2-D weight (3-D under ``spec.stacked``), an input dim not divisible by the block.
    """
    return quantize_paths(params, spec, quantized_paths(params, spec))


def quantized_paths(params: Any, spec: QuantSpec) -> set[str]:
    """The paths of ``params`` that ``quantize(params, spec)`` quantizes (an error if there are none)."""
    targets = compile_patterns(spec.targets, what="QuantSpec.targets")
    leaves = leaves_with_paths(params, nodes_are_leaves=True)
    chosen = {p for p, _ in leaves if matches(p, targets)}
    if not chosen:
        shown = spec.targets if isinstance(spec.targets, str) else "|".join(spec.targets)
        raise ValueError(f"QuantSpec.targets {spec.targets!r} matched no leaf. Closest paths: "
                         f"{closest_paths(shown, [p for p, _ in leaves])}")
    return chosen


def quantize_paths(params: Any, spec: QuantSpec, chosen: set[str]) -> Any:
    """``params`` with the leaves at ``chosen`` paths quantized per ``spec`` (its targets are not consulted)."""
    stacked = compile_patterns(spec.stacked, what="QuantSpec.stacked")

    def one(path: str, leaf: Any) -> Any:
        if path not in chosen:
            return leaf
        if isinstance(leaf, AdapterNode):
            return leaf.with_weight(one(path, leaf.weight))  # a variant's statistics of W follow it
        if isinstance(leaf, Node):
            raise ValueError(f"{path} is already a {type(leaf).__name__}; quantize a plain weight once")
        is_stacked = matches(path, stacked)
        if (len(leaf.shape) != 2 and not is_stacked) or (is_stacked and len(leaf.shape) < 3):
            want = "[L, (E,) in, out]" if is_stacked else "[in, out]"
            raise ValueError(f"{path}: quantization targets must be weights {want}, got shape {tuple(leaf.shape)}"
                             + (" (set QuantSpec.stacked for stacked layers)" if len(leaf.shape) >= 3 else ""))
        return quantize_array(leaf, spec, path)

    return map_with_paths(one, params, nodes_are_leaves=True)
