import jax
import jax.numpy as jnp
import numpy as np

import lorax_variants as lv


def test_with_dropout_sets_one_key_per_node_and_per_stacked_layer():
    p = {"layers": {"w": jnp.ones((3, 8, 8))}, "head": jnp.ones((8, 8)), "plain": jnp.ones((8, 8))}
    spec = lv.AdapterSpec(targets=r"layers/w|head", stacked=r"layers/.*", r=2, dropout=0.1)
    tree = lv.with_dropout(lv.adapt(p, spec, 0), jax.random.key(0))
    assert tree["layers"]["w"].dropout_key.shape == (3,)
    assert tree["head"].dropout_key.shape == ()
    assert tree["plain"] is p["plain"]
    layer_keys = jax.random.key_data(tree["layers"]["w"].dropout_key)
    assert len({tuple(np.asarray(k)) for k in layer_keys}) == 3
    cleared = lv.without_dropout(tree)
    assert cleared["layers"]["w"].dropout_key is None and cleared["head"].dropout_key is None


def test_nodes_without_dropout_get_no_key():
    tree = lv.with_dropout(lv.adapt({"w": jnp.ones((4, 4))}, lv.AdapterSpec(targets="w", r=2), 0), jax.random.key(0))
    assert tree["w"].dropout_key is None
