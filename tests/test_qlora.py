"""QLoRA end to end on a tiny Llama: NF4 base loaded quantized, LoRA over it, trained, merged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_variants as lv
from lorax_variants import hf
from tests import hf_models as H
from tests.close import assert_close

QSPEC = lv.QuantSpec(targets=r"layers/(attn|mlp)/\w+_proj", stacked=r"layers/.*", block_size=32)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    H.build("llama_gqa_untied", d)
    return d


def test_quantize_on_load_equals_quantize_after_load(llama):
    model, quantized = hf.from_pretrained(llama, quantize=QSPEC)
    _, params = hf.from_pretrained(llama)
    after = lv.quantize(params, QSPEC)
    assert jax.tree.structure(quantized) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(quantized), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert lv.tree_bytes(quantized) < 0.5 * lv.tree_bytes(params)  # embeddings/head stay fp32 here
    with pytest.raises(ValueError, match="matched no weight"):
        hf.from_pretrained(llama, quantize=lv.QuantSpec(targets="layers/attn/qkv"))


def test_qlora_trains_only_adapters_and_merges_to_dequantized_base_plus_delta(llama):
    # The head too: a frozen random head (std 0.02) after RMSNorm cannot express confident logits.
    qspec = lv.QuantSpec(targets=[QSPEC.targets, "lm_head"], stacked=QSPEC.stacked, block_size=32)
    model, base = hf.from_pretrained(llama, quantize=qspec)
    spec = lv.AdapterSpec(targets=[r"layers/(attn|mlp)/\w+_proj", "lm_head"], stacked=model.stacked, r=4, alpha=8)
    adapted = lv.adapt(base, spec, 0)
    trainable, frozen = lv.split(adapted)
    # Gradients exist only for LoRA leaves: nothing of the quantized nodes is in the trainable tree.
    paths = [p for p, _ in lv.leaves_with_paths(trainable)]
    assert paths and all(p.endswith(("lora_a", "lora_b")) for p in paths)
    ids = jnp.asarray(np.tile(np.arange(2, 26), (4, 1)))  # a pattern the random base cannot predict
    opt = optax.adam(1e-2)  # at 3e-2 Adam oscillates here and the end point depends on rounding order
    state = opt.init(trainable)

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(lambda t: lv.models.lm_loss(model.apply(lv.combine(t, frozen), ids), ids))(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    losses = []
    for _ in range(60):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0]
    tuned = lv.combine(trainable, frozen)
    # Codes and scales did not move.
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(lv.split(adapted)[1])):
        np.testing.assert_array_equal(a, b)
    # The merged (export) model is the dequantized 4-bit base plus the trained delta, per layer.
    merged = lv.merge(tuned)
    node = tuned["layers"]["attn"]["q_proj"]
    expect = np.asarray(node.weight.dequantize(jnp.float32)) + node.scale * np.einsum(
        "lir,lro->lio", np.asarray(node.lora_a), np.asarray(node.lora_b))
    assert_close(merged["layers"]["attn"]["q_proj"], expect, 2e-5)
    assert_close(model.apply(merged, ids), model.apply(tuned, ids), 2e-4)
    # bf16 compute with fp32 adapters runs (QLoRA's setting).
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 and x.ndim > 1 else x, base)
    logits = model.apply(lv.adapt(bf16, spec, 0), ids)
    assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))


def test_quantize_on_load_peak_host_memory_is_about_one_tensor(tmp_path):
    """numpy allocations (tracked by tracemalloc) peak near one fp32 tensor, not the model."""
    import tracemalloc

    import torch
    import transformers as T

    config = T.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=12,
                           num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(tmp_path)
    qspec = lv.QuantSpec(targets=r"layers/(attn|mlp)/\w+_proj", stacked=r"layers/.*")
    hf.from_pretrained(tmp_path, quantize=qspec)  # compile the per-tensor quantizer outside the measurement
    full_bytes = 12 * (4 * 128 * 128 + 3 * 128 * 512) * 4
    one_tensor = 128 * 512 * 4
    tracemalloc.start()
    hf.from_pretrained(tmp_path, quantize=qspec)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.25 * full_bytes, (peak, full_bytes, one_tensor)


def test_quantize_after_dora_keeps_forward_and_merge_in_agreement(llama):
    """``quantize`` over DoRA nodes recomputes their column norms from the NF4 weight: the factored
    forward equals the merged model, and at init it equals DoRA adapted over the quantized base."""
    model, params = hf.from_pretrained(llama)
    ids = jnp.asarray(H.inputs(96, 0)[0])
    spec = lv.AdapterSpec(targets=r"layers/(attn|mlp)/\w+_proj", stacked=model.stacked, r=4, variant="dora")
    fresh = lv.adapt(params, spec, 1)
    first = lv.adapt(lv.quantize(params, QSPEC), spec, 1)
    late = lv.quantize(fresh, QSPEC)
    assert_close(model.apply(late, ids), model.apply(first, ids), 5e-5)
    # Trained (moved) factors and magnitudes, then quantized: forward == merge, ratio m/‖·‖ kept.
    moved = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.05, magnitude=n.magnitude * 1.1)
                         if isinstance(n, lv.DoraNode) else n, fresh, is_leaf=lambda n: isinstance(n, lv.DoraNode))
    q = lv.quantize(moved, QSPEC)
    assert_close(model.apply(q, ids), model.apply(lv.merge(q), ids), 5e-5)
    for before, after in zip(*(jax.tree.leaves(t, is_leaf=lambda n: isinstance(n, lv.DoraNode)) for t in (moved, q))):
        if isinstance(before, lv.DoraNode):
            np.testing.assert_allclose(after.magnitude / after.norm(), before.magnitude / before.norm(), rtol=1e-5)
