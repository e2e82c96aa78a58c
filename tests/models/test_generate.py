"""KV-cache generation: the cache gives what recomputing the whole prefix gives, prompts of any length and
padding side continue as they would alone, stop tokens pad the rest, sampling keeps to top-k / top-p,
adapters apply factored, and a multi-task tree takes one adapter per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.models.generate import sample
from tests import hf_models as H


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    H.build("llama_gqa_untied", d)
    return hf.from_pretrained(d)


def _recompute(model, params, ids, steps):
    """Greedy by re-running the model on the whole prefix for every new token (the definition)."""
    out = np.asarray(ids)
    apply = jax.jit(model.apply)  # one program per prefix length (op-by-op dispatch is far slower)
    for _ in range(steps):
        logits = np.asarray(apply(params, jnp.asarray(out)))
        out = np.concatenate([out, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return out


def test_cache_equals_recompute_and_rows_continue_as_alone(llama):
    model, params = llama
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 96, n) for n in (7, 3, 5)]
    alone = [_recompute(model, params, p[None], 6)[0, len(p):] for p in prompts]
    for side in ("left", "right"):
        ids, mask = np.zeros((3, 7), np.int64), np.zeros((3, 7), np.int64)
        for i, p in enumerate(prompts):
            sl = slice(7 - len(p), 7) if side == "left" else slice(0, len(p))
            ids[i, sl], mask[i, sl] = p, 1
        out = np.asarray(model.generate(params, ids, attention_mask=mask, max_new_tokens=6))
        for i, p in enumerate(prompts):
            np.testing.assert_array_equal(out[i, :7][-len(p):], p)  # left-aligned prompt
            np.testing.assert_array_equal(out[i, 7:], alone[i], err_msg=f"row {i}, {side} padded")


def test_stop_tokens_end_rows_and_pad_after(llama):
    model, params = llama
    ids = jnp.asarray(np.random.default_rng(1).integers(2, 96, (2, 5)))
    free = np.asarray(model.generate(params, ids, max_new_tokens=8))
    stop = int(free[0, 7])  # row 0 emits this at its third new token
    out = np.asarray(model.generate(params, ids, max_new_tokens=8, stop_tokens=[stop, 95], pad_token_id=1))
    np.testing.assert_array_equal(out[0, :8], free[0, :8])
    assert (out[0, 8:] == 1).all()
    j = next((k for k in range(5, 13) if free[1, k] in (stop, 95)), 13)
    np.testing.assert_array_equal(out[1, : j + 1], free[1, : j + 1])


def test_sampling_keeps_to_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.split(jax.random.key(0), 3)
    greedy = sample(logits, keys[0])
    assert (np.asarray(greedy) == 0).all()
    k2 = np.asarray(sample(logits, keys[1], temperature=1.0, top_k=2))
    assert set(k2.tolist()) == {0, 1}  # only the two largest, both seen
    p = np.asarray(sample(logits, keys[2], temperature=1.0, top_p=0.7))
    assert set(p.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.7; 0.15 and 0.05 never drawn
    assert abs((p == 0).mean() - 0.5 / 0.8) < 0.07  # renormalized over what is kept
    assert (np.asarray(sample(logits, keys[2], temperature=1.0, top_p=0.4)) == 0).all()


def test_adapters_apply_factored_and_multitask_routes_per_row(llama):
    model, params = llama
    ids = jnp.asarray(np.random.default_rng(2).integers(2, 96, (3, 5)))
    spec = lv.AdapterSpec(targets=r"layers/attn/(q|v)_proj", stacked=model.stacked, r=4, variant="dora")
    dora = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.3) if isinstance(n, lv.DoraNode) else n,
                        lv.adapt(params, spec, 0), is_leaf=lambda n: isinstance(n, lv.DoraNode))
    np.testing.assert_array_equal(model.generate(dora, ids, max_new_tokens=5),
                                  model.generate(lv.merge(dora), ids, max_new_tokens=5))
    multi = lv.adapt(params, lv.AdapterSpec(targets=r"layers/attn/(q|v)_proj", stacked=model.stacked, r=4,
                                            variant="multitask", settings=lv.MultiTask(n_tasks=2)), 0)
    multi = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + jnp.asarray([0.0, 0.4])[:, None, None])
                         if isinstance(n, lv.MultiTaskNode) else n, multi, is_leaf=lambda n: isinstance(n, lv.MultiTaskNode))
    mixed = np.asarray(model.generate(multi, ids, max_new_tokens=5, task_ids=[1, 0, lv.BASE]))
    for row, task in enumerate([1, 0, lv.BASE]):
        alone = params if task == lv.BASE else lv.select(multi, task)
        np.testing.assert_array_equal(mixed[row], np.asarray(model.generate(alone, ids[row:row + 1], max_new_tokens=5))[0])
    assert not np.array_equal(mixed[0, 5:], np.asarray(model.generate(params, ids[:1], max_new_tokens=5))[0, 5:])


@pytest.mark.parametrize("impl", ["gather", "ragged"])
def test_many_adapters_generate_per_row_as_each_alone(llama, impl):
    """Rows given out of adapter order (ragged needs them grouped: generate orders them and restores the order)."""
    model, params = llama
    ids = jnp.asarray(np.random.default_rng(3).integers(2, 96, (4, 5)))
    specs = {"a": lv.AdapterSpec(r"layers/attn/(q|v)_proj", stacked=model.stacked, r=4),
             "b": lv.AdapterSpec(r"layers/(attn|mlp)/\w+_proj", stacked=model.stacked, r=2, variant="dora")}
    tree = lv.adapters(params, specs, 0, impl=impl)
    trainable, frozen = lv.split(tree)
    tree = lv.combine(jax.tree.map(lambda x: x + 0.3, trainable), frozen)
    routes = [1, lv.BASE, 0, 1]
    mixed = np.asarray(model.generate(tree, ids, max_new_tokens=5, task_ids=routes))
    for row, k in enumerate(routes):
        alone = params if k == lv.BASE else lv.pick(tree, "ab"[k])
        np.testing.assert_array_equal(mixed[row], np.asarray(model.generate(alone, ids[row:row + 1], max_new_tokens=5))[0])
    assert not np.array_equal(mixed[0, 5:], mixed[2, 5:]) or not np.array_equal(ids[0], ids[2])
