"""Export to transformers (merged) and PEFT (adapters) for every variant; import back from PEFT.

Each case: a tiny random Llama and GPT-2 built with transformers, adapted, its adapter leaves moved
away from their initial values (a stand-in for training: B = 0 at init would hide a wrong export),
exported both ways, loaded with transformers / peft.PeftModel (torch CPU), logits compared to ours.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as T

import lorax_variants as lv
from lorax_variants.hf import from_pretrained, load_peft, save_merged, save_peft
from lorax_variants.variants.dylora import with_rank
from lorax_variants.variants.lora_drop import apply_keep
from tests import hf_models as H
from tests.close import assert_close

TARGETS = {"llama_gqa_untied": r"layers/(attn|mlp)/(q_proj|v_proj|down_proj)", "gpt2": r"layers/(attn|mlp)/(c_attn|c_fc)"}
VARIANTS = {
    "lora": {}, "rslora": {"rslora": True}, "lora_fa": {"variant": "lora_fa"}, "pissa": {"init": "pissa"},
    "dora": {"variant": "dora"}, "vera": {"variant": "vera", "r": 8}, "adalora": {"variant": "adalora"},
    "dylora": {"variant": "dylora"}, "sora": {"variant": "sora"}, "lora_drop": {}, "multitask": {"variant": "multitask", "settings": lv.MultiTask(n_tasks=2)},
    "qlora": {}, "qalora": {"variant": "qalora", "settings": lv.QaLora(group_size=16)},
    "hira": {"variant": "hira"}, "miss": {"variant": "miss"},
    "miss_bat": {"variant": "miss", "settings": lv.Miss(mode="bat")},
    "miss_mini": {"variant": "miss", "settings": lv.Miss(mode="mini", mini_r=4)},
    "shira": {"variant": "shira", "r": 1, "settings": lv.Shira(random_seed=7)},
}


@pytest.fixture(scope="module", params=list(TARGETS))
def base(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    H.build(request.param, d)
    model, params = from_pretrained(d)
    return request.param, d, model, params


def _perturb(tree, key, scale=0.05):
    trainable, frozen = lv.split(tree)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    moved = [x + scale * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
             for x, k in zip(leaves, keys)]
    return lv.combine(jax.tree.unflatten(treedef, moved), frozen)


def _adapted(name, model, params, variant):
    kw = dict(VARIANTS[variant])
    if variant == "qlora":
        params = lv.quantize(params, lv.QuantSpec(kind="nf4", block_size=32, targets=TARGETS[name], stacked=model.stacked))
    spec = lv.AdapterSpec(targets=TARGETS[name], stacked=model.stacked, r=kw.pop("r", 4), alpha=8, **kw)
    tree = lv.adapt(params, spec, jax.random.key(1))
    initial = tree
    tree = _perturb(tree, jax.random.key(2))
    nodes = dict(lv.leaves_with_paths(tree, nodes_are_leaves=True))
    if variant == "adalora":  # pruned triplets: some False in every mask
        tree = lv.map_with_paths(lambda p, n: n.replace(rank_mask=n.rank_mask.at[..., 1].set(False).at[0, 3].set(False))
                                 if isinstance(n, lv.AdaLoraNode) else n, tree, nodes_are_leaves=True)
    if variant == "sora":  # gates driven to zero by the proximal step
        tree = lv.map_with_paths(lambda p, n: n.replace(gate=n.gate.at[..., 0].set(0.0).at[1, 2].set(0.0))
                                 if isinstance(n, lv.SoraNode) else n, tree, nodes_are_leaves=True)
    if variant == "lora_drop":
        keep = {p: np.array([True, False]) for p, n in nodes.items() if isinstance(n, lv.LoraNode)}
        keep[next(iter(keep))] = np.array([False, False])
        tree = _perturb(apply_keep(tree, keep), jax.random.key(3))
    return tree, initial


def _ours(model, tree, variant, ids):
    if variant == "dylora":
        tree = with_rank(tree, 2)
    if variant == "multitask":
        tree = lv.select(tree, 1)
    return np.asarray(model.apply(tree, jnp.asarray(ids)))


IDS = np.random.default_rng(0).integers(0, 96, (2, 9))
LINEAR_ONLY = ("miss", "shira")  # PEFT formats without a Conv1D layer (GPT-2's projections)


# The default run exports one variant per PEFT format and the ones that reduce to LoRA in their own way; the rest
# (more of the same writers) under slow, CI's `make test-slow`.
DEFAULT = ("lora", "pissa", "dora", "vera", "adalora", "qlora", "hira", "miss", "shira", "dylora", "sora")


@pytest.mark.parametrize("variant", [v if v in DEFAULT else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS])
def test_peft_and_merged_exports_give_our_logits(base, variant, tmp_path):
    import peft

    name, hf_dir, model, params = base
    tree, initial = _adapted(name, model, params, variant)
    ours = _ours(model, tree, variant, IDS)
    kw = {"rank": 2} if variant == "dylora" else {}
    if name == "gpt2" and variant.startswith(LINEAR_ONLY):  # PEFT's MiSS and SHiRA layers wrap nn.Linear only
        with pytest.raises(ValueError, match="layers wrap nn.Linear only, not GPT-2's Conv1D"):
            save_peft(tmp_path / "peft", model, tree)
        return _merged_gives_ours(tmp_path, model, tree, hf_dir, ours)
    save_peft(tmp_path / "peft", model, tree, initial=initial if variant == "pissa" else None, base_model=str(hf_dir), **kw)
    adapter_dir = tmp_path / "peft" / ("task_1" if variant == "multitask" else "")
    torch_base = T.AutoModelForCausalLM.from_pretrained(hf_dir)
    pm = peft.PeftModel.from_pretrained(torch_base, adapter_dir).eval()
    theirs = H.torch_out(pm, IDS)
    if variant == "qlora":  # PEFT's base is the original weights; ours the NF4 ones: compare to ours on them
        ours_fp = np.asarray(model.apply(_requant_free(tree, params), jnp.asarray(IDS)))
        assert_close(theirs, ours_fp, 5e-4)
    else:
        assert_close(theirs, ours, 5e-4)
    _merged_gives_ours(tmp_path, model, tree, hf_dir, ours, **kw, **({"task": 1} if variant == "multitask" else {}))


def _merged_gives_ours(tmp_path, model, tree, hf_dir, ours, **kw):
    save_merged(tmp_path / "merged", model, tree, tokenizer_from=hf_dir, **kw)
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(H.torch_out(merged, IDS), ours, 5e-4)


def _requant_free(tree, params):
    """``tree`` with each quantized base replaced by the original weight (what PEFT's base holds)."""
    flat = dict(lv.leaves_with_paths(params, nodes_are_leaves=True))
    return lv.map_with_paths(lambda p, n: n.replace(weight=flat[p]) if isinstance(n, lv.LoraNode) else n, tree,
                             nodes_are_leaves=True)


def test_delta_lora_exports_merged_and_refuses_peft(base, tmp_path):
    name, hf_dir, model, params = base
    tree = _perturb(lv.adapt(params, lv.AdapterSpec(targets=TARGETS[name], stacked=model.stacked, r=4), jax.random.key(1)),
                    jax.random.key(2))
    tree = lv.variants.delta_lora.delta_lora_update(tree, lv.adapt(params, lv.AdapterSpec(targets=TARGETS[name], stacked=model.stacked,
                                                                            r=4), jax.random.key(1)), tree, 5)
    with pytest.raises(ValueError, match="export the merged model instead"):
        save_peft(tmp_path / "p", model, tree, variant="delta_lora")
    assert not (tmp_path / "p").exists()
    save_merged(tmp_path / "m", model, tree)
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert_close(H.torch_out(merged, IDS), np.asarray(model.apply(tree, jnp.asarray(IDS))), 5e-4)


@pytest.mark.parametrize("variant", ["lora", "dora", "vera", "adalora", "hira", "miss_bat", "shira"])
def test_import_from_peft_and_byte_stable_round_trip(base, variant, tmp_path):
    name, hf_dir, model, params = base
    tree, _ = _adapted(name, model, params, variant)
    if name == "gpt2" and variant.startswith(LINEAR_ONLY):
        with pytest.raises(ValueError, match="layers wrap nn.Linear only"):
            save_peft(tmp_path / "a", model, tree)
        return
    save_peft(tmp_path / "a", model, tree)
    back = load_peft(tmp_path / "a", model, params)
    assert_close(np.asarray(model.apply(back, jnp.asarray(IDS))), _ours(model, tree, variant, IDS), 5e-5)
    save_peft(tmp_path / "b", model, back)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_refusals_name_the_problem(base, tmp_path, tmp_path_factory):
    name, hf_dir, model, params = base
    tree, _ = _adapted(name, model, params, "lora")
    save_peft(tmp_path / "a", model, tree)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_peft(tmp_path / "a", model, tree)
    save_peft(tmp_path / "a", model, tree, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directory left behind
    other = "gpt2" if name != "gpt2" else "llama_gqa_untied"
    d = tmp_path_factory.mktemp("other")
    H.build(other, d)
    other_model, other_params = from_pretrained(d)
    with pytest.raises(ValueError, match="does not have|do not fit"):
        load_peft(tmp_path / "a", other_model, other_params)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4


def test_merged_export_shards_large_models_with_an_index(base, tmp_path):
    name, hf_dir, model, params = base
    tree, _ = _adapted(name, model, params, "lora")
    save_merged(tmp_path / "m", model, tree, max_shard_bytes=20_000, tokenizer_from=hf_dir)
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert_close(H.torch_out(merged, IDS), _ours(model, tree, "lora", IDS), 5e-4)
    _, back = from_pretrained(tmp_path / "m")  # and our own loader reads the sharded export
    assert_close(np.asarray(model.apply(back, jnp.asarray(IDS))), _ours(model, tree, "lora", IDS), 5e-5)
