import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_variants as lv
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer
from tests.close import assert_close


@pytest.fixture(scope="module")
def setup():
    model = TinyTransformer(TinyConfig(d_model=32, n_heads=2, d_ff=64, n_layers=2))
    params = model.init(jax.random.key(0))
    spec = lv.AdapterSpec(targets=r"layers/(attn|mlp)/\w+_proj", stacked=STACKED, r=4, variant="multitask", settings=lv.MultiTask(n_tasks=3))
    tree = lv.adapt(params, spec, 1)
    tree = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.05 * jnp.arange(1, 4.0)[None, :, None, None])
                        if isinstance(n, lv.MultiTaskNode) else n, tree, is_leaf=lambda n: isinstance(n, lv.MultiTaskNode))
    ids = jax.random.randint(jax.random.key(2), (4, 8), 0, 256)
    return model, params, tree, ids


def test_routed_batch_equals_each_example_alone(setup):
    model, params, tree, ids = setup
    tasks = [2, 0, lv.BASE, 1]
    batch = model.apply(lv.route(tree, tasks), ids)
    for e, t in enumerate(tasks):
        alone = model.apply(params if t == lv.BASE else lv.select(tree, t), ids[e:e + 1])
        assert_close(batch[e:e + 1], alone, 2e-4)
    assert not np.allclose(batch[0], batch[1])  # tasks really differ


def test_stack_of_separate_adapters_and_merge_of_one(setup):
    model, params, tree, ids = setup
    singles = [lv.select(tree, k) for k in range(3)]
    restacked = lv.stack(singles)
    np.testing.assert_array_equal(model.apply(lv.route(restacked, [0, 1, 2, 1]), ids),
                                  model.apply(lv.route(tree, [0, 1, 2, 1]), ids))
    assert_close(model.apply(lv.merge(lv.select(tree, 2)), ids[:1]), model.apply(lv.route(tree, [2]), ids[:1]), 2e-4)
    with pytest.raises(ValueError, match="merge\\(select\\(tree, task\\)\\)"):
        lv.merge(tree)
    with pytest.raises(ValueError, match="route\\(tree, task_ids\\)"):
        model.apply(tree, ids)
    with pytest.raises(ValueError, match=r"task ids \[3\] out of range"):
        lv.route(tree, [0, 3])


def test_training_one_task_leaves_the_others_unchanged(setup):
    model, params, tree, ids = setup
    t, f = lv.split(tree)
    g = jax.grad(lambda t: jnp.sum(model.apply(lv.route(lv.combine(t, f), [1, 1, 1, 1]), ids) ** 2))(t)
    q = g["layers"]["attn"]["q_proj"]
    assert np.abs(np.asarray(q.lora_b[:, 1])).max() > 0
    assert not np.asarray(q.lora_b[:, 0]).any() and not np.asarray(q.lora_b[:, 2]).any()


@pytest.mark.parametrize("make_ids", [lambda: [2, 0, lv.BASE, 1], lambda: np.array([2, 0, -1, 1]),
                                      lambda: jnp.array([2, 0, -1, 1]), lambda: (2, 0, -1, 1)])
def test_route_inside_jit_with_constant_ids(setup, make_ids):
    """Constant ids (list, numpy, jnp built inside or outside the trace) and traced ids all route under jit."""
    model, params, tree, ids = setup
    want = model.apply(lv.route(tree, [2, 0, lv.BASE, 1]), ids)
    inside = jax.jit(lambda t, x: model.apply(lv.route(t, make_ids()), x))(tree, ids)
    assert_close(inside, want, 2e-5)
    outside = make_ids()
    closed = jax.jit(lambda t, x: model.apply(lv.route(t, outside), x))(tree, ids)
    assert_close(closed, want, 2e-5)
    traced = jax.jit(lambda t, x, i: model.apply(lv.route(t, i), x))(tree, ids, jnp.asarray([2, 0, -1, 1]))
    assert_close(traced, want, 2e-5)
    with pytest.raises(ValueError, match="out of range"):
        jax.jit(lambda t, x: model.apply(lv.route(t, [0, 0, 3, 0]), x))(tree, ids)
