import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_variants as lv
from lorax_variants.variants.sora import sora_proximal, sora_sparsity
from tests.close import assert_close


def test_proximal_step_is_the_papers_soft_threshold():
    tree = lv.adapt({"w": jnp.ones((8, 6))}, lv.AdapterSpec(targets="w", r=5, variant="sora"), 0)
    gate = jnp.array([0.05, -0.3, 0.12, -0.08, 2.0])
    tree = {"w": tree["w"].replace(gate=gate)}
    trainable, frozen = lv.split(tree)
    grads = jax.tree.map(jnp.zeros_like, trainable)
    grads["w"] = grads["w"].replace(gate=jnp.array([0.0, 0.0, 0.05, 0.0, -1.0]))
    tx = optax.chain(optax.sgd(1.0), sora_proximal(0.1))
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    new = optax.apply_updates(trainable, updates)
    g_tilde = np.asarray(gate) - np.array([0.0, 0.0, 0.05, 0.0, -1.0])  # sgd step
    expect = np.sign(g_tilde) * np.maximum(np.abs(g_tilde) - 0.1, 0.0)  # paper's prox
    assert_close(new["w"].gate, expect, 1e-6)
    np.testing.assert_array_equal(new["w"].lora_a, trainable["w"].lora_a)  # only gates are thresholded
    assert np.isclose(sora_sparsity(lv.combine(new, frozen))["w"], 3 / 5)  # g in (ξ, 2ξ) kept: 0.12 -> 0.02


def test_schedule_of_xi():
    tree = lv.adapt({"w": jnp.ones((8, 6))}, lv.AdapterSpec(targets="w", r=2, variant="sora"), 0)
    trainable, _ = lv.split(tree)
    tx = sora_proximal(optax.linear_schedule(0.0, 1.0, 10))
    state = tx.init(trainable)
    zero = jax.tree.map(jnp.zeros_like, trainable)
    u, state = tx.update(zero, state, trainable)
    np.testing.assert_array_equal(u["w"].gate, 0.0)  # ξ_0 = 0
    for _ in range(9):
        u, state = tx.update(zero, state, trainable)
    np.testing.assert_allclose(u["w"].gate, -0.9)  # ξ_9 = 0.9: gates 1 -> 0.1
