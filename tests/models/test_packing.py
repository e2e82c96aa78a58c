"""Packed rows keep their documents apart: a row of several documents (segment ids, positions restarting at 0)
gives every token the logits, loss and gradients it has when its document runs alone, on every attention path
a CPU has (dense, blockwise, the TPU splash kernel in Pallas' interpreter), with sliding windows, soft caps
and learned positions. References: each document alone through transformers (torch) and through our model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_variants import hf
from lorax_variants.models import fused
from lorax_variants.models.flash import flash_attention
from lorax_variants.models.layers import attention, segment_positions, self_attention
from tests import hf_models as H
from tests.close import assert_close

DOCS = [5, 9, 1, 3, 7]  # document lengths packed into one row (a 1-token document included), padding after


def _packed(lengths, total, rng, vocab):
    ids = np.zeros(total, np.int64)
    seg = np.zeros(total, np.int32)
    docs, at = [], 0
    for i, n in enumerate(lengths):
        doc = rng.integers(2, vocab, n)
        ids[at:at + n], seg[at:at + n] = doc, i + 1
        docs.append((at, doc))
        at += n
    return ids, seg, docs


def test_segment_positions_restart_with_each_document():
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]])
    ref = np.array([[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])
    assert (np.asarray(segment_positions(jnp.asarray(seg))) == ref).all()


def _reference(q, k, v, seg, causal, window, softcap, scale):
    """Each segment's attention alone (the plain computation on its slice)."""
    b, t = seg.shape
    out = np.zeros((b, t, q.shape[2] * q.shape[3]), np.float32)
    for r in range(b):
        for s in set(seg[r].tolist()) - {0}:
            idx = np.nonzero(seg[r] == s)[0]
            lo, hi = idx[0], idx[-1] + 1
            n = hi - lo
            pos = np.arange(n)
            m = np.ones((n, n), bool)
            if causal:
                m &= pos[None] <= pos[:, None]
            if window is not None:
                m &= (pos[:, None] - pos[None]) < window
            out[r, lo:hi] = np.asarray(attention(q[r:r + 1, lo:hi], k[r:r + 1, lo:hi], v[r:r + 1, lo:hi],
                                                 jnp.asarray(m)[None], scale, softcap=softcap))[0]
    return out


def _attention_cases():
    """(impl, causal, window, softcap): each option on one path in the default run, the rest under slow."""
    options = [(True, None, None), (True, 3, None), (True, None, 1.5), (False, None, None)]
    default = {("dense", True, None, None), ("dense", True, 3, None), ("flash", True, None, 1.5),
               ("flash", False, None, None)}
    return [pytest.param(i, *o, marks=() if (i, *o) in default else pytest.mark.slow)
            for i in ("dense", "flash") for o in options]


@pytest.mark.parametrize("impl, causal, window, softcap", _attention_cases())
def test_attention_of_a_packed_row_equals_each_document_alone(impl, causal, window, softcap):
    b, t, hkv, g, d = 2, 40, 2, 2, 8
    seg = np.zeros((b, t), np.int32)
    seg[0, :25] = np.repeat([1, 2, 3, 4, 5], [5, 9, 1, 3, 7])
    seg[1, :] = np.repeat([1, 2, 3], [17, 12, 11])  # no padding; documents across the blockwise path's blocks
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (b, t, hkv * g, d))
    k = jax.random.normal(ks[1], (b, t, hkv, d))
    v = jax.random.normal(ks[2], (b, t, hkv, d))
    w = jax.random.normal(ks[3], (b, t, hkv * g * d)) * (seg != 0)[..., None]
    kw = dict(scale=0.35, causal=causal, window=window, softcap=softcap, segment_ids=jnp.asarray(seg))

    def ours(q, k, v):
        if impl == "flash":  # blocks of 8: documents span blocks, and blocks hold several documents
            return flash_attention(q, k, v, key_valid=jnp.asarray(seg != 0), block_q=8, block_k=8, **kw)
        return self_attention(q, k, v, impl="dense", **kw)

    real = seg != 0
    ref = _reference(q, k, v, seg, causal, window, softcap, 0.35)
    assert_close(np.asarray(ours(q, k, v))[real], ref[real], 1e-5)
    # gradients: each document's alone, summed (a document passes no gradient to another)
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(_one(seg, *a, causal=causal, window=window, softcap=softcap) * w),
                     argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g_ours, g_ref):
        assert_close(a, r, 1e-5)


def _one(seg, q, k, v, *, causal, window, softcap):
    """The reference under autodiff: a [T, T] block-diagonal mask over the whole row (plain computation)."""
    idx = np.arange(seg.shape[1])
    m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    if causal:
        m &= idx[None, None] <= idx[None, :, None]
    if window is not None:  # inside one document the index difference is the position difference
        m &= (idx[None, :, None] - idx[None, None]) < window
    return attention(q, k, v, jnp.asarray(m), 0.35, softcap=softcap)


def test_splash_kernel_takes_segment_ids_in_interpret_mode():
    """The TPU kernel (Pallas interpreter on CPU): a packed row of 128 tokens equals each document alone."""
    rng = np.random.default_rng(2)
    t, h, d = 128, 2, 8
    seg = np.zeros((1, t), np.int32)
    seg[0, :120] = np.repeat([1, 2, 3], [50, 41, 29])
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, h, d)), jnp.float32) for _ in range(3))
    out = fused.splash_attention(q, k, v, scale=0.35, causal=True, key_valid=None, window=None, softcap=None,
                                 q_offset=0, interpret=True, block=128, segment_ids=jnp.asarray(seg))
    real = seg != 0
    assert_close(np.asarray(out)[real], _reference(q, k, v, seg, True, None, None, 0.35)[real], 1e-5)


MODELS = ["llama3_rope_tied_bias", "qwen3_windows", "gemma3", "gpt2"]


# Every model but Gemma 3 on the dense path in the default run; the blockwise path under slow (CI's `make test-slow`; the
# layer-level tests above cover its masks on every option in the default run).
CASES = [pytest.param(m, i, marks=pytest.mark.slow if i == "flash" or m in ("gemma3", "llama3_rope_tied_bias") else ())
         for m in MODELS for i in ("dense", "flash")]  # (Gemma 3 and Llama under slow too: Gemma's windows are Qwen3's
# case; Llama's packed rows run in the default run through the app, tests/train/test_sft.py and test_sharded.py)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}

    def get(name):
        if name not in out:
            d = tmp_path_factory.mktemp(name)
            torch_model = H.build(name, d)
            out[name] = (torch_model, *hf.from_pretrained(d))
        return out[name]

    return get


@pytest.mark.parametrize("name, impl", CASES)
def test_a_packed_row_gives_each_document_its_own_logits_and_loss(models, name, impl):
    """Logits of a packed row (segment ids; positions derived from them) equal each document's logits alone,
    from transformers and from our model (the documents as a right-padded batch); so do the next-token loss of
    every document and its gradient."""
    torch_model, model, params = models(name)
    model.attention_impl = impl
    try:
        rng = np.random.default_rng(3)
        ids, seg, docs = _packed(DOCS, 32, rng, torch_model.config.vocab_size)
        width = max(len(d) for _, d in docs)
        alone = np.zeros((len(docs), width), np.int64)
        mask = np.zeros((len(docs), width), np.int64)
        for i, (_, doc) in enumerate(docs):
            alone[i, :len(doc)], mask[i, :len(doc)] = doc, 1
        logits = np.asarray(model.apply(params, jnp.asarray(ids[None]), segment_ids=jnp.asarray(seg[None])))[0]
        ours_alone = np.asarray(model.apply(params, jnp.asarray(alone), jnp.asarray(mask)))
        for i, (at, doc) in enumerate(docs):
            ref = H.torch_out(torch_model, doc[None])[0]
            assert_close(logits[at:at + len(doc)], ref, 2e-4)  # against transformers (float32, torch kernels)
            assert_close(logits[at:at + len(doc)], ours_alone[i, :len(doc)], 1e-5)  # the same model alone

        # next-token loss: targets inside a document only (a document's first token is no target)
        target = np.roll(ids, -1)
        inside = (seg == np.roll(seg, -1)) & (seg != 0)
        inside[-1] = False

        def packed_loss(p):
            lg = model.apply(p, jnp.asarray(ids[None]), segment_ids=jnp.asarray(seg[None]))[0]
            ce = -jnp.take_along_axis(jax.nn.log_softmax(lg), jnp.asarray(target)[:, None], -1)[:, 0]
            return jnp.sum(ce * inside)

        def alone_loss(p):
            lg = model.apply(p, jnp.asarray(alone), jnp.asarray(mask))[:, :-1]
            ce = -jnp.take_along_axis(jax.nn.log_softmax(lg), jnp.asarray(alone[:, 1:])[..., None], -1)[..., 0]
            return jnp.sum(ce * mask[:, 1:])

        la, ga = jax.value_and_grad(packed_loss)(params)
        lb, gb = jax.value_and_grad(alone_loss)(params)
        assert_close(la, lb, 1e-5)
        for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            assert_close(x, y, 1e-4)
    finally:
        model.attention_impl = "auto"


def test_segment_ids_with_a_cache_offset_are_refused():
    q = jnp.zeros((1, 4, 2, 8))
    k = jnp.zeros((1, 6, 2, 8))
    with pytest.raises(ValueError, match="segment_ids"):
        self_attention(q, k, k, scale=1.0, causal=True, segment_ids=jnp.ones((1, 4), jnp.int32))


@pytest.mark.parametrize("name", ["llama3_rope_tied_bias", "qwen2_bias"])
def test_the_splash_kernel_keeps_packed_documents_apart_in_a_model(tmp_path, name):
    """The TPU path end to end (Pallas' interpreter on CPU): a packed row of 128 tokens through the model with
    ``attention_impl="splash"`` gives each document the logits transformers gives it alone."""
    torch_model = H.build(name, tmp_path)
    model, params = hf.from_pretrained(tmp_path)
    model.attention_impl = "splash"
    rng = np.random.default_rng(4)
    ids, seg, docs = _packed([40, 9, 30, 27], 128, rng, torch_model.config.vocab_size)
    logits = np.asarray(model.apply(params, jnp.asarray(ids[None]), segment_ids=jnp.asarray(seg[None])))[0]
    for at, doc in docs:
        assert_close(logits[at:at + len(doc)], H.torch_out(torch_model, doc[None])[0], 2e-4)
