import jax
import jax.numpy as jnp

import lorax_variants as lv


def test_counts_and_bytes_concrete_and_abstract_agree():
    p = {"w": jnp.ones((16, 8), jnp.bfloat16), "b": jnp.ones(8), "head": jnp.ones((8, 3))}
    spec = lv.AdapterSpec(targets="w", r=2)
    concrete = lv.adapt(p, spec, 0)
    abstract = jax.eval_shape(lambda p: lv.adapt(p, spec, jax.random.PRNGKey(0)), p)
    for tree in (concrete, abstract):
        c = lv.count_params(tree)
        assert c == lv.ParamCount(trainable=16 * 2 + 2 * 8, frozen=16 * 8 + 8 + 24)
        assert lv.count_params(tree, extra="head").trainable == c.trainable + 24
        assert lv.tree_bytes(tree) == 16 * 8 * 2 + (8 + 24) * 4 + (16 * 2 + 2 * 8) * 4
    assert abs(c.trainable_fraction - 48 / c.total) < 1e-12


def test_shared_leaf_counted_once():
    shared = jnp.ones((4, 4))
    tree = {"a": shared, "b": shared}
    assert lv.tree_bytes(tree) == 64
    assert lv.count_params(tree).frozen == 16


def test_prng_keys_count_as_bytes_not_params():
    tree = {"k": jax.random.split(jax.random.key(0), 3), "w": jnp.ones(2)}
    assert lv.count_params(tree).frozen == 2
    assert lv.tree_bytes(tree) == 3 * 8 + 8
