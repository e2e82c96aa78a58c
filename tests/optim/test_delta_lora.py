import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_variants as lv
from lorax_variants.variants.delta_lora import delta_lora_update
from tests.close import assert_close


def test_frozen_weight_follows_the_product_over_several_steps():
    w0 = np.asarray(jax.random.normal(jax.random.key(0), (10, 6)))
    tree = lv.adapt({"w": jnp.asarray(w0)}, lv.AdapterSpec(targets="w", r=3, alpha=6), 0)
    trainable, frozen = lv.split(tree)
    x = jax.random.normal(jax.random.key(1), (4, 10))
    opt = optax.sgd(0.1)
    state = opt.init(trainable)
    loss = lambda t, f: jnp.sum(jnp.sin(lv.dense(x, lv.combine(t, f)["w"])))  # noqa: E731
    lam, k = 0.5, 2
    w_ref = w0.astype(np.float64)
    for step in range(5):
        g = jax.grad(loss)(trainable, frozen)
        assert g["w"].weight is None  # no gradient of W
        u, state = opt.update(g, state, trainable)
        new = optax.apply_updates(trainable, u)
        frozen = delta_lora_update(frozen, trainable, new, step, lam=lam, start_step=k)
        if step >= k:  # numpy reference: W += λ s (A'B' - AB)
            prod = lambda t: np.asarray(t["w"].lora_a, np.float64) @ np.asarray(t["w"].lora_b, np.float64)  # noqa: E731
            w_ref = w_ref + lam * 2.0 * (prod(new) - prod(trainable))
        trainable = new
        assert_close(frozen["w"].weight, w_ref, 1e-5)
    assert not np.allclose(w_ref, w0)


def test_quantized_base_is_refused():
    tree = lv.adapt(lv.quantize({"w": jnp.ones((64, 8))}, lv.QuantSpec(targets="w")), lv.AdapterSpec(targets="w", r=2), 0)
    t, f = lv.split(tree)
    with pytest.raises(ValueError, match="cannot be quantized"):
        delta_lora_update(f, t, t, 3)


def test_works_on_a_whole_model_tree_with_other_leaves():
    p = {"w": jnp.ones((6, 4)), "b": jnp.zeros(4), "head": jnp.ones((4, 2))}
    tree = lv.adapt(p, lv.AdapterSpec(targets="w", r=2), 0)
    t, f = lv.split(tree, extra="head")
    new = jax.tree.map(lambda x: x + 1.0, t)
    out = delta_lora_update(f, t, new, 5, lam=1.0)
    assert out["b"] is f["b"] and out["head"] is None
    np.testing.assert_allclose(out["w"].weight, 1.0 + tree["w"].scale * (np.asarray(new["w"].lora_a) @ np.asarray(new["w"].lora_b)
                                                                        - np.asarray(t["w"].lora_a) @ np.asarray(t["w"].lora_b)), rtol=1e-5)
