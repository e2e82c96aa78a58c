"""The backends' fused attention kernels behind ``layers.self_attention``: cuDNN on GPUs
(``jax.nn.dot_product_attention(implementation="cudnn")``) and the Pallas splash-attention kernel on TPUs
(``jax.experimental.pallas.ops.tpu.splash_attention``, the kernel MaxText uses). Each returns ``None`` when
its API cannot express the call (a traced window, a query offset, a dtype), and the caller takes the
portable blockwise path (``models.flash``), which is also their reference in the tests.

The masks are described, never materialized at [T, S]: causal and sliding windows become the kernel's
static block masks, padding becomes segment ids (splash) or key lengths (cuDNN, right padding only); packed
rows' segment ids go to splash as they are (cuDNN's API has none: the portable path takes those calls)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

SPLASH_BLOCK = 512  # query/key block of the splash kernel; sequences must be multiples of 128


def cudnn_attention(q, k, v, *, scale, causal, key_valid, window, softcap, q_offset, right_padded,
                    segment_ids=None):
    """cuDNN's fused attention on a GPU, where its API holds the call: bf16/fp16, no soft cap, no query offset,
    no padding or right padding (key lengths), no segment ids. ``None``: use the portable path."""
    if segment_ids is not None:
        return None
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16) or softcap is not None:
        return None
    if not (isinstance(q_offset, int) and q_offset == 0) or q.shape[1] != k.shape[1]:
        return None
    if key_valid is not None and not right_padded:
        return None
    local = _static_window(window)
    if local is False:
        return None
    lengths = None if key_valid is None else jnp.sum(key_valid.astype(jnp.int32), axis=-1)
    try:
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=lengths,
                                           local_window_size=None if local is None else (local - 1, 0),
                                           implementation="cudnn")
    except Exception:  # noqa: BLE001 - cuDNN refuses some shapes and versions: the portable path instead
        return None
    return out.reshape(q.shape[0], q.shape[1], -1)


def splash_attention(q, k, v, *, scale, causal, key_valid, window, softcap, q_offset, interpret=None,
                     block: int = SPLASH_BLOCK, segment_ids=None):
    """Pallas splash attention (TPU): ``q [B, T, H, D]``, ``k``/``v [B, S, Hkv, D]`` -> ``[B, T, H·D]``.
    Self-attention only (T == S, no query offset), lengths a multiple of 128, a static window. Padding goes
    in as segment ids (valid 1, padding 0 on both sides, so a padded query sees padded keys and its softmax
    stays finite): outputs at valid queries equal the portable path's, outputs at padded queries are not
    defined (every model masks them downstream, so their cotangents are zero). ``interpret`` (default: off a TPU) runs the kernel in Pallas' interpreter, which is how the tests
    check it against the plain computation on a CPU; ``block``: its query and key block (a multiple
    of 128 dividing T). ``None`` when the call is outside the kernel's API."""
    b, t, h, d = q.shape
    s = k.shape[1]
    local = _static_window(window)
    if local is False or t != s or t % 128 or not (isinstance(q_offset, int) and q_offset == 0):
        return None
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    kernel = _splash_kernel(t, h, causal, local, None if softcap is None else float(softcap), bool(interpret),
                           min(block, t))
    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # the kernel applies no scale
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    if key_valid is None and segment_ids is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:  # packed rows: their documents' ids, padding 0 (the kernel's native segment ids)
        seg = key_valid.astype(jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        if key_valid is not None and segment_ids is not None:
            seg = jnp.where(key_valid.astype(bool), seg, 0)
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(
            qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3).reshape(b, t, h * d).astype(q.dtype)


def _static_window(window: Any) -> int | None | bool:
    """The window as a Python int, ``None`` for none, ``False`` when traced (per-layer windows under scan)."""
    if window is None:
        return None
    if isinstance(window, jax.core.Tracer):
        return False
    try:
        return int(window)
    except TypeError:
        return False


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, heads: int, causal: bool, window: int | None, softcap: float | None, interpret: bool,
                   block: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if window is not None:
        one = sm.LocalMask((t, t), window_size=(window - 1, 0 if causal else None), offset=0)
    elif causal:
        one = sm.CausalMask((t, t))
    else:
        one = sm.FullMask((t, t))
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # Built with concrete arrays even when first asked for inside a trace (a layer scan): the kernel is cached
    # and used by later traces, which must not see the first one's tracers.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  attn_logits_soft_cap=softcap, interpret=interpret)


__all__ = ["cudnn_attention", "splash_attention", "SPLASH_BLOCK"]
