import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_variants as lv
from tests.close import assert_close


def _node(frozen_lower=False):
    w = jax.random.normal(jax.random.key(0), (16, 12))
    node = lv.adapt({"w": w}, lv.AdapterSpec(targets="w", r=6, alpha=12, variant="dylora", settings=lv.DyLora(r_min=2)), 0)["w"]
    return node.replace(lora_b=jax.random.normal(jax.random.key(1), (6, 12)), frozen_lower=frozen_lower)


@pytest.mark.parametrize("b", [2, 4, 6])
def test_rank_b_forward_is_truncated_lora_with_alpha_over_b(b):
    node = _node()
    x = jax.random.normal(jax.random.key(2), (3, 16))
    A, B, W = (np.asarray(v, np.float64) for v in (node.lora_a, node.lora_b, node.weight))
    expect = np.asarray(x, np.float64) @ (W + 12 / b * A[:, :b] @ B[:b])
    tree = lv.with_rank({"w": node}, b)
    assert_close(lv.dense(x, tree["w"]), expect, 2e-4)
    cut = lv.truncate(tree, b)["w"]
    assert isinstance(cut, lv.LoraNode) and cut.rank == b and cut.scale == 12 / b
    assert_close(lv.dense(x, cut), expect, 2e-4)
    # Under jit with a traced rank: static shapes, same result.
    traced = jax.jit(lambda n, b: lv.dense(x, lv.with_rank({"w": n}, b)["w"]))(node, jnp.int32(b))
    assert_close(traced, expect, 2e-4)


def test_gradients_masked_above_b_and_frozen_mode_trains_only_the_bth_rank():
    x = jax.random.normal(jax.random.key(2), (3, 16))
    for frozen_lower, live in ((False, [0, 1, 2]), (True, [2])):
        tree = lv.with_rank({"w": _node(frozen_lower)}, 3)
        t, f = lv.split(tree)
        g = jax.grad(lambda t: jnp.sum(lv.dense(x, lv.combine(t, f)["w"]) ** 2))(t)["w"]
        nonzero_a = [i for i in range(6) if np.abs(np.asarray(g.lora_a)[:, i]).max() > 0]
        nonzero_b = [i for i in range(6) if np.abs(np.asarray(g.lora_b)[i]).max() > 0]
        assert nonzero_a == live and nonzero_b == live


def test_sample_rank_stays_in_range_and_bad_ranks_are_refused():
    tree = {"w": _node()}
    seen = {int(lv.sample_rank(tree, jax.random.key(i))["w"].rank) for i in range(40)}
    assert seen == {2, 3, 4, 5, 6}
    with pytest.raises(ValueError, match=r"rank 7 outside the trained range \[2, 6\]"):
        lv.truncate(tree, 7)
