"""LoftQ against the paper's algorithm as PEFT's ``loftq_init`` runs it, computed here with bitsandbytes' own
NF4 (CPU) and torch's SVD: the same quantized base, the same low-rank product; and Q + s·A B closer to W
than QLoRA's start."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bitsandbytes import functional as F

import lorax_variants as lv
from lorax_variants.variants.loftq import loftq, loftq_factors
from tests.close import assert_close


def _peft_loftq(w_in_out: np.ndarray, r: int, iters: int):
    """PEFT's loftq_init loop (torch layout [out, in]) with bitsandbytes NF4, blocks of 64, no double quant."""
    weight = torch.tensor(w_in_out.T.copy())
    res = weight.clone()
    for i in range(iters):
        q, state = F.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
        deq = F.dequantize_4bit(q, state)
        res = weight - deq
        u, s, vh = torch.linalg.svd(res, full_matrices=False)
        L = u[:, :r] @ torch.diag(torch.sqrt(s[:r]))  # PEFT's _low_rank_decomposition
        R = torch.diag(torch.sqrt(s[:r])) @ vh[:r]
        if i + 1 == iters:
            break
        res = weight - L @ R
    return deq.numpy().T, (L @ R).numpy().T  # back to [in, out]


@pytest.mark.parametrize("iters, scale", [(1, 1.0), (3, 1.0), (3, 2.0)])
def test_loftq_equals_the_reference_loop(iters, scale):
    w = np.asarray(jax.random.normal(jax.random.key(0), (128, 96)) * 0.05, np.float32)
    qspec = lv.QuantSpec(targets="w", kind="nf4", block_size=64, double_quant=False)
    q, a, b = loftq_factors(jnp.asarray(w), 8, scale, qspec, iters)
    deq_ref, lr_ref = _peft_loftq(w, 8, iters)
    np.testing.assert_allclose(np.asarray(lv.dequantize(q, jnp.float32)), deq_ref, rtol=1e-6, atol=0)  # same codes
    assert_close(np.asarray(scale * (a @ b)), lr_ref, 2e-4)


@pytest.mark.slow  # CI's `make test-slow`; LoftQ's factors against PEFT's stay in the default run
def test_loftq_starts_closer_to_w_than_qlora_on_a_stacked_model():
    params = {"layers": {"q": jax.random.normal(jax.random.key(1), (3, 128, 64)) * 0.05,
                         "v": jax.random.normal(jax.random.key(2), (3, 128, 64)) * 0.05}}
    spec = lv.AdapterSpec(targets=r"layers/(q|v)", stacked=r"layers/.*", r=8, alpha=16)
    qspec = lv.QuantSpec(targets=r"layers/(q|v)", stacked=r"layers/.*", kind="nf4", block_size=64)
    tree = loftq(params, spec, qspec, jax.random.key(0), iters=2)
    qlora = lv.quantize(lv.adapt(params, spec, jax.random.key(0)), qspec)
    assert jax.tree.structure(lv.split(tree)[1]) == jax.tree.structure(lv.split(qlora)[1])  # the same kind of tree
    merged, merged_q = lv.merge(tree), lv.merge(qlora)
    for name in ("q", "v"):
        w = np.asarray(params["layers"][name])
        ours = np.linalg.norm(np.asarray(merged["layers"][name]) - w, axis=(1, 2))
        plain = np.linalg.norm(np.asarray(merged_q["layers"][name]) - w, axis=(1, 2))
        assert (ours < 0.8 * plain).all(), (name, ours, plain)  # every layer
        for layer in range(3):  # stacked layer by layer = each layer alone
            q1, a1, b1 = loftq_factors(params["layers"][name][layer], 8, 2.0, qspec, 2)
            node = tree["layers"][name]
            np.testing.assert_array_equal(np.asarray(node.weight.codes[layer]), np.asarray(q1.codes))
            assert_close(np.asarray(node.scale * node.lora_a[layer] @ node.lora_b[layer]),
                         np.asarray(2.0 * a1 @ b1), 5e-5)


def test_loftq_refuses_what_it_cannot_start():
    params = {"w": jnp.ones((64, 32))}
    qspec = lv.QuantSpec(targets="w")
    with pytest.raises(ValueError, match="LoftQ initializes LoRA adapters"):
        loftq(params, lv.AdapterSpec(targets="w", variant="dora", r=2), qspec, 0)
    with pytest.raises(ValueError, match="w: LoftQ needs the full-precision weight"):
        loftq(lv.quantize(params, qspec), lv.AdapterSpec(targets="w", r=2), qspec, 0)
    with pytest.raises(ValueError, match="at least one iteration"):
        loftq_factors(params["w"], 2, 1.0, qspec, 0)


def test_loftq_quantizes_exactly_what_quantize_does():
    """QuantSpec.targets decides what is quantized, as in ``quantize``: an adapted weight outside it stays in
    full precision with the usual LoRA start; a target without an adapter is quantized plainly."""
    keys = jax.random.split(jax.random.key(3), 3)
    params = {"layers": {n: jax.random.normal(k, (2, 128, 64)) * 0.05 for n, k in zip("qvo", keys)},
              "head": jnp.ones((64, 16))}
    spec = lv.AdapterSpec(targets=r"layers/(q|v)", stacked=r"layers/.*", r=4, alpha=8)
    qspec = lv.QuantSpec(targets=r"layers/(v|o)", stacked=r"layers/.*", kind="nf4", block_size=64)
    tree = loftq(params, spec, qspec, jax.random.key(0))
    qlora = lv.quantize(lv.adapt(params, spec, jax.random.key(0)), qspec)

    def quantized(t):
        return {p for p, x in lv.leaves_with_paths(t, nodes_are_leaves=True)
                if isinstance(x, lv.QuantizedNode) or isinstance(getattr(x, "weight", None), lv.QuantizedNode)}

    assert quantized(tree) == quantized(qlora) == {"layers/v", "layers/o"}
    assert jax.tree.structure(tree) == jax.tree.structure(qlora)
    q, v = tree["layers"]["q"], tree["layers"]["v"]
    np.testing.assert_array_equal(np.asarray(q.weight), np.asarray(params["layers"]["q"]))  # not quantized
    np.testing.assert_array_equal(np.asarray(q.lora_a), np.asarray(qlora["layers"]["q"].lora_a))  # spec's own start
    assert not np.asarray(q.lora_b).any()
    assert np.asarray(v.lora_b).any()  # LoftQ's factors where the base is quantized
    np.testing.assert_array_equal(np.asarray(tree["layers"]["o"].codes), np.asarray(qlora["layers"]["o"].codes))
