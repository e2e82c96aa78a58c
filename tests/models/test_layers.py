import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as T
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lorax_variants.models.layers import attention, attention_mask, rope_inv_freq, run_layers
from tests.close import assert_close


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_frequencies_equal_transformers(rope):
    config = T.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=512, rope_parameters=rope)
    ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    np.testing.assert_allclose(rope_inv_freq(128, rope), ref.numpy(), rtol=1e-6)


def test_gqa_attention_equals_repeated_kv_heads():
    q = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
    k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 4)) for i in (1, 2))
    mask = attention_mask(jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), 5, causal=True)
    grouped = attention(q, k, v, mask, 0.5)
    full = attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), mask, 0.5)
    assert_close(grouped, full, 1e-6)


def test_sliding_window_mask():
    m = np.asarray(attention_mask(None, 6, causal=True, window=2)[0])
    assert m[5].tolist() == [False, False, False, False, True, True]


@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_no_batch"])
def test_scan_unrolled_and_remat_give_the_same_gradients(remat):
    w = jax.random.normal(jax.random.key(0), (4, 8, 8)) * 0.3
    x = jax.random.normal(jax.random.key(1), (3, 8))
    layer = lambda h, p: jnp.tanh(h @ p)  # noqa: E731

    def loss(w, scan, remat):
        return jnp.sum(run_layers(layer, x, w, 4, scan=scan, remat=remat) ** 2)

    ref = jax.grad(loss)(w, False, "none")
    assert_close(jax.grad(loss, )(w, True, remat), ref, 2e-5)
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        loss(w, True, "some")


@pytest.mark.parametrize("padding", [None, [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]])
def test_attention_gradients_equal_torch(padding):
    """The hand-written attention backward against torch autograd of the same formula (GQA, a
    padded batch row whose first queries see no key: uniform rows, as the forward)."""
    import torch

    q = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
    k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 4)) for i in (1, 2))
    g = jax.random.normal(jax.random.key(3), (2, 5, 24))
    mask = attention_mask(None if padding is None else jnp.array(padding), 5, causal=True)
    grads = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, 0.5) * g), argnums=(0, 1, 2))(q, k, v)

    tq, tk, tv = (torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    qh = tq.transpose(1, 2)                                        # [B, H, T, D]
    kh, vh = (x.transpose(1, 2).repeat_interleave(3, dim=1) for x in (tk, tv))
    scores = (qh @ kh.transpose(-1, -2)) * 0.5
    m = torch.tensor(np.asarray(jnp.broadcast_to(mask, (2, 5, 5))))[:, None]
    scores = torch.where(m, scores, torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float64))
    out = (torch.softmax(scores, -1) @ vh).transpose(1, 2).reshape(2, 5, 24)
    (out * torch.tensor(np.asarray(g), dtype=torch.float64)).sum().backward()
    for ours, ref in zip(grads, (tq.grad, tk.grad, tv.grad)):
        assert_close(ours, ref.numpy(), 2e-4)


def test_causal_blocks_equal_the_full_computation(monkeypatch):
    """causal=True skips the masked upper blocks (T = 3 blocks here, of 16 queries for speed): same
    outputs and gradients, with padding and a sliding window in the mask too. Padding queries that
    see no key at all (row 1, t < 10) average their block's values instead of all: outputs nobody reads."""
    from lorax_variants.models import layers

    monkeypatch.setattr(layers, "CAUSAL_BLOCK", 16)
    t = 3 * 16
    q = jax.random.normal(jax.random.key(0), (2, t, 4, 8))
    k, v = (jax.random.normal(jax.random.key(i), (2, t, 2, 8)) for i in (1, 2))
    padding = jnp.ones((2, t), int).at[1, :10].set(0)
    mask = attention_mask(padding, t, causal=True, window=25)
    seen = np.asarray(jnp.any(mask, axis=-1))                      # [B, T]: the query sees some key
    g = jax.random.normal(jax.random.key(3), (2, t, 32)) * seen[..., None]

    @functools.partial(jax.jit, static_argnums=3)
    def grads(q, k, v, causal):
        return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, 0.3, causal=causal) * g), argnums=(0, 1, 2))(q, k, v)

    blocked, full = attention(q, k, v, mask, 0.3, causal=True), attention(q, k, v, mask, 0.3)
    assert_close(np.asarray(blocked)[seen], np.asarray(full)[seen], 2e-5)
    assert (~seen).sum() == 10
    for ours, ref in zip(grads(q, k, v, True), grads(q, k, v, False)):
        assert_close(ours, ref, 2e-4)
