import jax
import jax.numpy as jnp
import numpy as np

import lorax_variants as lv
from tests.close import assert_close


def test_gated_forward_prune_and_merge_follow_the_equation():
    w = jax.random.normal(jax.random.key(0), (16, 12))
    node = lv.adapt({"w": w}, lv.AdapterSpec(targets="w", r=5, alpha=10, variant="sora"), 0)["w"]
    assert np.all(np.asarray(node.gate) == 1.0)
    gate = jnp.array([0.5, 0.0, -2.0, 0.0, 1.5])
    node = node.replace(lora_b=jax.random.normal(jax.random.key(1), (5, 12)), gate=gate)
    x = jax.random.normal(jax.random.key(2), (3, 16))
    A, B = np.asarray(node.lora_a, np.float64), np.asarray(node.lora_b, np.float64)
    delta = 2.0 * ((A * np.asarray(gate)) @ B)  # s ((x A) ⊙ g) B
    expect = np.asarray(x, np.float64) @ (np.asarray(w) + delta)
    assert_close(lv.dense(x, node), expect, 2e-4)
    assert_close(lv.merge(node), np.asarray(w) + delta, 2e-5)
    pruned = lv.prune({"w": node})["w"]
    assert isinstance(pruned, lv.LoraNode) and pruned.rank == 3  # zero gates removed
    assert_close(lv.dense(x, pruned), expect, 2e-4)
    assert lv.count_params({"w": node}).trainable == 16 * 5 + 5 * 12 + 5
