"""dense/merge/merged, and the interop contract: models we did not write train through merged()."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorax_variants as lv
from lorax_variants.tree import leaves_with_paths
from tests.close import assert_close


def test_dense_plain_array_and_bad_rank():
    x = jnp.ones((2, 3))
    np.testing.assert_allclose(lv.dense(x, jnp.full((3, 4), 2.0)), np.full((2, 4), 6.0))
    with pytest.raises(ValueError, match=r"2-D weight \[in, out\], got shape \(2, 3, 4\)"):
        lv.dense(x, jnp.ones((2, 3, 4)))


def test_merge_replaces_every_node_by_its_dense_weight():
    p = {"a": jnp.ones((4, 4)), "b": [jnp.ones((4, 2))], "c": jnp.ones(3)}
    adapted = lv.adapt(p, lv.AdapterSpec(targets=r"a|b/0", r=2), 0)
    adapted = jax.tree.map(lambda x: x + 0.5, adapted)  # non-zero B
    m = lv.merge(adapted)
    assert jax.tree.structure(m) == jax.tree.structure(p)
    node = adapted["a"]
    np.testing.assert_allclose(m["a"], node.weight + node.scale * node.lora_a @ node.lora_b, rtol=1e-6)


def test_merged_refuses_dropout_keys():
    adapted = lv.adapt({"w": jnp.ones((4, 4))}, lv.AdapterSpec(targets="w", r=2, dropout=0.1), 0)
    with pytest.raises(ValueError, match=r"needs the factored path.*\['w'\]"):
        lv.merged(lambda p, x: x @ p["w"])(lv.with_dropout(adapted, jax.random.key(0)), jnp.ones((1, 4)))


def _fit(apply, adapted, x, y, steps=60):
    """Train only the adapters of `adapted` through merged(apply); return losses and trees."""
    trainable, frozen = lv.split(adapted)
    opt = optax.adam(3e-2)
    state = opt.init(trainable)
    loss_of = lambda t: jnp.mean((lv.merged(apply)(lv.combine(t, frozen), x) - y) ** 2)  # noqa: E731

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(loss_of)(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss, g

    losses, grads = [], None
    for _ in range(steps):
        trainable, state, loss, g = step(trainable, state)
        grads = grads or g
        losses.append(float(loss))
    return losses, grads, trainable, frozen


def _check_interop(apply, params, x, spec):
    y = jnp.sin(x[:, :4] * 3.0)  # a target the random base does not fit
    adapted = lv.adapt(params, spec, 1)
    base_out = apply(params, x)
    np.testing.assert_array_equal(lv.merged(apply)(adapted, x), base_out)  # B = 0 at init
    losses, grads, trainable, frozen = _fit(apply, adapted, x, y)
    assert losses[-1] < 0.5 * losses[0]
    # Gradients exist exactly on the adapter leaves; the frozen tree is the original leaves.
    grad_paths = {p for p, _ in leaves_with_paths(grads)}
    adapter_paths = {p for p, _ in leaves_with_paths(adapted) if p.endswith(("/lora_a", "/lora_b"))}
    assert grad_paths == adapter_paths
    for p, leaf in leaves_with_paths(frozen):
        original = dict(leaves_with_paths(params)).get(p.removesuffix("/weight"))
        assert original is leaf
    # The trained model, evaluated independently: the user's apply on W + s·A B per target.
    tuned = lv.combine(trainable, frozen)
    manual = jax.tree.map(
        lambda n: n.weight + n.scale * n.lora_a @ n.lora_b if isinstance(n, lv.LoraNode) else n,
        tuned,
        is_leaf=lambda n: isinstance(n, lv.LoraNode),
    )
    assert_close(lv.merged(apply)(tuned, x), apply(manual, x), 2e-5)


def test_flax_linen_model_fine_tuned_through_merged():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(32)(x))
            return nn.Dense(4)(x)

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (64, 8))
    variables = model.init(jax.random.key(1), x)
    spec = lv.AdapterSpec(targets=r"params/Dense_\d/kernel", r=4, alpha=8)
    _check_interop(model.apply, variables, x, spec)


def test_flax_nnx_model_fine_tuned_through_merged():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 32, rngs=rngs)
            self.l2 = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)

    def apply(p, x):
        st = jax.tree.map(lambda v: v, state)  # a fresh State to fill with p
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(x)

    x = jax.random.normal(jax.random.key(0), (64, 8))
    spec = lv.AdapterSpec(targets=r"l\d/kernel", r=4, alpha=8)
    _check_interop(apply, params, x, spec)


def test_dense_gradients_equal_the_matmul_rule():
    """dense's hand-written backward: dx = g Wᵀ, dW = Σ_tokens xᵀ g (numpy, float64)."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    w = jax.random.normal(jax.random.key(1), (4, 5))
    g = jax.random.normal(jax.random.key(2), (2, 3, 5))
    dx, dw = jax.grad(lambda x, w: jnp.sum(lv.dense(x, w) * g), argnums=(0, 1))(x, w)
    X, W, G = (np.asarray(v, np.float64) for v in (x, w, g))
    assert_close(dx, G @ W.T, 2e-5)
    assert_close(dw, X.reshape(6, 4).T @ G.reshape(6, 5), 2e-5)
    # bf16 activations over an fp32 weight: the weight's gradient comes back in fp32
    dw16 = jax.grad(lambda w: jnp.sum(lv.dense(x.astype(jnp.bfloat16), w).astype(jnp.float32) * g))(w)
    assert dw16.dtype == jnp.float32
    assert_close(dw16, X.reshape(6, 4).T @ G.reshape(6, 5), 0.1)
