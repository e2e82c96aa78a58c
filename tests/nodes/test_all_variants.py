"""Claims every variant makes: factored without d x k, composes over a quantized base, counts."""

import re

import jax
import jax.numpy as jnp
import pytest

import lorax_variants as lv
from lorax_variants.registry import is_factored
from tests.close import assert_close

D_IN, D_OUT = 128, 80
VARIANTS = [v for v in lv.variant_names()]


def _adapted(variant, quantized=False):
    w = jax.random.normal(jax.random.key(0), (D_IN, D_OUT))
    tree = {"w": w}
    if quantized:
        tree = lv.quantize(tree, lv.QuantSpec(targets="w"))
    settings = {"multitask": lv.MultiTask(n_tasks=2), "dylora": lv.DyLora(r_min=2), "qalora": lv.QaLora(group_size=64)}
    spec = lv.AdapterSpec(targets="w", r=4, variant=variant, settings=settings.get(variant))
    trainable, frozen = lv.split(lv.adapt(tree, spec, 0))
    tree = lv.combine(jax.tree.map(lambda x: x + 0.05, trainable), frozen)  # move every trainable leaf off init
    if variant == "multitask":
        tree = lv.route(tree, [0, 1, 1])
    if variant == "dylora":
        tree = lv.with_rank(tree, 3)
    return tree


@pytest.mark.parametrize("variant", [v for v in VARIANTS if is_factored(v)])
def test_forward_and_backward_never_form_a_weight_sized_intermediate(variant):
    tree = _adapted(variant)
    trainable, frozen = lv.split(tree)
    x = jax.random.normal(jax.random.key(1), (3, 5, D_IN))
    loss = lambda t, f: jnp.sum(jnp.tanh(lv.dense(x, lv.resolve_shared(lv.combine(t, f))["w"])))  # noqa: E731
    hlo = jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen).compile().as_text()
    producers = re.findall(rf"= f32\[(?:{D_IN},{D_OUT}|{D_OUT},{D_IN})\]\S* ([\w-]+)\(", hlo)
    assert set(producers) <= {"parameter"}, producers


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not is_factored(v)])
def test_a_variant_that_says_it_is_not_factored_forms_weight_sized_temporaries(variant):
    """The declaration is true (a variant cannot claim it by mistake and skip the test above)."""
    trainable, frozen = lv.split(_adapted(variant))
    x = jax.random.normal(jax.random.key(1), (3, 5, D_IN))
    loss = lambda t, f: jnp.sum(jnp.tanh(lv.dense(x, lv.resolve_shared(lv.combine(t, f))["w"])))  # noqa: E731
    hlo = jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen).compile().as_text()
    producers = re.findall(rf"= f32\[(?:{D_IN},{D_OUT}|{D_OUT},{D_IN})\]\S* ([\w-]+)\(", hlo)
    assert set(producers) - {"parameter"}, producers


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("multitask", "dora")])
def test_factored_gradients_equal_autodiff_of_the_merged_weight(variant):
    """The hand-written backward of the factored apply (``nodes.factored.low_rank``) against plain
    autodiff of ``x @ merge(node)``: every trainable leaf and the input. (DoRA's factored
    backward treats the norm as a constant, as the paper; its own test checks that.)"""
    trainable, frozen = lv.split(_adapted(variant))
    x = jax.random.normal(jax.random.key(1), (3, 5, D_IN))
    g = jax.random.normal(jax.random.key(2), (3, 5, D_OUT))
    tree = lambda t: lv.resolve_shared(lv.combine(t, frozen))  # noqa: E731
    factored = jax.grad(lambda t, x: jnp.sum(lv.dense(x, tree(t)["w"]) * g), argnums=(0, 1))(trainable, x)
    merged = jax.grad(lambda t, x: jnp.sum((x @ lv.merge(tree(t))["w"]) * g), argnums=(0, 1))(trainable, x)
    for ours, ref in zip(jax.tree.leaves(factored), jax.tree.leaves(merged)):
        assert_close(ours, ref, 2e-4)
    assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(factored[0]))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "multitask"])
def test_over_a_quantized_base_factored_equals_merged(variant):
    tree = _adapted(variant, quantized=True)
    node = lv.resolve_shared(tree)["w"]
    assert isinstance(node.weight, lv.QuantizedNode)
    x = jax.random.normal(jax.random.key(1), (3, D_IN))
    assert_close(lv.dense(x, node), x @ lv.merge(tree)["w"], 2e-4)
    assert lv.count_params(tree) == lv.count_params(_adapted(variant))  # a quantized base counts as its weights
    t, _ = lv.split(tree)
    assert all(not isinstance(x, lv.QuantizedNode) for x in jax.tree.leaves(t, is_leaf=lambda n: isinstance(n, lv.Node)))


def test_multitask_over_a_quantized_base_equals_each_adapter():
    tree = _adapted("multitask", quantized=True)
    x = jax.random.normal(jax.random.key(1), (3, D_IN))
    out = lv.dense(x, tree["w"])
    for e, k in enumerate([0, 1, 1]):
        assert_close(out[e], x[e] @ lv.merge(lv.select(tree, k))["w"], 2e-4)


def test_parameter_counts_follow_each_formula():
    r, n = 4, D_IN * D_OUT
    expect = {"lora": r * (D_IN + D_OUT), "lora_fa": r * D_OUT, "dora": r * (D_IN + D_OUT) + D_OUT,
              "vera": r + D_OUT, "adalora": r * (D_IN + D_OUT) + r, "dylora": r * (D_IN + D_OUT),
              "sora": r * (D_IN + D_OUT) + r, "multitask": 2 * r * (D_IN + D_OUT),
              "qalora": r * (D_IN // 64 + D_OUT), "hira": r * (D_IN + D_OUT), "miss": r * D_OUT,
              "shira": r * (D_IN + D_OUT)}  # (SHiRA's mask indices are integers, no parameters)
    frozen_extra = {"lora_fa": D_IN * r, "vera": D_IN * r + r * D_OUT, "dora": D_OUT}  # A; projections; ‖W‖²
    assert set(expect) == set(VARIANTS)
    for v, k in expect.items():
        assert lv.count_params(_adapted(v)) == lv.ParamCount(trainable=k, frozen=n + frozen_extra.get(v, 0)), v
