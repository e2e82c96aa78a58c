"""QA-LoRA (arXiv 2309.14717) over min-max int4 with zero points.

References computed here: min-max int4 quantization in numpy; the adapter's forward and gradients from
PEFT's own ``QALoraLinearVariant.forward`` (torch autograd) on the same dequantized base; the merged int4
tree against the training forward.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lorax_variants as lv
from tests.close import assert_close

D_IN, D_OUT, GROUP = 128, 48, 32


def _np_int4_asym(w, bs):
    """Min-max 4-bit with a zero point per (block of ``bs`` input rows, output column), in numpy."""
    blocks = w.reshape(w.shape[0] // bs, bs, w.shape[1]).astype(np.float64)
    low, high = blocks.min(1, keepdims=True), blocks.max(1, keepdims=True)
    step = (high - low) / 15
    q = np.clip(np.round((blocks - low) / step), 0, 15)
    return (q * step + low).reshape(w.shape)


def _quantized(shape=(D_IN, D_OUT), double_quant=False, key=0):
    w = jax.random.normal(jax.random.key(key), shape) * 0.05
    return w, lv.quantize({"w": w}, lv.QuantSpec("w", kind="int4_asym", block_size=GROUP, double_quant=double_quant,
                                                 stacked="w" if len(shape) == 3 else None))


def _trained(tree, key=1, **spec):
    spec = {"targets": "w", "variant": "qalora", "r": 4, "alpha": 8, **spec}
    adapted = lv.adapt(tree, lv.AdapterSpec(**spec), 0)
    trainable, frozen = lv.split(adapted)
    keys = iter(jax.random.split(jax.random.key(key), 8))
    moved = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), trainable)
    return lv.combine(moved, frozen)


def test_int4_asym_equals_min_max_quantization_in_numpy():
    w, tree = _quantized()
    ours = np.asarray(tree["w"].dequantize())
    ref = _np_int4_asym(np.asarray(w), GROUP)
    assert_close(ours, ref, 1e-5)
    step = (np.ptp(np.asarray(w).reshape(-1, GROUP, D_OUT), axis=1) / 15).max()
    assert np.abs(ours - np.asarray(w)).max() <= step / 2 + 1e-6
    assert tree["w"].codes.dtype == jnp.uint8 and tree["w"].codes.shape == (D_IN // 2, D_OUT)


def test_forward_and_gradients_equal_peft_qalora():
    _, tree = _quantized()
    node = _trained(tree)["w"]
    assert node.lora_a.shape == (D_IN // GROUP, 4) and node.group_size == GROUP
    x = np.asarray(jax.random.normal(jax.random.key(5), (2, 3, D_IN)))
    g = np.asarray(jax.random.normal(jax.random.key(6), (2, 3, D_OUT)))

    from peft.tuners.lora.variants import QALoraLinearVariant

    w_hat = torch.tensor(np.asarray(node.weight.dequantize()))
    a = torch.tensor(np.asarray(node.lora_a).T.copy(), requires_grad=True)  # torch Linear: [r, in/L]
    b = torch.tensor(np.asarray(node.lora_b).T.copy(), requires_grad=True)  # [out, r]
    module = SimpleNamespace(lora_A={"d": SimpleNamespace(weight=a)}, lora_B={"d": SimpleNamespace(weight=b)},
                             lora_dropout={"d": torch.nn.Identity()}, scaling={"d": node.scale},
                             qalora_group_size={"d": GROUP}, in_features=D_IN, training=False)
    xt = torch.tensor(x, requires_grad=True)
    theirs = QALoraLinearVariant.forward(module, active_adapter="d", x=xt, result=xt @ w_hat)
    (theirs * torch.tensor(g)).sum().backward()

    trainable, frozen = lv.split({"w": node})
    loss = lambda t, x: jnp.sum(lv.dense(x, lv.combine(t, frozen)["w"]) * g)  # noqa: E731
    ours = lv.dense(jnp.asarray(x), node)
    grads, dx = jax.grad(loss, argnums=(0, 1))(trainable, jnp.asarray(x))
    assert_close(ours, theirs.detach().numpy(), 2e-5)
    assert_close(grads["w"].lora_a, a.grad.numpy().T, 2e-4)
    assert_close(grads["w"].lora_b, b.grad.numpy().T, 2e-4)
    assert_close(dx, xt.grad.numpy(), 2e-4)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_merge_stays_int4_and_equals_the_training_forward(double_quant, stacked):
    shape = (3, D_IN, D_OUT) if stacked else (D_IN, D_OUT)
    _, tree = _quantized(shape, double_quant)
    adapted = _trained(tree, stacked="w" if stacked else None)
    merged = lv.merge_quantized(adapted)
    node, base = merged["w"], tree["w"]
    assert isinstance(node, lv.QuantizedNode) and node.kind == "int4_asym"
    for field in ("codes", "absmax", "qabsmax", "absmax2", "offset"):  # the 4-bit codes and steps do not move
        same = getattr(base, field)
        assert (same is None) == (getattr(node, field) is None)
        if same is not None:
            np.testing.assert_array_equal(getattr(node, field), same)
    assert lv.tree_bytes(merged) == lv.tree_bytes(tree)
    assert float(jnp.max(jnp.abs(node.zeros - base.zeros))) > 1e-3  # the adapter went into the zero points
    x = jax.random.normal(jax.random.key(7), (5, D_IN))
    layers = range(shape[0]) if stacked else [None]
    for i in layers:
        pick = (lambda t: t) if i is None else (lambda t, i=i: jax.tree.map(lambda a: a[i], t))
        train = lv.dense(x, pick(adapted["w"]))
        assert_close(lv.dense(x, pick(node)), train, 2e-5)
        assert_close(x @ pick(lv.merge(adapted)["w"]), train, 2e-5)


def test_group_size_may_span_several_quantization_blocks():
    w = jax.random.normal(jax.random.key(0), (D_IN, D_OUT)) * 0.05
    tree = lv.quantize({"w": w}, lv.QuantSpec("w", kind="int4_asym", block_size=16, double_quant=False))
    adapted = _trained(tree, settings=lv.QaLora(group_size=64))
    x = jax.random.normal(jax.random.key(7), (5, D_IN))
    assert_close(lv.dense(x, lv.merge_quantized(adapted)["w"]), lv.dense(x, adapted["w"]), 1e-5)


def test_as_lora_is_the_same_function():
    _, tree = _quantized()
    node = _trained(tree)["w"]
    x = jax.random.normal(jax.random.key(7), (5, D_IN))
    lora = lv.as_lora({"w": node})["w"]
    assert isinstance(lora, lv.LoraNode) and lora.lora_a.shape == (D_IN, 4)
    assert_close(lv.dense(x, lora), lv.dense(x, node), 2e-5)


def test_refusals_name_the_path():
    w = jax.random.normal(jax.random.key(0), (D_IN, D_OUT))
    with pytest.raises(ValueError, match="w: QA-LoRA pools the input.*group_size"):
        lv.adapt({"w": w}, lv.AdapterSpec("w", variant="qalora"), 0)
    with pytest.raises(ValueError, match="w: input dimension 128 is not a multiple of the QA-LoRA group size 48"):
        lv.adapt({"w": w}, lv.AdapterSpec("w", variant="qalora", settings=lv.QaLora(group_size=48)), 0)
    _, tree = _quantized()
    with pytest.raises(ValueError, match="group_size 16 is not a multiple of the weight's quantization block_size 32"):
        lv.adapt(tree, lv.AdapterSpec("w", variant="qalora", settings=lv.QaLora(group_size=16)), 0)
    nf4 = lv.quantize({"w": w}, lv.QuantSpec("w", kind="nf4", block_size=32))
    with pytest.raises(ValueError, match="w: QA-LoRA folds into zero points, but its base is a nf4"):
        lv.merge_quantized(lv.adapt(nf4, lv.AdapterSpec("w", variant="qalora"), 0))
    with pytest.raises(ValueError, match="w: a LoraNode cannot merge into a quantized weight"):
        lv.merge_quantized(lv.adapt(nf4, lv.AdapterSpec("w"), 0))
    with pytest.raises(ValueError, match="QaLora.group_size must be a positive integer"):
        lv.QaLora(group_size=0)
