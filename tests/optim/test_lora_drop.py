import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_variants as lv
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer
from lorax_variants.variants import lora_drop
from tests.close import assert_close


def _mlp_tree():
    ws = {f"l{i}": jax.random.normal(jax.random.key(i), (8, 8)) * 0.5 for i in range(4)}
    tree = lv.adapt(ws, lv.AdapterSpec(targets=r"l\d", r=2, alpha=4), 0)
    scales = [0.02, 1.0, 0.05, 0.6]  # adapters of very different sizes
    return {k: n.replace(lora_b=s * jax.random.normal(jax.random.key(10 + i), (2, 8)))
            for i, ((k, n), s) in enumerate(zip(sorted(tree.items()), scales))}


def _apply(tree, x):
    tree = lv.resolve_shared(tree)
    for i in range(4):
        x = jnp.tanh(lv.dense(x, tree[f"l{i}"]))
    return x


def test_importance_equals_sum_of_squared_delta_outputs():
    tree = _mlp_tree()
    batches = [jax.random.normal(jax.random.key(20 + b), (5, 8)) for b in range(3)]
    scores = lora_drop.importance(_apply, tree, batches)
    raw = np.zeros(4)
    for x in batches:  # numpy reference: run the network, read each layer's input
        h = np.asarray(x, np.float64)
        for i in range(4):
            n = tree[f"l{i}"]
            delta = n.scale * np.asarray(n.lora_a, np.float64) @ np.asarray(n.lora_b, np.float64)
            raw[i] += np.sum((h @ delta) ** 2)
            h = np.tanh(h @ (np.asarray(n.weight, np.float64) + delta))
    np.testing.assert_allclose([float(scores[f"l{i}"]) for i in range(4)], raw / raw.sum(), rtol=1e-4)


def test_select_keeps_the_top_share_and_the_rest_share_one_set_that_trains():
    tree = _mlp_tree()
    scores = {"l0": np.array(0.05), "l1": np.array(0.6), "l2": np.array(0.05), "l3": np.array(0.3)}
    dropped, keep = lora_drop.select(tree, scores, threshold=0.9)
    assert {p: bool(k) for p, k in keep.items()} == {"l0": False, "l1": True, "l2": False, "l3": True}
    assert isinstance(dropped["l1"], lv.LoraNode) and isinstance(dropped["l0"], lv.LoraDropNode)
    trainable, frozen = lv.split(dropped)
    shared_leaves = [p for p, _ in lv.leaves_with_paths(trainable) if "shared" in p]
    assert len(shared_leaves) == 2  # one A and one B for the two dropped layers
    g = jax.grad(lambda t: jnp.sum(_apply(lv.combine(t, frozen), jnp.ones((2, 8)))))(trainable)
    owner = "l0" if g["l0"].shared_a.value is not None else "l2"
    assert np.abs(np.asarray(g[owner].shared_a.value)).max() > 0
    with pytest.raises(ValueError, match="threshold"):
        lora_drop.select(tree, scores, threshold=0)


@pytest.mark.slow  # CI's `make test-slow`; LoRA-drop's app resume (stacked, under scan) stays in the default run
def test_stacked_model_per_layer_importance_and_selection_under_scan():
    model = TinyTransformer(TinyConfig(d_model=32, n_heads=2, d_ff=64, n_layers=4))
    params = model.init(jax.random.key(0))
    tree = lv.adapt(params, lv.AdapterSpec(targets=r"layers/attn/(q|v)_proj", stacked=STACKED, r=4), 1)
    tree = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.1 * jnp.arange(1, 5.0)[:, None, None]) if isinstance(n, lv.LoraNode) else n,
                        tree, is_leaf=lambda n: isinstance(n, lv.LoraNode))
    ids = [jax.random.randint(jax.random.key(3), (2, 8), 0, 256)]
    scores = lora_drop.importance(model.apply, tree, ids, stacked=STACKED)
    assert scores["layers/attn/q_proj"].shape == (4,)
    assert abs(sum(float(v.sum()) for v in scores.values()) - 1) < 1e-6
    dropped, keep = lora_drop.select(tree, scores, threshold=0.7)
    assert 0 < sum(int(k.sum()) for k in keep.values()) < 8
    out = model.apply(dropped, ids[0])
    assert_close(out, model.apply(lv.merge(dropped), ids[0]), 2e-4)


def _six_layers():
    """A 6-layer stack of [32, 32] weights with LoRA r=8 (3,072 adapter parameters), B moved off zero."""
    ws = {"layers": {"w": jax.random.normal(jax.random.key(0), (6, 32, 32)) * 0.2}}
    tree = lv.adapt(ws, lv.AdapterSpec(targets="layers/w", stacked="layers/.*", r=8), 0)
    return jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.1) if isinstance(n, lv.LoraNode) else n, tree,
                        is_leaf=lambda n: isinstance(n, lv.LoraNode))


def _scan_apply(tree, x):
    tree = lv.resolve_shared(tree)
    node = tree["layers"]["w"]
    from lorax_variants.models.layers import run_layers

    return run_layers(lambda h, p: jnp.tanh(lv.dense(h, p["w"])), x, {"w": node}, 6, scan=True, remat="none")


def test_selection_removes_the_dropped_layers_parameters_and_keeps_the_function():
    tree = _six_layers()
    before = lv.count_params(tree).trainable
    assert before == 6 * (32 * 8 + 8 * 32) == 3072
    keep = {"layers/w": np.array([True, False, True, False, False, False])}
    dropped = lora_drop.apply_keep(tree, keep)
    per_set = 32 * 8 + 8 * 32
    assert lv.count_params(dropped).trainable == 2 * per_set + per_set  # two kept sets + one shared
    # The function: kept layers use their own adapter, the others the first dropped layer's (layer 1).
    old = tree["layers"]["w"]
    want = old.replace(lora_a=old.lora_a.at[jnp.array([3, 4, 5])].set(old.lora_a[1]),
                       lora_b=old.lora_b.at[jnp.array([3, 4, 5])].set(old.lora_b[1]))
    x = jax.random.normal(jax.random.key(5), (3, 32))
    assert_close(_scan_apply(dropped, x), _scan_apply({"layers": {"w": want}}, x), 2e-5)
    expanded = dropped["layers"]["w"].as_lora()
    np.testing.assert_allclose(expanded.lora_a, want.lora_a)
    assert_close(lv.merge(dropped)["layers"]["w"], want.merge(), 5e-6)
    # Gradients: the kept sets and the shared set each get theirs, under scan.
    trainable, frozen = lv.split(dropped)
    g = jax.grad(lambda t: jnp.sum(_scan_apply(lv.combine(t, frozen), x)))(trainable)["layers"]["w"]
    assert g.kept_a.value.shape == (2, 32, 8) and np.abs(np.asarray(g.shared_a.value)).max() > 0
    # All layers dropped: no kept sets at all.
    none_kept = lora_drop.apply_keep(tree, {"layers/w": np.zeros(6, bool)})
    assert none_kept["layers"]["w"].kept_a is None and lv.count_params(none_kept).trainable == per_set


def test_optimizer_state_follows_the_selection():
    import optax

    tree = _six_layers()
    keep = {"layers/w": np.array([False, True, False, True, True, False])}
    trainable, frozen = lv.split(tree)
    opt = optax.adam(1e-2)
    state = opt.init(trainable)
    x = jax.random.normal(jax.random.key(5), (3, 32))
    for _ in range(3):  # moments that differ per layer
        g = jax.grad(lambda t: jnp.sum(_scan_apply(lv.combine(t, frozen), x) ** 2))(trainable)
        upd, state = opt.update(g, state, trainable)
        trainable = optax.apply_updates(trainable, upd)
    new = lora_drop.apply_keep(lv.combine(trainable, frozen), keep)
    mask = lv.trainable_mask(new)
    new_trainable = lv.split(new, mask)[0]
    carried = lora_drop.carry_state(state, trainable, frozen, keep, mask)
    assert jax.tree.structure(carried) == jax.tree.structure(opt.init(new_trainable))
    mu_old, mu_new = state[0].mu["layers"]["w"], carried[0].mu["layers"]["w"]
    np.testing.assert_array_equal(mu_new.kept_a.value, np.asarray(mu_old.lora_a)[[1, 3, 4]])
    np.testing.assert_array_equal(mu_new.shared_b.value, np.asarray(mu_old.lora_b)[0])
    assert int(carried[0].count) == 3
    opt.update(jax.tree.map(jnp.ones_like, new_trainable), carried, new_trainable)  # the chain accepts it


def test_keep_mask_takes_the_threshold_as_a_share_of_the_total_at_any_scale():
    """The same layers are kept from raw scores as from their normalized shares (0.5, 0.3, 0.15, 0.05 of the
    total: a threshold of 0.75 keeps the first two)."""
    from lorax_variants.variants.lora_drop import keep_mask

    shares = {"a": np.array([0.5, 0.05]), "b": np.array([0.3, 0.15])}
    expect = {"a": np.array([True, False]), "b": np.array([True, False])}
    for scale in (1.0, 1e-6, 1e4):
        got = keep_mask({k: v * scale for k, v in shares.items()}, threshold=0.75)
        for k in expect:
            np.testing.assert_array_equal(got[k], expect[k], err_msg=f"scale {scale}, {k}")
    with pytest.raises(ValueError, match="positive sum"):
        keep_mask({"a": np.zeros(2)}, 0.9)
