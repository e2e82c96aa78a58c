"""Mixture-of-experts: every variant on the expert banks (factored equals merged, QLoRA too), no dense pass
of every expert over every token, the router trainable, expert-parallel sharding, refused options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_variants as lv
from lorax_variants.models.moe import MoeConfig, moe_mlp
from tests.close import assert_close
from tests.env import xla_env

E, D, F = 6, 32, 24
CFG = MoeConfig(num_experts=E, top_k=2, intermediate_size=F, normalize=True, tile=4)
BANKS = "(gate|up|down)_proj"


def _params(key=0):
    k = jax.random.split(jax.random.key(key), 4)
    return {"router": jax.random.normal(k[0], (D, E)) * 0.5,
            "gate_proj": jax.random.normal(k[1], (E, D, F)) * 0.2, "up_proj": jax.random.normal(k[2], (E, D, F)) * 0.2,
            "down_proj": jax.random.normal(k[3], (E, F, D)) * 0.2}


def _dense_reference(x, p):
    """Every token through its top-k experts, one token at a time in numpy (the definition)."""
    x, p = np.asarray(x, np.float64).reshape(-1, D), {k: np.asarray(v, np.float64) for k, v in p.items()}
    logits = x @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for n in range(len(x)):
        top = np.argsort(-probs[n])[:2]
        w = probs[n, top] / probs[n, top].sum()
        for e, wt in zip(top, w):
            g = x[n] @ p["gate_proj"][e]
            out[n] += wt * ((g / (1 + np.exp(-g))) * (x[n] @ p["up_proj"][e])) @ p["down_proj"][e]
    return out


def test_moe_block_equals_the_per_token_definition():
    p = _params()
    x = jax.random.normal(jax.random.key(9), (3, 7, D))
    ours = moe_mlp(x, p, jax.nn.silu, CFG)
    assert_close(np.asarray(ours).reshape(-1, D), _dense_reference(x, p), 2e-4)


def _dots(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _dots(sub)


def test_no_dense_pass_of_every_expert_over_every_token():
    """Forward and backward: every matmul that touches an expert weight takes one expert's [in, out] slice
    (a tile of that expert's rows), never a whole bank; the row count of the tiles is N·k plus padding."""
    tree = lv.adapt(_params(), lv.AdapterSpec(targets=BANKS, stacked=BANKS, r=2), 0)
    trainable, frozen = lv.split(tree)
    x = jax.random.normal(jax.random.key(9), (2, 16, D))
    loss = lambda t, f: jnp.sum(moe_mlp(x, lv.combine(t, f), jax.nn.silu, CFG) ** 2)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(trainable, frozen).jaxpr
    shapes = [tuple(v.aval.shape) for eqn in _dots(jaxpr) for v in eqn.invars]
    assert shapes and not any(len(s) >= 3 and s[0] == E for s in shapes), shapes  # no [E, ...] bank operand
    assert CFG.tile in {s[0] for s in shapes}  # a tile of one expert's rows meets one expert's weights
    assert not any(2 * 16 * CFG.top_k in s for s in shapes)  # never all N·k rows at once


VARIANTS = [v for v in lv.variant_names() if v != "multitask"]


@pytest.mark.parametrize("variant", [pytest.param(v, marks=() if v in ("lora", "qlora") else pytest.mark.slow)
                                     for v in VARIANTS + ["qlora"]])
def test_every_variant_on_the_expert_banks_factored_equals_merged(variant):
    p = _params()
    if variant == "qlora":
        p = lv.quantize(p, lv.QuantSpec(targets=BANKS, stacked=BANKS, block_size=8))
    spec = lv.AdapterSpec(targets=BANKS, stacked=BANKS, r=3, variant="lora" if variant == "qlora" else variant,
                          settings={"dylora": lv.DyLora(r_min=2), "qalora": lv.QaLora(group_size=4)}.get(variant))
    trainable, frozen = lv.split(lv.adapt(p, spec, 0))
    tree = lv.combine(jax.tree.map(lambda v: v + 0.05, trainable), frozen)
    if variant == "dylora":
        tree = lv.with_rank(tree, 2)
    node = tree["gate_proj"]
    assert node.shape == (E, D, F)
    x = jax.random.normal(jax.random.key(9), (2, 5, D))
    factored = moe_mlp(x, lv.resolve_shared(tree), jax.nn.silu, CFG)
    assert_close(factored, moe_mlp(x, lv.merge(tree), jax.nn.silu, CFG), 2e-4)
    # Gradients reach each expert's own adapter only where the expert saw tokens.
    t, f = lv.split(tree)
    g = jax.grad(lambda t: jnp.sum(moe_mlp(x, lv.resolve_shared(lv.combine(t, f)), jax.nn.silu, CFG) ** 2))(t)
    assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(g))


def test_multitask_on_expert_banks_is_refused():
    tree = lv.adapt(_params(), lv.AdapterSpec(targets=BANKS, stacked=BANKS, r=2, variant="multitask", settings=lv.MultiTask(n_tasks=2)), 0)
    with pytest.raises(ValueError, match="per-example adapter routing"):
        moe_mlp(jnp.ones((1, 3, D)), lv.route(tree, [0]), jax.nn.silu, CFG)
    many = lv.adapters(_params(), {"a": lv.AdapterSpec(targets=BANKS, stacked=BANKS, r=2),
                                   "b": lv.AdapterSpec(targets=BANKS, stacked=BANKS, r=4)}, 0)
    with pytest.raises(ValueError, match="per-example adapter routing"):
        moe_mlp(jnp.ones((1, 3, D)), lv.route(many, [1]), jax.nn.silu, CFG)


def test_router_trains_through_split_extra():
    p = _params()
    tree = lv.adapt(p, lv.AdapterSpec(targets=BANKS, stacked=BANKS, r=2), 0)
    trainable, frozen = lv.split(tree, extra="router")
    assert trainable["router"] is not None and lv.count_params(tree, extra="router").trainable == (
        lv.count_params(tree).trainable + D * E)
    x = jax.random.normal(jax.random.key(9), (2, 5, D))
    g = jax.grad(lambda t: jnp.sum(moe_mlp(x, lv.combine(t, frozen), jax.nn.silu, CFG) ** 2))(trainable)
    assert float(jnp.max(jnp.abs(g["router"]))) > 0


SHARDED = r"""
import json, jax, jax.numpy as jnp, numpy as np
import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.sharding import make_mesh, tree_shardings
model, params = hf.from_pretrained(DIR)
tree = lv.adapt(params, lv.AdapterSpec(targets=r"layers/moe/\w+_proj", stacked=model.stacked, r=2), 0)
tree = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.05) if isinstance(n, lv.LoraNode) else n, tree,
                    is_leaf=lambda n: isinstance(n, lv.LoraNode))
ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (8, 6)))
single = np.asarray(jax.jit(model.apply)(tree, ids))
mesh = make_mesh(1, 4, 2)
sh = tree_shardings(tree, mesh)
placed = jax.device_put(tree, sh)
spread = np.asarray(jax.jit(model.apply)(placed, ids))
bank = placed["layers"]["moe"]["gate_proj"]
print(json.dumps({"diff": float(np.abs(single - spread).max()), "weight": str(bank.weight.sharding.spec),
                  "a": str(bank.lora_a.sharding.spec), "b": str(bank.lora_b.sharding.spec),
                  "per_device": bank.weight.addressable_shards[0].data.shape}))
"""


def test_expert_banks_shard_their_expert_axis_and_compute_the_same(tmp_path):
    from tests import hf_models as H

    H.build("qwen3_moe", tmp_path)
    env = xla_env(8, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", SHARDED.replace("DIR", repr(str(tmp_path)))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["diff"] < 1e-5
    assert out["weight"] == "P(None, 'fsdp', None, 'tensor')"  # [L, E, d, f]: experts over fsdp
    assert out["a"] == "P(None, 'fsdp', None, None)" and out["b"] == "P(None, 'fsdp', None, 'tensor')"
    assert out["per_device"] == [2, 1, 32, 16]  # 4 experts over fsdp 4, the 32-wide ffn over tensor 2


@pytest.mark.parametrize("field, value, match", [
    ("mlp_only_layers", [1], "mlp_only_layers"), ("decoder_sparse_step", 2, "decoder_sparse_step"),
    ("output_router_logits", True, "output_router_logits"),
])
def test_options_we_do_not_implement_are_refused_by_name(field, value, match):
    import transformers as T

    from lorax_variants import hf

    cfg = T.Qwen3MoeConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=4,
                           num_experts_per_tok=2, **{field: value})
    with pytest.raises(ValueError, match=match):
        hf.from_config(cfg)
