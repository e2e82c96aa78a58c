"""The app's train step with many adapters: over an accumulated batch (2 micro-batches, rows of every adapter
in both, some rows routed to none), each adapter's gradient equals training it alone on its rows with a mean
loss (computed here with the library on that adapter's rows only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_variants as lv
from lorax_variants import recipes
from lorax_variants.hf import from_pretrained
from lorax_variants.models.loss import token_cross_entropy
from lorax_variants.sharding import make_mesh, tree_shardings
from tests.close import assert_trees_close
from train.step import make_steps


@pytest.mark.slow  # the node-level equality runs by default (tests/nodes/test_multi.py)
def test_each_adapters_step_gradient_equals_training_it_alone(assets):
    model, params = from_pretrained(assets["llama"])
    proj = r"layers/(attn|mlp)/\w+_proj"
    specs = {"a": lv.AdapterSpec(proj, stacked=model.stacked, r=2), "b": lv.AdapterSpec(
        proj, stacked=model.stacked, r=4, variant="dora"), "c": lv.AdapterSpec(r"layers/attn/q_proj", stacked=model.stacked, r=3)}
    tree = lv.adapters(params, specs, 0)
    trainable, frozen = lv.split(tree)
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # off the zero B init
    mesh = make_mesh(1, 1, 1)
    sgd = optax.sgd(1.0)  # the update is minus the gradient
    trainable_sh, frozen_sh = lv.split(tree_shardings(tree, mesh), lv.trainable_mask(tree))
    fns = make_steps(model, "causal_lm", sgd, mesh=mesh, trainable_sh=trainable_sh, frozen_sh=frozen_sh, opt_sh=None,
                     variant=recipes.recipe("many"), n_tasks=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (2, 5, 10)).astype(np.int32)
    attention = np.ones_like(ids)
    attention[0, 1, 7:] = 0  # a padded row: fewer tokens for its adapter
    loss_mask = np.ones_like(ids)
    routes = np.array([[0, 0, 1, 2, -1], [0, 1, 1, 1, 2]], np.int32)
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "task_ids": routes}
    copy = jax.tree.map(jnp.copy, trainable)  # the step donates its inputs
    new, _, _, metrics = fns.train(copy, frozen, sgd.init(copy), batch, 0, jax.random.key(0))
    grads = jax.tree.map(lambda old, n: old - n, trainable, new)
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    for k, name in enumerate(specs):
        rows = np.flatnonzero(flat["task_ids"] == k)
        t_k, f_k = lv.split(lv.pick(lv.combine(trainable, frozen), name))

        def alone(t):
            p = lv.combine(t, f_k)
            x = jnp.asarray(flat["input_ids"][rows])
            mask = jnp.asarray(flat["attention_mask"][rows])
            h = model.hidden(p, x, mask)
            ce, _ = token_cross_entropy(model, p, h[:, :-1], x[:, 1:])
            keep = (mask[:, 1:] * jnp.asarray(flat["loss_mask"][rows])[:, 1:]).astype(jnp.float32)
            return jnp.sum(ce * keep) / jnp.sum(keep)

        ref = jax.grad(alone)(t_k)
        ours = lv.split(lv.pick(lv.combine(grads, frozen), name))[0]
        got = dict(lv.leaves_with_paths(ours))
        paths = [path for path, _ in lv.leaves_with_paths(ref)]
        assert_trees_close([got[path] for path in paths], [g for _, g in lv.leaves_with_paths(ref)], 2e-4,
                           err_msg=f"{name}: {paths}")
    assert np.isfinite(float(metrics["loss"]))
