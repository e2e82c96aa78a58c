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


SHARDED = r"""
import json, jax, jax.numpy as jnp
import lorax_variants as lv
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer
from lorax_variants.sharding import make_mesh, tree_shardings
model = TinyTransformer(TinyConfig(d_model=32, n_heads=2, d_ff=64, n_layers=2))
params = model.init(jax.random.key(0))
proj = r"layers/(attn|mlp)/\w+_proj"
ids = jax.random.randint(jax.random.key(2), (8, 8), 0, 256)
mesh = make_mesh(2, 2, 2)
ids8 = jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
loss = lambda t, f, ids: jnp.mean(model.apply(lv.combine(t, f), ids) ** 2)
out = {}
for name, spec in CASES.items():
    tree = lv.adapt(params, lv.AdapterSpec(proj, stacked=STACKED, **spec), 1)
    if name == "lora_ga":  # the init itself on sharded weights and a sharded batch
        lm = lambda tree, ids: jnp.mean(model.apply(tree, ids) ** 2)
        one = lv.lora_ga(tree, lv.weight_gradients(lm, tree, [ids]))
        placed = jax.device_put(tree, tree_shardings(tree, mesh))
        eight = lv.lora_ga(placed, lv.weight_gradients(lm, placed, [ids8]))
        out[name + "_init"] = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in
                                  zip(jax.tree.leaves(one), jax.tree.leaves(eight)) if a.dtype == jnp.float32)
        tree = one
    t, f = lv.split(tree)
    t = jax.tree.map(lambda x: x + 0.05 if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
    step = jax.jit(jax.value_and_grad(loss))
    l1, g1 = step(t, f, ids)
    tsh, fsh = lv.split(tree_shardings(lv.combine(t, f), mesh), lv.trainable_mask(tree))
    l8, g8 = step(jax.device_put(t, tsh), jax.device_put(f, fsh), ids8)
    out[name] = [abs(float(l1) - float(l8)) / abs(float(l1)),
                 max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)))]
print(json.dumps(out))
"""


# Under slow (CI's `make test-slow`); sharded training's equality runs by default in tests/train/test_sharded.py
@pytest.mark.parametrize("which", [pytest.param("shira", marks=pytest.mark.slow), pytest.param("all", marks=pytest.mark.slow)])
def test_new_variants_sharded_over_data_fsdp_tensor_equal_one_device(which):
    """HiRA, MiSS (bat), SHiRA and a LoRA-GA init on 8 simulated devices (data x fsdp x tensor, their
    leaves sharded by the same rules as every node's): the one-device loss and gradients; the LoRA-GA init from
    sharded weights and batch equals the one-device init."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.env import xla_env

    cases = {"hira": {"variant": "hira", "r": 4},  # MiSS's default block [r, out] is sharded as HiRA's B
             "miss_bat": {"variant": "miss", "r": 4, "settings": "lv.Miss(mode='bat')"},
             "shira": {"variant": "shira", "r": 1}, "lora_ga": {"r": 4}}
    if which != "all":  # the default run: SHiRA (integer index leaves beside its values); the rest under slow
        cases = {which: cases[which]}
    text = "{" + ", ".join(f"{k!r}: dict({', '.join(f'{a}={v}' if a == 'settings' else f'{a}={v!r}' for a, v in c.items())})"
                           for k, c in cases.items()) + "}"
    env = xla_env(8, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", SHARDED.replace("CASES.items()", f"({text}).items()")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("lora_ga_init", 0.0) < 1e-4, out
    for name, (loss, grads) in out.items():
        assert loss < 1e-6 and grads < 1e-5, (name, loss, grads)
    assert sorted(out) == sorted(cases)
