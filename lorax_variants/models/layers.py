"""Building blocks shared by the model zoo: norms, rotary embeddings, attention, layer scan.

All are pure functions; weights enter only through ``dense`` (projections) or as plain
vectors (norm scales, biases). Numerics follow transformers: norms and softmax in float32,
RoPE tables in float32, masked scores set to the dtype's minimum (not -inf, so a fully masked
row gives a uniform row instead of NaN).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lorax_variants.models import fused as fused_kernels
from lorax_variants.models.flash import flash_attention
from lorax_variants.nodes.base import dense
from lorax_variants.shared import is_shared
from lorax_variants.tree import combine

__all__ = [
    "rms_norm",
    "layer_norm",
    "activation",
    "rope_inv_freq",
    "rope_tables",
    "apply_rope",
    "attention_mask",
    "segment_positions",
    "attention",
    "self_attention",
    "DENSE_MAX",
    "project",
    "run_layers",
    "token_chunks",
    "KVCache",
    "cached_attention",
    "init_from_shapes",

    "REMAT_POLICIES",
]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Llama's RMSNorm: ``scale * (x / sqrt(mean(x²) + eps))`` computed in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32: (x − mean)/√(var + eps)·scale + bias, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


def activation(name: str, where: str = "hidden_act") -> Callable[[jax.Array], jax.Array]:
    """The activation function transformers names ``name`` (``hidden_act``); an unknown one is an error naming
    the config field ``where``."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported {where} {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def rope_inv_freq(head_dim: int, rope: dict[str, Any]) -> jax.Array:
    """Inverse frequencies for ``rope_type`` default, linear or llama3 (transformers' formulas)."""
    base = float(rope["rope_theta"])
    inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(rope["factor"])
    if kind == "llama3":
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return jnp.where(medium, smoothed, scaled)
    raise AssertionError(kind)  # configs are validated before reaching here


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] for integer positions [B, T] (halves layout, as transformers)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D]: x·cos + rotate_half(x)·sin, rotate_half(x) = [-x₂, x₁]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None] + rotated.astype(jnp.float32) * sin[:, :, None]
    return out.astype(x.dtype)


def attention_mask(
    padding: jax.Array | None, q_len: int, *, causal: bool, window: int | None = None
) -> jax.Array | None:
    """Boolean [B or 1, T, S]: True where query t may attend key s.

    ``padding`` [B, S] is 1 for real tokens; ``window`` keeps only keys with t - s < window
    (Mistral's sliding window).
    """
    mask = None
    if causal:
        t = jnp.arange(q_len)[:, None]
        s = jnp.arange(q_len)[None, :]
        mask = s <= t
        if window is not None:
            mask &= (t - s) < window
        mask = mask[None]
    if padding is not None:
        keys = padding.astype(bool)[:, None, :]
        mask = keys if mask is None else (mask & keys)
    return mask


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions [B, T] of packed rows: 0 at each document's first token (where the segment id changes),
    counting up within it."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape)
    change = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool),
                              segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return idx - jax.lax.cummax(jnp.where(change, idx, 0), axis=segment_ids.ndim - 1)


CAUSAL_BLOCK = 128


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float, *, causal: bool = False,
    softcap: float | None = None,
) -> jax.Array:
    """Softmax attention with grouped-query heads.

    q [B, T, H, D], k and v [B, S, Hkv, D] with H a multiple of Hkv (GQA; Hkv = H is plain
    multi-head): each group of G = H / Hkv query heads shares one key/value head, without
    copying k or v. Heads go first and a group's G query heads are folded into the rows, so
    both matmuls are plain batched [G·T, D] x [D, S] products (on CPU twice as fast as a 5-D
    einsum over [B, T, Hkv, G, D]). Returns [B, T, H·D].

    ``causal=True`` says the mask hides every key after its query (S = T): queries then go in
    blocks of ``CAUSAL_BLOCK`` and block i reads only keys up to its end, skipping the fully
    masked upper triangle of blocks ((n+1)/2n of the work for n blocks; T=256 on 2 CPU cores,
    fwd+bwd per layer: 63 -> 51..58 ms). Same result for every query that sees a key (the skipped
    scores are masked anyway); a padding query that sees none averages its block's values
    instead of all values, an output no real token reads.

    ``softcap`` (Gemma 2's ``attn_logit_softcapping``): scores become ``c·tanh(scores / c)`` before the
    mask and softmax.
    """
    t = q.shape[1]
    if causal and mask is not None and t == k.shape[1] and t % CAUSAL_BLOCK == 0 and t > CAUSAL_BLOCK:
        ends = range(CAUSAL_BLOCK, t + 1, CAUSAL_BLOCK)
        return jnp.concatenate([_attention(q[:, e - CAUSAL_BLOCK:e], k[:, :e], v[:, :e],
                                           mask[:, e - CAUSAL_BLOCK:e, :e], scale, softcap) for e in ends], axis=1)
    return _attention(q, k, v, mask, scale, softcap)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
               softcap: float | None = None) -> jax.Array:
    b, t, h, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    qh = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if mask is None:
        mask = jnp.ones((1, 1, 1, s_len), bool)
    else:  # [B or 1, T, S] -> [B or 1, 1, G·T, S], rows in the same order as qh's
        mask = jnp.broadcast_to(mask[:, None], (mask.shape[0], g, t, s_len)).reshape(mask.shape[0], 1, g * t, s_len)
    cap = None if softcap is None else float(softcap)
    out = _attention_core(qh, kh, vh, mask, float(scale), cap).reshape(b, hkv, g, t, vh.shape[-1])
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * vh.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                    softcap: float | None = None) -> jax.Array:
    """``softmax(where(mask, s·q kᵀ, min)) v`` over [B, Hkv, rows, D] with a hand-written backward.

    The backward keeps only q, k, v, the probabilities P and the output O (autodiff also kept
    the masked scores and the softmax's intermediates, and in a layer scan stacked them per
    layer): with dO the output gradient, dP = dO vᵀ, dS = s·P ∘ (dP - rowsum(dO ∘ O)),
    dq = dS k, dk = dSᵀ q, dv = Pᵀ dO. Masked entries of P are exactly 0, so dS is 0 there;
    a row with no key at all (uniform P) passes no gradient, as the ``where`` under autodiff.
    Measured on 2 CPU cores (B 8, T 256, 8 heads of 64, causal, fwd+bwd): autodiff 83 ms, this 61 ms.
    With a soft cap c the scores are c·tanh(s/c); the backward recomputes t = tanh(s/c) from q and k
    (one more matmul, no stored [rows, S] array) and multiplies dS by 1 - t².
    """
    return _attention_fwd(q, k, v, mask, scale, softcap)[0]


def _scores(q, k, scale, softcap):
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) * scale
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _attention_fwd(q, k, v, mask, scale, softcap=None):
    scores = _scores(q, k, scale, softcap)
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    return out, (q, k, v, jnp.any(mask, axis=-1, keepdims=True), probs, out)


def _attention_bwd(scale, softcap, res, d_out):
    q, k, v, any_key, probs, out = res
    d_probs = jnp.einsum("bkqd,bksd->bkqs", d_out, v, preferred_element_type=jnp.float32)
    rows = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_capped = probs.astype(jnp.float32) * (d_probs - rows)
    if softcap is not None:
        t = _scores(q, k, scale, softcap) / softcap
        d_capped = d_capped * (1.0 - t * t)
    d_scores = jnp.where(any_key, d_capped * scale, 0.0).astype(q.dtype)
    dq = jnp.einsum("bkqs,bksd->bkqd", d_scores, k)
    dk = jnp.einsum("bkqs,bkqd->bksd", d_scores, q)
    dv = jnp.einsum("bkqs,bkqd->bksd", probs, d_out)
    return dq, dk, dv, None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


DENSE_MAX = 1024  # up to this many queries and keys the dense path (scores [T, S]) is used; above, blockwise
ATTENTION_IMPLS = ("auto", "dense", "flash", "cudnn", "splash")


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool,
                   key_valid: jax.Array | None = None, window: Any = None, softcap: float | None = None,
                   q_offset: Any = 0, impl: str = "auto", right_padded: bool = False,
                   segment_ids: jax.Array | None = None) -> jax.Array:
    """Attention described by what decides the mask, never by a [T, S] mask: ``key_valid`` [B, S] (padding),
    ``causal``, a sliding ``window`` (key s seen by the query at position t when t - s < window) and the
    queries' offset ``q_offset`` in the keys (a KV cache). Returns [B, T, H·D].

    ``segment_ids`` [B, T] (self-attention of packed rows, T == S, no offset): the document of each token,
    0 for padding; a query sees only keys of its own document (a block-diagonal mask, inside which causality,
    the window and the soft cap apply as before). Padding (0) is also invalid as a key; outputs at padding
    queries are not defined. cuDNN's API takes no segment ids: on a GPU such calls take the portable path
    (said once in the log).

    ``impl``: ``"dense"`` forms the scores (fast at short lengths), ``"flash"`` goes blockwise with memory
    linear in the length (``models.flash``); ``"cudnn"`` and ``"splash"`` are the GPU's and the TPU's fused
    kernels (``models.fused``; an error where the kernel cannot take the call). ``"auto"`` takes the
    backend's fused kernel where it accepts the call (GPU: bf16/fp16, no soft cap, no padding or
    ``right_padded`` keys; TPU: lengths a multiple of 128, a static window), else dense up to ``DENSE_MAX``
    queries and keys and blockwise above."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}; choose from {ATTENTION_IMPLS}")
    t, s = q.shape[1], k.shape[1]
    if segment_ids is not None:
        if t != s or not (isinstance(q_offset, int) and q_offset == 0):
            raise ValueError(f"segment_ids describe packed rows of self-attention: {t} queries and {s} keys, "
                             f"query offset {q_offset!r} (a KV cache) cannot take them")
        if key_valid is None:
            key_valid = segment_ids != 0
    kw = dict(scale=scale, causal=causal, key_valid=key_valid, window=window, softcap=softcap, q_offset=q_offset,
              segment_ids=segment_ids)
    if impl in ("auto", "cudnn", "splash"):
        backend = jax.default_backend()
        if impl == "cudnn" or (impl == "auto" and backend == "gpu"):
            if segment_ids is None:
                fused = fused_kernels.cudnn_attention(q, k, v, right_padded=right_padded, **kw)
            else:
                fused = None
                warnings.warn("cuDNN attention takes no segment ids: packed rows use the portable attention path",
                              stacklevel=2)  # shown once (Python's default warning filter)
        elif impl == "splash" or (impl == "auto" and backend == "tpu"):
            fused = fused_kernels.splash_attention(q, k, v, **kw)
        else:
            fused = None
        if fused is not None:
            return fused
        if impl != "auto":
            raise ValueError(f"attention impl {impl!r} cannot take this call (backend {backend}, dtype {q.dtype}, "
                             f"{t} queries, {s} keys, window {window!r}, softcap {softcap}"
                             + (", segment ids" if segment_ids is not None else "") + "); use 'auto'")
    if impl == "flash" or (impl == "auto" and max(t, s) > DENSE_MAX):
        return flash_attention(q, k, v, **kw)
    qpos = jnp.asarray(q_offset) + jnp.arange(t)
    kpos = jnp.arange(s)
    seen = jnp.ones((t, s), bool)
    if causal:
        seen &= kpos[None, :] <= qpos[:, None]
    if window is not None:
        seen &= (qpos[:, None] - kpos[None, :]) < window
    mask = seen[None] if key_valid is None else seen[None] & key_valid.astype(bool)[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    square = causal and t == s and isinstance(q_offset, int) and q_offset == 0
    return attention(q, k, v, mask, scale, causal=square, softcap=softcap)


def token_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int | None, splits: int = 1) -> jax.Array:
    """``fn`` over ``x [B, T, d]`` ``chunk`` tokens at a time, each chunk rematerialized: a position-wise block
    (the MLP) whose [T, ffn] intermediates then exist for one chunk at a time, in the forward and when the
    backward recomputes it. ``None`` or a short sequence: ``fn(x)``. ``splits``: the tokens are split over that
    many devices (context parallelism); each chunks its own share (rows [B·splits, T/splits])."""
    b, t = x.shape[:2]
    if splits > 1 and chunk is not None and t // splits > chunk:
        y = token_chunks(fn, x.reshape(b * splits, t // splits, x.shape[-1]), chunk)
        return y.reshape(b, t, y.shape[-1])
    if chunk is None or t <= chunk:
        return fn(x)
    pad = -t % chunk
    xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, x.shape[-1]).transpose(1, 0, 2, 3)
    body = jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    _, ys = jax.lax.scan(lambda _, xc: (None, body(xc)), None, xs)
    return ys.transpose(1, 0, 2, 3).reshape(b, -1, ys.shape[-1])[:, :t]


def project(x: jax.Array, params: dict[str, Any], name: str) -> jax.Array:
    """``dense(x, params[name])`` plus ``params[name + '_bias']`` when the model has one."""
    y = dense(x, params[name])
    bias = params.get(name + "_bias")
    return y if bias is None else y + bias.astype(y.dtype)


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # As "full", but each layer's input (what the backward restarts the layer from) lives in host memory
    # until the backward needs it, where the backend has a host memory kind (CPU, GPU, TPU in JAX today).
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"], offload_src="device",
        offload_dst="pinned_host"),
}


def _nested_group(n_layers: int) -> int:
    """Layers per group for two-level remat: the divisor of L nearest √L (saved: L/G + G layer inputs)."""
    return min((g for g in range(1, n_layers + 1) if n_layers % g == 0), key=lambda g: (n_layers // g + g, g))


def run_layers(
    layer: Callable[[jax.Array, Any], Any], x: jax.Array, stacked: Any, n_layers: int, *, scan: bool, remat: str,
    outputs: bool = False,
) -> Any:
    """Apply ``layer(x, params_i)`` for each slice of the stacked params (scan or unrolled).

    With ``outputs``, ``layer`` returns ``(x, y)`` and this returns ``(x, ys)``, the ys stacked over layers
    (a KV cache's updated layers).

    ``remat="nested"``: two-level rematerialization (arXiv 1604.06174's √L checkpoints) under ``scan``: the
    layers go in G groups (G the divisor of L nearest √L), each group a checkpointed scan of checkpointed
    layers, so the forward keeps L/G group inputs and the backward, one group at a time, G layer inputs:
    for 32 layers 8 + 4 = 12 [tokens, d] activations instead of 32, for one more forward of the layers."""
    if remat == "nested" and scan and not outputs:
        return _nested(layer, x, stacked, n_layers)
    if remat == "nested":
        remat = "full"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES) + ['nested']}")
    if remat != "none":
        inner = layer
        layer = jax.checkpoint(lambda h, p: inner(checkpoint_name(h, "layer_input"), p),
                               policy=REMAT_POLICIES[remat])
    step = layer if outputs else (lambda h, p: (layer(h, p), None))
    # Shared values (VeRA's projections, ...) are used by every layer: broadcast, not sliced.
    per_layer = jax.tree.map(lambda x: None if is_shared(x) else x, stacked, is_leaf=is_shared)
    common = jax.tree.map(lambda x: x if is_shared(x) else None, stacked, is_leaf=is_shared)
    join = lambda p: combine(p, common)  # noqa: E731
    if scan:
        x, ys = jax.lax.scan(lambda h, p: step(h, join(p)), x, per_layer)
        return (x, ys) if outputs else x
    ys = []
    for i in range(n_layers):
        x, y = step(x, join(jax.tree.map(lambda leaf: leaf[i], per_layer)))
        ys.append(y)
    return (x, jax.tree.map(lambda *a: jnp.stack(a), *ys)) if outputs else x


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for a fixed buffer of ``S`` positions (static shapes under ``jit``).

    ``k``, ``v`` [L, B, S, Hkv, D]; ``valid`` [B, S]: positions holding a real token (a prompt's padding and
    positions not written yet are False); ``index``: where the next tokens are written. Prompts are
    left-aligned, so a step writes the same index in every row."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @staticmethod
    def empty(layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype: Any) -> "KVCache":
        shape = (layers, batch, length, kv_heads, head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool),
                       jnp.zeros((), jnp.int32))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, layer_kv: tuple[jax.Array, jax.Array],
                     cache: KVCache, window: Any, scale: float, softcap: float | None = None) -> tuple[jax.Array, Any]:
    """Attention of ``t`` new queries over the cache after writing their keys and values at ``cache.index``.

    A key at buffer index s is seen by the query at index i when it holds a real token (``valid``), s ≤ i
    and i - s < window. Returns the output [B, t, H·D] and this layer's updated (k, v)."""
    k_all = jax.lax.dynamic_update_slice_in_dim(layer_kv[0], k.astype(layer_kv[0].dtype), cache.index, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(layer_kv[1], v.astype(layer_kv[1].dtype), cache.index, axis=1)
    out = self_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), scale=scale, causal=True,
                         key_valid=cache.valid, window=window, softcap=softcap, q_offset=cache.index)
    return out, (k_all, v_all)


def _nested(layer: Callable[[jax.Array, Any], Any], x: jax.Array, stacked: Any, n_layers: int) -> jax.Array:
    group = _nested_group(n_layers)
    per_layer = jax.tree.map(lambda x: None if is_shared(x) else x, stacked, is_leaf=is_shared)
    common = jax.tree.map(lambda x: x if is_shared(x) else None, stacked, is_leaf=is_shared)
    inner = jax.checkpoint(lambda h, p: layer(h, combine(p, common)), policy=jax.checkpoint_policies.nothing_saveable)
    grouped = jax.tree.map(lambda leaf: leaf.reshape((n_layers // group, group) + leaf.shape[1:]), per_layer)

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def one_group(h: jax.Array, p: Any) -> jax.Array:
        return jax.lax.scan(lambda h, q: (inner(h, q), None), h, p)[0]

    return jax.lax.scan(lambda h, p: (one_group(h, p), None), x, grouped)[0]


def init_from_shapes(shapes: dict[str, Any], key: jax.Array, std: float, dtype: Any) -> dict[str, Any]:
    """Weights ~ N(0, std²); norm scales 1; biases 0 (by name)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (kp, shape), k in zip(flat, keys):
        name = str(kp[-1].key)
        if name.endswith("bias"):
            leaves.append(jnp.zeros(shape, dtype))
        elif "norm" in name or name.endswith("scale"):
            leaves.append(jnp.ones(shape, dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
