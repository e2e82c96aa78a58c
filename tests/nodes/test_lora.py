import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax_variants as lv
from tests.close import assert_close


class OneLinear(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def peft_lora(d_in, d_out, r, alpha, **config):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, **config)
    return peft.get_peft_model(OneLinear(d_in, d_out), cfg)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_peft_lora(rslora):
    d_in, d_out, r, alpha = 48, 40, 6, 12
    model = peft_lora(d_in, d_out, r, alpha, use_rslora=rslora)
    layer = model.base_model.model.proj
    with torch.no_grad():  # non-zero B, so the adapter branch is really compared
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 7, d_in)
    expected = model(x).detach().numpy()

    spec = lv.AdapterSpec(targets="proj", r=r, alpha=alpha, rslora=rslora)
    node = lv.adapt({"proj": jnp.asarray(layer.base_layer.weight.detach().numpy().T)}, spec, 0)["proj"]
    node = node.replace(
        lora_a=jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T),
        lora_b=jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T),
    )
    assert node.scale == layer.scaling["default"]
    ours = lv.dense(jnp.asarray(x.numpy()), node) + layer.base_layer.bias.detach().numpy()
    assert_close(ours, expected, 2e-5)


def test_pissa_matches_peft_and_reproduces_w():
    d_in, d_out, r, alpha = 32, 24, 4, 8
    model = peft_lora(d_in, d_out, r, alpha, init_lora_weights="pissa")
    layer = model.base_model.model.proj
    w_orig = OneLinear(d_in, d_out)  # same seed: the weight PEFT started from
    torch.manual_seed(0)
    w_orig = OneLinear(d_in, d_out).proj.weight.detach().numpy().T
    spec = lv.AdapterSpec(targets="proj", r=r, alpha=alpha, init="pissa")
    node = lv.adapt({"proj": jnp.asarray(w_orig)}, spec, 0)["proj"]

    peft_residual = layer.base_layer.weight.detach().numpy().T
    peft_delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy().T
    assert_close(node.weight, peft_residual, 1e-4)
    assert_close(node.lora_a @ node.lora_b, peft_delta, 2e-4)  # sign-free product
    assert_close(lv.merge(node), w_orig, 1e-4)
    # Principal part: the adapter carries the top-r singular values of W.
    s_delta = np.linalg.svd(node.scale * np.asarray(node.lora_a @ node.lora_b), compute_uv=False)[:r]
    np.testing.assert_allclose(s_delta, np.linalg.svd(w_orig, compute_uv=False)[:r], rtol=1e-5)


def test_olora_matches_peft_and_reproduces_w():
    d_in, d_out, r, alpha = 32, 24, 4, 8
    model = peft_lora(d_in, d_out, r, alpha, init_lora_weights="olora")
    layer = model.base_model.model.proj
    torch.manual_seed(0)
    w_orig = OneLinear(d_in, d_out).proj.weight.detach().numpy().T
    node = lv.adapt({"proj": jnp.asarray(w_orig)}, lv.AdapterSpec(targets="proj", r=r, alpha=alpha, init="olora"), 0)["proj"]
    assert_close(node.weight, layer.base_layer.weight.detach().numpy().T, 1e-4)
    peft_delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy().T
    assert_close(node.lora_a @ node.lora_b, peft_delta, 2e-4)  # sign-free product
    assert_close(lv.merge(node), w_orig, 1e-4)
    # B's rows are orthonormal (Q of the QR)
    assert_close(np.asarray(node.lora_b @ node.lora_b.T), np.eye(r), 2e-5)


def _node(key, d_in, d_out, r, lead=(), scale=1.5):
    k = jax.random.split(key, 3)
    return lv.LoraNode(
        weight=jax.random.normal(k[0], lead + (d_in, d_out)),
        lora_a=jax.random.normal(k[1], lead + (d_in, r)),
        lora_b=jax.random.normal(k[2], lead + (r, d_out)),
        scale=scale,
    )


@settings(max_examples=4)  # each new shape compiles
@given(
    d_in=st.integers(1, 24), d_out=st.integers(1, 24), r=st.integers(1, 8),
    batch=st.integers(1, 4), seed=st.integers(0, 2**16), scale=st.floats(0.1, 4.0),
)
def test_factored_apply_equals_x_times_merge(d_in, d_out, r, batch, seed, scale):
    node = _node(jax.random.key(seed), d_in, d_out, r, scale=scale)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, d_in))
    reference = np.asarray(x, np.float64) @ (
        np.asarray(node.weight, np.float64) + scale * np.asarray(node.lora_a, np.float64) @ np.asarray(node.lora_b, np.float64)
    )
    assert_close(lv.dense(x, node), reference, 2e-4)
    assert_close(x @ lv.merge(node), reference, 2e-4)


@settings(max_examples=4)  # each new shape compiles
@given(
    d_in=st.integers(2, 24), d_out=st.integers(2, 24), seed=st.integers(0, 2**16),
    init=st.sampled_from(["kaiming", "gaussian"]), rslora=st.booleans(), variant=st.sampled_from(["lora", "lora_fa"]),
)
def test_at_init_adapted_output_equals_base_exactly(d_in, d_out, seed, init, rslora, variant):
    w = jax.random.normal(jax.random.key(seed), (d_in, d_out))
    r = min(d_in, d_out, 4)
    spec = lv.AdapterSpec(targets="w", r=r, init=init, rslora=rslora, variant=variant)
    node = lv.adapt({"w": w}, spec, seed)["w"]
    x = jax.random.normal(jax.random.key(seed + 1), (3, d_in))
    np.testing.assert_array_equal(lv.dense(x, node), x @ w)
    np.testing.assert_array_equal(lv.merge(node), w)


def test_bf16_base_with_fp32_adapters_computes_in_activation_dtype():
    node = _node(jax.random.key(0), 16, 8, 2).replace(weight=jnp.ones((16, 8), jnp.bfloat16))
    y = lv.dense(jnp.ones((2, 16), jnp.bfloat16), node)
    assert y.dtype == jnp.bfloat16
    assert lv.merge(node).dtype == jnp.bfloat16


def test_dropout_only_on_adapter_input_and_inverted():
    d, rate = 64, 0.25
    w = jax.random.normal(jax.random.key(0), (d, d))
    # A = I (r = d), B = I: the adapter branch is exactly the dropped-out input.
    node = lv.LoraNode(weight=w, lora_a=jnp.eye(d), lora_b=jnp.eye(d), scale=1.0, dropout=rate)
    x = jax.random.normal(jax.random.key(1), (32, d)) + 3.0
    base = x @ w
    assert_close(lv.dense(x, node), base + x, 2e-5)  # no key: eval
    tree = lv.with_dropout({"p": node}, jax.random.key(2))
    branch = np.asarray(lv.dense(x, tree["p"]) - base)
    x = np.asarray(x)
    kept = np.isclose(branch, x / (1 - rate), rtol=1e-4, atol=1e-3)
    dropped = np.isclose(branch, 0.0, atol=1e-3)
    assert np.all(kept | dropped)
    assert abs(dropped.mean() - rate) < 0.03


def test_factored_step_never_forms_a_full_weight_sized_intermediate():
    d_in, d_out, r = 96, 80, 4
    node = _node(jax.random.key(0), d_in, d_out, r)
    trainable, frozen = lv.split({"w": node})
    x = jax.random.normal(jax.random.key(1), (12, d_in))

    def loss(t, f):
        return jnp.sum(jnp.tanh(lv.dense(x, lv.combine(t, f)["w"])))

    def full_sized(eqns):
        return [e for e in eqns for v in e.outvars if tuple(v.aval.shape) in ((d_in, d_out), (d_out, d_in))]

    step = jax.value_and_grad(loss)
    assert full_sized(jax.make_jaxpr(step)(trainable, frozen).eqns) == []
    # After XLA's optimizations too: the only [in, out] buffer is the frozen weight argument.
    hlo = jax.jit(step).lower(trainable, frozen).compile().as_text()
    producers = re.findall(rf"= f32\[(?:{d_in},{d_out}|{d_out},{d_in})\]\S* ([\w-]+)\(", hlo)
    assert producers and set(producers) == {"parameter"}, producers
    # The merged path does form it (that is what merge means): the check can see it.
    merged = jax.grad(lambda t, f: jnp.sum(x @ lv.merge(lv.combine(t, f))["w"]))
    assert full_sized(jax.make_jaxpr(merged)(trainable, frozen).eqns)


def test_gradients_reach_only_trainable_leaves_and_match_the_equations():
    node = _node(jax.random.key(0), 10, 6, 3, scale=2.0)
    x = jax.random.normal(jax.random.key(1), (5, 10))
    trainable, frozen = lv.split({"w": node})
    g = jax.grad(lambda t: jnp.sum(lv.dense(x, lv.combine(t, frozen)["w"])))(trainable)["w"]
    assert g.weight is None
    # d/dA sum(x W + s x A B) = s xᵀ 1 Bᵀ ;  d/dB = s (x A)ᵀ 1
    ones = np.ones((5, 6))
    X, A, B = (np.asarray(v, np.float64) for v in (x, node.lora_a, node.lora_b))
    np.testing.assert_allclose(g.lora_a, 2.0 * X.T @ ones @ B.T, rtol=1e-4)
    np.testing.assert_allclose(g.lora_b, 2.0 * (X @ A).T @ ones, rtol=1e-4)
