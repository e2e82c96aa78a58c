"""Blockwise attention: equal to the plain computation in values and gradients over random shapes, masks,
windows, GQA ratios, soft-caps and cache offsets (rows with no visible key included); memory linear in the
sequence length (compiled memory analysis); the zoo models give the same logits through it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorax_variants import hf
from lorax_variants.models.flash import flash_attention
from lorax_variants.models.layers import attention
from tests import hf_models as H
from tests.close import assert_close


def _plain_mask(b, t, s, valid, causal, window, q_offset):
    qpos, kpos = q_offset + np.arange(t), np.arange(s)
    seen = np.ones((t, s), bool)
    if causal:
        seen &= kpos[None] <= qpos[:, None]
    if window is not None:
        seen &= (qpos[:, None] - kpos[None]) < window
    return seen[None] & valid[:, None, :]


@settings(max_examples=2, deadline=None)  # each example compiles; the slow run has more (test below)
@given(b=st.integers(1, 2), t=st.integers(1, 40), extra=st.integers(0, 20), hkv=st.integers(1, 2), g=st.sampled_from([1, 3]),
       d=st.sampled_from([4, 8]), causal=st.booleans(), window=st.sampled_from([None, 1, 5]),
       softcap=st.sampled_from([None, 1.5]), left=st.integers(0, 6), block=st.sampled_from([4, 8, 16]),
       seed=st.integers(0, 2**16))
def test_blockwise_equals_plain_in_values_and_gradients(b, t, extra, hkv, g, d, causal, window, softcap, left, block, seed):
    s = t + extra  # keys beyond the queries: the queries sit at the end (a cache's prefill and decode)
    q_offset = extra if causal else 0
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, hkv * g, d))
    k = jax.random.normal(ks[1], (b, s, hkv, d))
    v = jax.random.normal(ks[2], (b, s, hkv, d))
    valid = np.ones((b, s), bool)
    valid[-1, :min(left, s)] = False  # left padding in the last row
    mask = _plain_mask(b, t, s, valid, causal, window, q_offset)
    seen = mask.any(-1)  # [b, t]: rows with at least one visible key
    w = jax.random.normal(ks[3], (b, t, hkv * g * d)) * seen[..., None]

    def flash(q, k, v):
        return flash_attention(q, k, v, scale=0.35, causal=causal, key_valid=jnp.asarray(valid), window=window,
                               softcap=softcap, q_offset=q_offset, block_q=block, block_k=block)

    def plain(q, k, v):
        return attention(q, k, v, jnp.asarray(mask), 0.35, softcap=softcap)

    def value_and_grads(fn):  # one compiled program per side (eager op-by-op dispatch is the slow part)
        return jax.jit(lambda *a: (fn(*a), jax.grad(lambda *b: jnp.sum(fn(*b) * w), argnums=(0, 1, 2))(*a)))(q, k, v)

    out, g_flash = value_and_grads(flash)
    ref, g_plain = value_and_grads(plain)
    out = np.asarray(out)
    assert_close(out[seen], np.asarray(ref)[seen], 2e-5)
    assert np.isfinite(out).all() and (out[~seen] == 0).all()  # nothing visible: 0, no NaN
    # relative to the gradients' common scale: one visible key makes dq exactly 0 in the plain softmax, where the
    # blockwise one leaves rounding (~1e-8)
    scale = max(float(np.max(np.abs(np.asarray(r)), initial=0.0)) for r in g_plain)
    for ours, ref in zip(g_flash, g_plain):
        assert np.max(np.abs(np.asarray(ours) - np.asarray(ref)), initial=0.0) <= 2e-5 * scale


def _temp_bytes(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_is_linear_in_the_sequence_length():
    """Forward and backward of one causal attention at T and 4T: blockwise temporaries grow at most 4.4x (the
    plain path's grow ~16x: its [T, S] scores and probabilities)."""
    def loss(impl):
        def f(q, k, v):
            if impl == "flash":
                return jnp.sum(flash_attention(q, k, v, scale=0.1, causal=True, block_q=128, block_k=128))
            t = q.shape[1]
            mask = jnp.tril(jnp.ones((t, t), bool))[None]
            return jnp.sum(attention(q, k, v, mask, 0.1))
        return jax.grad(f, argnums=(0, 1, 2))

    sizes = {}
    for impl in ("flash", "dense"):
        for t in (512, 2048):
            sizes[impl, t] = _temp_bytes(loss(impl), (1, t, 4, 32), (1, t, 2, 32), (1, t, 2, 32))
    assert sizes["flash", 2048] <= 4.4 * sizes["flash", 512], sizes
    assert sizes["dense", 2048] >= 10 * sizes["dense", 512], sizes  # the quadratic baseline, for contrast
    assert sizes["flash", 2048] * 8 < sizes["dense", 2048]


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_layer_windows", "gemma2_softcap", "bert_cls"])
def test_models_give_the_same_logits_blockwise(name, tmp_path):
    torch_model = H.build(name, tmp_path)
    model, params = hf.from_pretrained(tmp_path)
    pad = torch_model.config.pad_token_id if torch_model.config.pad_token_id is not None else 0
    ids, mask = H.inputs(torch_model.config.vocab_size, pad, seq=40, left=model.causal)
    dense = np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask)))
    model.attention_impl = "flash"
    try:
        flash = np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask)))
    finally:
        model.attention_impl = "auto"
    real = mask.astype(bool) if dense.ndim == 3 else np.ones(dense.shape[:1], bool)
    assert_close(flash[real], dense[real], 5e-5)


@pytest.mark.parametrize("causal, window, softcap, padded", [
    (True, None, None, False), (True, 100, None, True), (False, None, 5.0, True), (False, 64, None, False)])
def test_tpu_splash_kernel_equals_plain_attention(causal, window, softcap, padded):
    """The TPU path (Pallas splash attention, run by Pallas' interpreter on this CPU) against the plain
    computation: values and gradients at every query with a visible key, GQA 2:1, two blocks of 128."""
    from lorax_variants.models.fused import splash_attention

    b, t, hkv, g, d = 2, 256, 2, 2, 64
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (b, t, hkv * g, d))
    k = jax.random.normal(ks[1], (b, t, hkv, d))
    v = jax.random.normal(ks[2], (b, t, hkv, d))
    valid = np.ones((b, t), bool)
    if padded:
        valid[1, :37] = False  # left padding
        valid[0, 200:] = False  # right padding
    mask = _plain_mask(b, t, t, valid, causal, window, 0)
    rows = mask.any(-1) & valid  # padded queries' outputs are not defined by the kernel
    w = jax.random.normal(ks[3], (b, t, hkv * g * d)) * rows[..., None]
    kv = jnp.asarray(valid) if padded else None

    def splash(q, k, v):
        return splash_attention(q, k, v, scale=0.125, causal=causal, key_valid=kv, window=window, softcap=softcap,
                                q_offset=0, interpret=True, block=128)

    def plain(q, k, v):
        return attention(q, k, v, jnp.asarray(mask), 0.125, softcap=softcap)

    assert_close(np.asarray(splash(q, k, v))[rows], np.asarray(plain(q, k, v))[rows], 2e-5)
    g_splash = jax.grad(lambda *a: jnp.sum(splash(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_plain = jax.grad(lambda *a: jnp.sum(plain(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for ours, ref in zip(g_splash, g_plain):
        assert_close(ours, ref, 2e-5)


def test_fused_kernels_decline_what_their_api_cannot_say():
    """A traced (per-layer) window, a query offset or a length the kernel does not tile: None, so
    ``self_attention(impl='auto')`` takes the portable path; forcing the kernel then is an error naming the call."""
    from lorax_variants.models.fused import splash_attention
    from lorax_variants.models.layers import self_attention

    q = jnp.ones((1, 200, 2, 8))
    kw = dict(scale=1.0, causal=True, key_valid=None, window=None, softcap=None, q_offset=0)
    assert splash_attention(q, q, q, **kw) is None  # 200 is not a multiple of 128
    assert splash_attention(q[:, :128], q[:, :128], q[:, :128], **dict(kw, q_offset=3)) is None
    seen = []
    jax.jit(lambda w: seen.append(splash_attention(q[:, :128], q[:, :128], q[:, :128], **dict(kw, window=w))))(4)
    assert seen == [None]
    with pytest.raises(ValueError, match="'splash' cannot take this call.*200 queries"):
        self_attention(q, q, q, scale=1.0, causal=True, impl="splash")
    with pytest.raises(ValueError, match="'cudnn' cannot take this call"):
        self_attention(q, q, q, scale=1.0, causal=True, impl="cudnn")  # not a GPU
