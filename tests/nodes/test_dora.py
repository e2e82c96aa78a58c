import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch

import lorax_variants as lv
from tests import peft_refs as R
from tests.close import assert_close


def _pair(rslora=False):
    torch.manual_seed(0)
    model = peft.get_peft_model(R.TwoLinear(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"],
                                                                use_dora=True, use_rslora=rslora))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)  # move A, B and the magnitude off their init
    ours = lv.adapt(R.weights_of(model), lv.AdapterSpec(targets=r"(up|down)/kernel", r=4, alpha=8, variant="dora",
                                                          rslora=rslora), 0)
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        node = ours[name]["kernel"]
        ours[name]["kernel"] = node.replace(
            lora_a=jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T),
            lora_b=jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T),
            magnitude=jnp.asarray(layer.lora_magnitude_vector["default"].weight.detach().numpy()),
        )
    return model, ours


def test_forward_equals_peft_dora():
    for rslora in (False, True):
        model, ours = _pair(rslora)
        x = torch.randn(6, 24)
        assert_close(R.apply(ours, jnp.asarray(x.numpy())), model(x).detach().numpy(), 1e-4)


def test_magnitude_initialised_to_column_norms_and_merge_is_the_papers_equation():
    w = jax.random.normal(jax.random.key(0), (24, 40))
    node = lv.adapt({"w": w}, lv.AdapterSpec(targets="w", r=4, variant="dora"), 0)["w"]
    np.testing.assert_allclose(node.magnitude, np.linalg.norm(np.asarray(w), axis=0), rtol=1e-6)
    node = node.replace(lora_b=jax.random.normal(jax.random.key(1), (4, 40)), magnitude=node.magnitude * 1.3)
    full = np.asarray(w) + node.scale * np.asarray(node.lora_a) @ np.asarray(node.lora_b)
    expect = np.asarray(node.magnitude) * full / np.linalg.norm(full, axis=0)
    assert_close(lv.merge(node), expect, 2e-5)
    x = jax.random.normal(jax.random.key(2), (5, 24))
    assert_close(lv.dense(x, node), np.asarray(x) @ expect, 2e-4)
    np.testing.assert_allclose(node.norm(), np.linalg.norm(full, axis=0), rtol=1e-5)  # factored norm


def test_norm_is_a_constant_in_backward_and_no_dxk_gradient_is_formed():
    d_in, d_out = 96, 80
    w = jax.random.normal(jax.random.key(0), (d_in, d_out))
    node = lv.adapt({"w": w}, lv.AdapterSpec(targets="w", r=4, variant="dora"), 0)["w"]
    node = node.replace(lora_b=0.1 * jax.random.normal(jax.random.key(1), (4, d_out)))
    trainable, frozen = lv.split({"w": node})
    x = jax.random.normal(jax.random.key(2), (12, d_in))
    loss = lambda t, f: jnp.sum(jnp.tanh(lv.dense(x, lv.combine(t, f)["w"])))  # noqa: E731
    g = jax.grad(loss)(trainable, frozen)["w"]
    # Reference gradient with the norm detached, from the paper's equation in numpy-able jax.
    def ref(a, b, m):
        full = w + node.scale * a @ b
        n = jax.lax.stop_gradient(jnp.linalg.norm(full, axis=0))
        return jnp.sum(jnp.tanh(x @ (m * full / n)))
    ga, gb, gm = jax.grad(ref, argnums=(0, 1, 2))(node.lora_a, node.lora_b, node.magnitude)
    for ours, theirs in ((g.lora_a, ga), (g.lora_b, gb), (g.magnitude, gm)):
        assert_close(ours, theirs, 2e-4)
    hlo = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile().as_text()
    producers = re.findall(rf"= f32\[(?:{d_in},{d_out}|{d_out},{d_in})\]\S* ([\w-]+)\(", hlo)
    assert set(producers) <= {"parameter"}, producers


def test_dora_over_a_quantized_base():
    w = jax.random.normal(jax.random.key(0), (128, 32))
    q = lv.quantize({"w": w}, lv.QuantSpec(targets="w"))
    node = lv.adapt(q, lv.AdapterSpec(targets="w", r=4, variant="dora"), 0)["w"]
    deq = np.asarray(q["w"].dequantize())
    np.testing.assert_allclose(node.magnitude, np.linalg.norm(deq, axis=0), rtol=1e-5)
    x = jax.random.normal(jax.random.key(1), (3, 128))
    assert_close(lv.dense(x, node), np.asarray(x) @ deq, 2e-4)
