"""Many adapters of different ranks and variants trained in one step (``lv.adapters``).

References: each example run alone through its own adapter as a plain LoRA/DoRA tree (``pick``), and each
adapter's gradient from training it alone on its rows; FLOPs from XLA's cost analysis.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_variants as lv
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer
from tests.close import assert_close
from tests.env import xla_env

PROJ = r"layers/(attn|mlp)/\w+_proj"
SPECS = {
    "small": lv.AdapterSpec(targets=PROJ, stacked=STACKED, r=2, alpha=4),
    "wide_dora": lv.AdapterSpec(targets=PROJ, stacked=STACKED, r=8, alpha=8, variant="dora"),
    "attn_only": lv.AdapterSpec(targets=r"layers/attn/(q|v)_proj", stacked=STACKED, r=4, alpha=16, rslora=True),
}
NAMES = list(SPECS)


def _moved(tree, key=3, scale=0.1):
    trainable, frozen = lv.split(tree)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    moved = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return lv.combine(jax.tree.unflatten(treedef, moved), frozen)


def _with_impl(tree, impl):
    return jax.tree.map(lambda n: n.replace(impl=impl) if isinstance(n, lv.MultiAdapterNode) else n, tree,
                        is_leaf=lambda n: isinstance(n, lv.MultiAdapterNode))


@pytest.fixture(scope="module")
def setup():
    model = TinyTransformer(TinyConfig(d_model=32, n_heads=2, d_ff=64, n_layers=2))
    params = model.init(jax.random.key(0))
    tree = _moved(lv.adapters(params, SPECS, 1))
    ids = jax.random.randint(jax.random.key(2), (6, 8), 0, 256)
    return model, params, tree, ids


def test_each_adapter_is_what_adapt_gives_it_alone(setup):
    model, params, _, _ = setup
    fresh = lv.adapters(params, SPECS, 1)
    for i, (name, spec) in enumerate(SPECS.items()):
        alone = lv.adapt(params, spec, jax.random.fold_in(jax.random.PRNGKey(1), i))
        for x, y in zip(jax.tree.leaves(lv.pick(fresh, name)), jax.tree.leaves(alone)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("impl", ["gather", "ragged", pytest.param("masked", marks=pytest.mark.slow)])
def test_routed_batch_equals_each_example_alone(setup, impl):
    model, params, tree, ids = setup
    routes = np.array([1, 0, lv.BASE, 2, 1, 0])
    if impl == "ragged":
        perm = lv.sort_by_adapter(routes)
        routes, ids = routes[perm], ids[perm]
    batch = model.apply(lv.route(_with_impl(tree, impl), routes), ids)
    for e, t in enumerate(routes):
        alone = model.apply(params if t == lv.BASE else lv.pick(tree, NAMES[t]), ids[e:e + 1])
        assert_close(batch[e:e + 1], alone, 2e-4)
    assert len({float(jnp.sum(batch[e])) for e in range(3)}) == 3  # the adapters really differ


def _per_adapter_loss(model, tree, ids, routes, targets):
    """Σ over adapters of the mean squared error over that adapter's rows (BASE rows count for none)."""
    out = model.apply(lv.route(tree, routes), ids)
    sums = jnp.sum((out - targets) ** 2, axis=(1, 2))
    means, _ = lv.adapter_means(sums, jnp.full(sums.shape, out[0].size), jnp.asarray(routes), len(NAMES))
    return jnp.sum(means)


@pytest.mark.parametrize("impl", ["gather", pytest.param("ragged", marks=pytest.mark.slow)])
def test_each_adapters_gradient_equals_training_it_alone_on_its_rows(setup, impl):
    model, params, tree, ids = setup
    routes = np.array([0, 0, 1, 1, 1, 2]) if impl == "ragged" else np.array([1, 0, 2, 1, lv.BASE, 0])
    targets = jax.random.normal(jax.random.key(4), ids.shape + (256,))
    trainable, frozen = lv.split(_with_impl(tree, impl))
    grads = jax.jit(jax.grad(lambda t: _per_adapter_loss(model, lv.combine(t, frozen), ids, routes, targets)))(trainable)
    for k, name in enumerate(NAMES):
        rows = np.flatnonzero(routes == k)
        t_k, f_k = lv.split(lv.pick(tree, name))
        alone = jax.jit(jax.grad(lambda t: jnp.mean((model.apply(lv.combine(t, f_k), ids[rows]) - targets[rows]) ** 2)))(t_k)
        ours = lv.split(lv.pick(lv.combine(grads, frozen), name))[0]
        for path, g in lv.leaves_with_paths(alone):
            got = dict(lv.leaves_with_paths(ours))[path]
            assert_close(got, g, 5e-4, err_msg=f"{name} {path}")
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(alone)) > 0


def _step_flops(k, impl, r=32, rows=8, seq=64, d=128):
    w = jax.random.normal(jax.random.key(0), (d, d))
    tree = _with_impl(_moved(lv.adapters({"w": w}, {f"a{i}": lv.AdapterSpec("w", r=r) for i in range(k)}, 0)), impl)
    routes = np.sort(np.arange(rows) % k)
    trainable, frozen = lv.split(tree)
    x = jax.random.normal(jax.random.key(1), (rows, seq, d))
    loss = lambda t: jnp.sum(lv.dense(x, lv.route(lv.combine(t, frozen), routes)["w"]) ** 2)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss)).lower(trainable).compile().cost_analysis()["flops"]


def test_compute_does_not_grow_with_the_number_of_adapters():
    """The gather path's FLOPs with 16 adapters stay those of one (each row meets its own adapter), where k
    masked dense passes multiply the rank-r work by k (what XLA:CPU makes of ragged_dot)."""
    rows, seq, d = 8, 64, 128
    one, sixteen = _step_flops(1, "gather"), _step_flops(16, "gather")
    low_rank_one = one - 2 * rows * seq * d * d  # minus the frozen base matmul's forward
    assert low_rank_one > 0.1 * one
    assert sixteen < one + 0.1 * low_rank_one, (one, sixteen)
    masked = _step_flops(16, "ragged")
    assert masked - 2 * rows * seq * d * d > 8 * low_rank_one, (masked, one)


def test_sharded_like_a_single_adapter():
    from jax.sharding import PartitionSpec as P

    from lorax_variants.sharding import make_mesh, tree_specs

    w = jax.ShapeDtypeStruct((64, 96), jnp.float32)
    tree = jax.eval_shape(lambda w: lv.adapters({"layers": {"attn": {"q_proj": w}}}, {
        "a": lv.AdapterSpec("layers/attn/q_proj", r=4), "b": lv.AdapterSpec("layers/attn/q_proj", r=8,
                                                                               variant="dora")}, 0), w)
    single = jax.eval_shape(lambda w: lv.adapt({"layers": {"attn": {"q_proj": w}}}, lv.AdapterSpec(
        "layers/attn/q_proj", r=4), 0), w)
    mesh = make_mesh(1, 1, 1)
    ours, ref = tree_specs(tree, mesh)["layers"]["attn"]["q_proj"], tree_specs(single, mesh)["layers"]["attn"]["q_proj"]
    assert ours.lora_a[0] == ref.lora_a and ours.lora_b[1] == ref.lora_b and ours.weight == ref.weight
    assert isinstance(ours.magnitude[1], P) and ours.magnitude[0] is None


def test_refusals_name_the_problem(setup):
    model, params, tree, ids = setup
    with pytest.raises(ValueError, match="not sorted by adapter"):
        lv.route(_with_impl(tree, "ragged"), [1, 0, 0, 2, 1, 0])
    traced = jax.jit(lambda r: model.apply(lv.route(_with_impl(tree, "ragged"), r), ids))(jnp.array([1, 0, 0, 2, 1, 0]))
    assert np.isnan(np.asarray(traced)).any()  # unsorted ids under jit: NaN, never a silently wrong output
    with pytest.raises(ValueError, match="route\\(tree, adapter_ids\\)"):
        model.apply(tree, ids)
    with pytest.raises(ValueError, match=r"out of range \[-1, 3\)"):
        lv.route(tree, [0, 3])
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        lv.pick(tree, "x")
    with pytest.raises(ValueError, match="merge\\(pick\\(tree, name\\)\\)"):
        lv.merge(tree)
    with pytest.raises(ValueError, match="adapter 'v': variant 'vera'"):
        lv.adapters(params, {"v": lv.AdapterSpec(PROJ, stacked=STACKED, variant="vera")}, 0)
    with pytest.raises(ValueError, match="adapter 'bad': AdapterSpec.targets"):
        lv.adapters(params, {"bad": lv.AdapterSpec("nothing/here")}, 0)
    other = lv.adapt(jax.tree.map(lambda x: x + 1, params), SPECS["small"], 0)
    with pytest.raises(ValueError, match="stands over another base weight"):
        lv.join_trees({"a": lv.adapt(params, SPECS["small"], 0), "b": other})


SHARDED = r"""
import json, jax, jax.numpy as jnp, numpy as np
import lorax_variants as lv
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer
from lorax_variants.sharding import make_mesh, tree_shardings
model = TinyTransformer(TinyConfig(d_model=32, n_heads=2, d_ff=64, n_layers=2))
params = model.init(jax.random.key(0))
proj = r"layers/(attn|mlp)/\w+_proj"
tree = lv.adapters(params, {"a": lv.AdapterSpec(proj, stacked=STACKED, r=4),
                            "b": lv.AdapterSpec(proj, stacked=STACKED, r=2, variant="dora")}, 1, impl="IMPL")
t, f = lv.split(tree)
t = jax.tree.map(lambda x: x + 0.1, t)
ids = jax.random.randint(jax.random.key(2), (8, 8), 0, 256)
routes = jnp.asarray(ROUTES)
loss = lambda t, f, ids: jnp.mean(model.apply(lv.route(lv.combine(t, f), routes), ids) ** 2)
step = jax.jit(jax.value_and_grad(loss))
l1, g1 = step(t, f, ids)
mesh = make_mesh(2, 2, 2)
tsh, fsh = lv.split(tree_shardings(lv.combine(t, f), mesh), lv.trainable_mask(tree))
ids_sh = jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
l8, g8 = step(jax.device_put(t, tsh), jax.device_put(f, fsh), ids_sh)
q = jax.device_put(f, fsh)["layers"]["attn"]["q_proj"].weight
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)))
print(json.dumps({"loss": abs(float(l1) - float(l8)), "grads": diff, "weight": str(q.sharding.spec),
                  "b1": str(jax.device_put(t, tsh)["layers"]["attn"]["q_proj"].lora_b[1].sharding.spec)}))
"""


# Under slow (CI's `make test-slow`): the default run checks sharded training in tests/train/test_sharded.py and
# the many-adapter step's exactness on one device above.
@pytest.mark.parametrize("impl, routes", [pytest.param("gather", [1, 0, -1, 1, 0, 0, 1, -1], marks=pytest.mark.slow),
                                          pytest.param("ragged", [0, 0, 0, 1, 1, 1, -1, -1], marks=pytest.mark.slow)])
def test_sharded_over_data_fsdp_tensor_equals_one_device(impl, routes):
    """The batch over data x fsdp, the frozen and adapter leaves over fsdp/tensor as a single adapter's (8 simulated
    devices): the same loss and gradients as on one device."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = xla_env(8, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    script = SHARDED.replace("IMPL", impl).replace("ROUTES", repr(routes))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loss"] < 1e-6 and out["grads"] < 1e-5, out
    assert out["weight"] == "P(None, 'fsdp', 'tensor')" and out["b1"] == "P(None, None, 'tensor')", out
