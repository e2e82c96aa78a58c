"""Long sequences: the chunked cross-entropy equals the plain one (values and gradients; untied and tied heads,
LoRA on the head, a soft-capped head) and its memory does not hold [tokens, vocab]; the token-chunked MLP and
two-level remat give the plain model's values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.models.layers import token_chunks
from lorax_variants.models.loss import token_cross_entropy
from tests import hf_models as H
from tests.close import assert_close, assert_trees_close

HEADS = {"llama_gqa_untied": r"lm_head", "llama3_rope_tied_bias": r"embed", "gemma2_softcap": r"embed"}


@pytest.mark.parametrize("name", list(HEADS))
def test_chunked_cross_entropy_equals_plain_with_lora_on_the_head(name, tmp_path):
    H.build(name, tmp_path)
    model, params = hf.from_pretrained(tmp_path)
    spec = lv.AdapterSpec(targets=rf"{HEADS[name]}|layers/attn/q_proj", stacked=model.stacked, r=4)
    tree = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.05) if isinstance(n, lv.LoraNode) else n,
                        lv.adapt(params, spec, 0), is_leaf=lambda n: isinstance(n, lv.LoraNode))
    trainable, frozen = lv.split(tree)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 96, (2, 12)))

    def chunked(t):
        p = lv.resolve_shared(lv.combine(t, frozen))
        h = model.hidden(p, ids)
        ce, correct = token_cross_entropy(model, p, h[:, :-1], ids[:, 1:], chunk=5)  # 22 tokens: 5 chunks, padded
        return jnp.sum(ce), correct

    def plain(t):
        logits = model.apply(lv.combine(t, frozen), ids).astype(jnp.float32)[:, :-1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
        return jnp.sum(ce), jnp.argmax(logits, -1) == ids[:, 1:]

    (v1, c1), g1 = jax.value_and_grad(chunked, has_aux=True)(trainable)
    (v2, c2), g2 = jax.value_and_grad(plain, has_aux=True)(trainable)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_array_equal(c1, c2)
    assert_trees_close(g1, g2, 1e-5)
    head = lv.leaves_with_paths(g1)
    assert any(HEADS[name] in p and float(jnp.abs(x).max()) > 0 for p, x in head)  # the head's LoRA trained


class _Head:
    """A bare output head: logits = h W (for the memory figure)."""

    def head(self, params, h):
        return h @ params["w"]


def test_chunked_cross_entropy_memory_does_not_hold_token_by_vocab_logits():
    vocab, d = 32000, 64
    model = _Head()

    def temp(n, chunked):
        def f(w, h, y):
            if chunked:
                return jnp.sum(token_cross_entropy(model, {"w": w}, h, y, chunk=256)[0])
            return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(h @ w, y))
        args = (jax.ShapeDtypeStruct((d, vocab), jnp.float32), jax.ShapeDtypeStruct((n, d), jnp.float32),
                jax.ShapeDtypeStruct((n,), jnp.int32))
        return jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    small, big = temp(1024, True), temp(4096, True)
    logits = 4096 * vocab * 4
    assert big <= 1.2 * small, (small, big)  # one chunk's logits, whatever the number of tokens
    assert big < logits / 4 < temp(4096, False)  # the plain loss holds [tokens, vocab] (and more)


def test_token_chunked_mlp_and_nested_remat_equal_the_plain_model(tmp_path):
    H.build("llama_gqa_untied", tmp_path)
    _, params = hf.from_pretrained(tmp_path)
    ids = jnp.asarray(np.random.default_rng(1).integers(2, 96, (2, 23)))

    def loss_of(remat, chunk):
        model, _ = hf.from_pretrained(tmp_path, remat=remat)
        model.mlp_chunk = chunk
        return jax.value_and_grad(lambda p: jnp.sum(model.apply(p, ids) ** 2))

    v0, g0 = loss_of("none", None)(params)
    for remat, chunk in (("none", 5), ("nested", None), ("nested", 8)):
        v, g = loss_of(remat, chunk)(params)
        np.testing.assert_allclose(v, v0, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            assert_close(a, b, 2e-4)
    x = jax.random.normal(jax.random.key(0), (2, 11, 4))
    np.testing.assert_allclose(token_chunks(jnp.tanh, x, 3), jnp.tanh(x), rtol=1e-6)


@pytest.mark.slow  # two whole-step compilations at 4x the length (about a minute): the default run has
# the attention's and the loss's own linearity tests
def test_qlora_step_memory_grows_linearly_with_the_sequence():
    """A whole QLoRA train step (NF4 base, LoRA on every projection, value and gradient) of a small Llama,
    compiled at T and 4T: with blockwise attention, the chunked loss, nested remat and MLP chunks its device
    bytes grow at most 4.4x, where the old program (dense attention, full logits) grows by its [T, T] scores."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 14)
    targets = r"layers/(attn|mlp)/\w+_proj"

    def device_bytes(seq, new):
        model = hf.from_config(cfg, remat="nested" if new else "full")
        model.attention_impl, model.mlp_chunk = ("flash", 256) if new else ("dense", None)
        shapes = jax.eval_shape(lambda k: model.init(k, jnp.bfloat16), jax.random.key(0))
        tree = jax.eval_shape(lambda p: lv.adapt(lv.quantize(p, lv.QuantSpec(targets=targets, stacked=model.stacked)),
                                                 lv.AdapterSpec(targets=targets, stacked=model.stacked, r=8), 0), shapes)
        tr, fr = lv.split(tree)

        def loss(tr, fr, ids):
            params = lv.resolve_shared(lv.combine(tr, fr))
            if not new:
                logp = jax.nn.log_softmax(model.apply(params, ids).astype(jnp.float32)[:, :-1])
                return -jnp.sum(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
            h = model.hidden(params, ids)
            return jnp.sum(token_cross_entropy(model, params, h[:, :-1], ids[:, 1:], chunk=256)[0])

        ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
        m = jax.jit(jax.value_and_grad(loss)).lower(tr, fr, ids).compile().memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

    new = device_bytes(2048, True), device_bytes(8192, True)
    old = device_bytes(2048, False), device_bytes(8192, False)
    assert new[1] <= 4.4 * new[0], new
    assert old[1] >= 6 * old[0], old  # the quadratic program, for contrast
    assert new[1] * 4 < old[1], (new, old)
