"""``load_peft`` over what PEFT itself writes: a matrix of adapter configs built in PEFT (random non-zero
adapters), loaded here and compared with PEFT's logits (fp32, 1e-4), then exported back with ``save_peft``
and loaded by ``peft.PeftModel.from_pretrained`` on a fresh base: the same logits again. Configs we cannot
represent are refused naming the field. AdaLoRA adapters come from PEFT's own ``update_and_allocate`` loop
at every stage of its rank schedule."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import lorax_variants as lv
from lorax_variants.hf import from_pretrained, load_peft, save_peft
from lorax_variants.variants.vera import vera_projections
from tests import hf_models as H
from tests.close import assert_close

MODELS = ("llama_gqa_untied", "qwen2_bias", "gpt2", "llama3_rope_tied_bias", "qwen3_windows", "gemma3", "gemma2_softcap",
          "qwen3_moe", "mixtral")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = {}
    for name in MODELS:
        d = tmp_path_factory.mktemp(name)
        H.build(name, d)
        out[name] = (d, *from_pretrained(d))
    return out


def _lora(**kw):
    import peft

    return peft.LoraConfig(r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), **kw)


def _cfg(kind, **kw):
    import peft

    return getattr(peft, kind)(**kw)


# name -> (base model, PEFT config factory, save_pretrained kwargs factory or None, init for the raw export)
CASES = {
    "list": ("llama_gqa_untied", lambda: _lora(target_modules=["q_proj", "v_proj"]), None),
    "regex": ("llama_gqa_untied", lambda: _lora(target_modules=r".*\.(k_proj|down_proj)"), None),
    "all_linear": ("llama_gqa_untied", lambda: _lora(target_modules="all-linear"), None),
    "layers_to_transform": ("llama_gqa_untied", lambda: _lora(target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                                                              layers_pattern="layers"), None),
    "rank_alpha_pattern": ("llama_gqa_untied", lambda: _lora(target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={
        "q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6}, alpha_pattern={"v_proj": 3, "o_proj": 16}), None),
    "rslora": ("llama_gqa_untied", lambda: _lora(target_modules=["q_proj", "v_proj"], use_rslora=True,
                                                 rank_pattern={"v_proj": 8}), None),
    "modules_to_save": ("llama_gqa_untied", lambda: _lora(target_modules=["q_proj"], modules_to_save=["lm_head"]), None),
    # PEFT unties a tied head it saves whole: loaded as a head of its own (lm_head)
    "modules_to_save_tied": ("llama3_rope_tied_bias", lambda: _lora(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                             None),
    "gemma3_modules_to_save_tied": ("gemma3", lambda: _lora(target_modules=["v_proj"], modules_to_save=["lm_head"]), None),
    "bias_all": ("qwen2_bias", lambda: _lora(target_modules=["q_proj", "o_proj"], bias="all"), None),
    "bias_lora_only": ("qwen2_bias", lambda: _lora(target_modules=["q_proj", "o_proj"], bias="lora_only"), None),
    "gpt2_fan_in_fan_out": ("gpt2", lambda: _lora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                                  bias="lora_only"), None),
    "dora": ("llama_gqa_untied", lambda: _lora(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), None),
    "dora_embedding": ("llama_gqa_untied", lambda: _lora(target_modules=["embed_tokens", "q_proj"], use_dora=True), None),
    "pissa": ("qwen2_bias", lambda: _lora(target_modules=["q_proj", "up_proj"], init_lora_weights="pissa"), None),
    "pissa_converted": ("qwen2_bias", lambda: _lora(target_modules=["q_proj", "up_proj"], init_lora_weights="pissa"),
                        "convert"),
    "olora": ("llama_gqa_untied", lambda: _lora(target_modules=["q_proj", "up_proj"], init_lora_weights="olora"), None),
    "olora_converted": ("llama_gqa_untied", lambda: _lora(target_modules=["q_proj", "up_proj"],
                                                          init_lora_weights="olora"), "convert"),
    "trainable_tokens_tied": ("llama3_rope_tied_bias", lambda: _lora(target_modules=["q_proj"],
                                                                     trainable_token_indices=[3, 5, 17]), None),
    "trainable_tokens": ("llama_gqa_untied", lambda: _lora(target_modules=["v_proj"], trainable_token_indices=[2, 9]), None),
    "qwen3": ("qwen3_windows", lambda: _lora(target_modules="all-linear"), None),
    "gemma3_dora": ("gemma3", lambda: _lora(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), None),
    "gemma2": ("gemma2_softcap", lambda: _lora(target_modules=["q_proj", "o_proj", "gate_proj"]), None),
    "qwen3_moe_attention": ("qwen3_moe", lambda: _lora(target_modules=["q_proj", "k_proj"]), None),
    # the formats of registered codecs (HiRA, MiSS, SHiRA)
    "hira": ("llama_gqa_untied", lambda: _cfg("HiraConfig", r=4, target_modules=["q_proj", "v_proj", "down_proj"]), None),
    "hira_gpt2": ("gpt2", lambda: _cfg("HiraConfig", r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), None),
    "miss": ("qwen3_windows", lambda: _cfg("MissConfig", r=4, target_modules=["q_proj", "up_proj"]), None),
    "miss_bat": ("llama_gqa_untied", lambda: _cfg("MissConfig", r=4, init_weights="bat",
                                                  target_modules=["q_proj", "o_proj"]), None),
    "miss_mini": ("llama_gqa_untied", lambda: _cfg("MissConfig", r=4, init_weights="mini", mini_r=4,
                                                   target_modules=["q_proj", "down_proj"]), None),
    "shira": ("llama_gqa_untied", lambda: _cfg("ShiraConfig", r=1, random_seed=3, target_modules=["q_proj", "v_proj"]),
              None),
    "shira_gemma3": ("gemma3", lambda: _cfg("ShiraConfig", r=2, target_modules=["k_proj", "gate_proj"]), None),
}
DEFAULT = ("list", "qwen3", "rank_alpha_pattern", "bias_lora_only", "gpt2_fan_in_fan_out", "dora_embedding", "pissa",
           "olora_converted", "trainable_tokens_tied", "modules_to_save_tied", "hira", "miss_bat", "shira")
IDS = np.random.default_rng(0).integers(2, 96, (2, 9))


def _peft_model(bases, base, config):
    import peft

    torch.manual_seed(0)
    pm = peft.get_peft_model(T.AutoModelForCausalLM.from_pretrained(bases[base][0]), config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:  # adapters, magnitudes, saved modules, biases, token rows: all moved
                p.add_(0.05 * torch.randn_like(p))
    return pm.eval()


def _save(pm, bases, base, out, how, config):
    if how == "convert":  # PEFT's conversion of a PiSSA/OLoRA adapter to plain LoRA on the original base
        import peft

        init_dir = out.parent / (out.name + "_init")
        torch.manual_seed(0)
        init = peft.get_peft_model(T.AutoModelForCausalLM.from_pretrained(bases[base][0]), config())
        init.peft_config["default"].init_lora_weights = True  # as PEFT's docs: save the initial adapter so
        init.save_pretrained(init_dir)
        pm.save_pretrained(out, path_initial_model_for_weight_conversion=init_dir)
    else:
        pm.save_pretrained(out)


def _round_trip(bases, base, out, tree, want, init=None):
    """Export ``tree`` with save_peft and load it in PEFT on a fresh base: ``want`` again."""
    import peft

    d, model, params = bases[base]
    save_peft(out, model, tree, base=params, init=init)
    back = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(d), out).eval()
    assert_close(H.torch_out(back, IDS), want, 5e-4)


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in DEFAULT else pytest.mark.slow) for c in CASES])
def test_peft_writes_it_we_load_it_and_export_it_back(bases, case, tmp_path):
    base, config, how = CASES[case]
    pm = _peft_model(bases, base, config())
    want = H.torch_out(pm, IDS)
    _save(pm, bases, base, tmp_path / "theirs", how, config)
    d, model, params = bases[base]
    tree = load_peft(tmp_path / "theirs", model, params)
    assert_close(np.asarray(model.apply(tree, jnp.asarray(IDS))), want, 5e-4)
    init = getattr(pm.peft_config["default"], "init_lora_weights", None) if how is None else None
    _round_trip(bases, base, tmp_path / "ours", tree, want, init=init if init in ("pissa", "olora") else None)


def test_untied_head_merges_into_a_model_transformers_loads_untied(bases, tmp_path):
    """A tied model whose head PEFT saved whole: the merged export writes lm_head.weight and an untied config, and
    transformers' logits of it equal PEFT's of the adapter."""
    from lorax_variants.hf import save_merged

    pm = _peft_model(bases, "llama3_rope_tied_bias", CASES["modules_to_save_tied"][1]())
    want = H.torch_out(pm, IDS)
    pm.save_pretrained(tmp_path / "theirs")
    d, model, params = bases["llama3_rope_tied_bias"]
    tree = load_peft(tmp_path / "theirs", model, params)
    assert "lm_head" in tree and "lm_head" not in params
    save_merged(tmp_path / "merged", model, tree)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(H.torch_out(back, IDS), want, 5e-4)
    model2, params2 = from_pretrained(tmp_path / "merged")  # and we read it back untied
    assert not model2.config.tie_word_embeddings and "lm_head" in params2
    assert_close(np.asarray(model2.apply(params2, jnp.asarray(IDS))), want, 5e-4)


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_with_and_without_saved_projections(bases, tmp_path, save_projection):
    import peft

    pm = _peft_model(bases, "llama_gqa_untied", peft.VeraConfig(r=16, target_modules=["q_proj", "down_proj"],
                                                                save_projection=save_projection, projection_prng_key=7))
    want = H.torch_out(pm, IDS)
    pm.save_pretrained(tmp_path / "theirs")
    d, model, params = bases["llama_gqa_untied"]
    tree = load_peft(tmp_path / "theirs", model, params)
    assert_close(np.asarray(model.apply(tree, jnp.asarray(IDS))), want, 5e-4)
    _round_trip(bases, "llama_gqa_untied", tmp_path / "ours", tree, want)


def test_vera_projections_equal_torch_generator_draws():
    from peft.tuners.vera.model import _kaiming_init

    for seed, (r, d_in, d_out) in [(0, (16, 4096, 1024)), (2**33 + 5, (3, 7, 11))]:
        g = torch.Generator().manual_seed(seed)
        a, b = _kaiming_init((r, d_in), generator=g), _kaiming_init((d_out, r), generator=g)
        ours_a, ours_b = vera_projections(r, d_in, d_out, seed)
        np.testing.assert_array_equal(ours_a, a.numpy().T)
        np.testing.assert_array_equal(ours_b, b.numpy().T)


def _adalora_stages(bases, tmp_path):
    """A PEFT AdaLoRA model trained with its own update_and_allocate loop, saved at each stage."""
    import peft

    d = bases["llama_gqa_untied"][0]
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=10, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "down_proj"])
    pm = peft.get_peft_model(T.AutoModelForCausalLM.from_pretrained(d), cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    ids = torch.as_tensor(np.random.default_rng(1).integers(2, 96, (4, 12)))
    stages = {}
    for step in range(10):
        pm.train()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
        if step in (0, 4, 7, 9):  # before any allocation, pruning, the final budget, after it
            out = tmp_path / f"step{step}"
            pm.save_pretrained(out)
            stages[step] = (out, H.torch_out(pm.eval(), IDS))
    return stages


def test_adalora_trained_by_peft_at_every_stage_of_its_schedule(bases, tmp_path):
    stages = _adalora_stages(bases, tmp_path)
    d, model, params = bases["llama_gqa_untied"]
    cfgs = {s: json.loads((out / "adapter_config.json").read_text()) for s, (out, _) in stages.items()}
    assert cfgs[0]["rank_pattern"] is None and cfgs[9]["rank_pattern"]  # the stages PEFT went through
    assert all(not k.endswith(".default") for k in cfgs[9]["rank_pattern"])
    for step, (out, want) in stages.items():
        tree = load_peft(out, model, params)
        assert_close(np.asarray(model.apply(tree, jnp.asarray(IDS))), want, 5e-4, err_msg=f"step {step}")
        if step == 9:
            kept = sum(int(np.asarray(n.rank_mask).sum()) for _, n in lv.leaves_with_paths(tree, nodes_are_leaves=True)
                       if isinstance(n, lv.AdaLoraNode))
            assert kept == 2 * 3 * 2  # target_r x modules x layers
            _round_trip(bases, "llama_gqa_untied", tmp_path / "ours", tree, want)


REFUSALS = {
    "init_lora_weights": lambda c: c | {"init_lora_weights": "pissa_niter_4"},
    "lora_bias": lambda c: c | {"lora_bias": True},
    "layer_replication": lambda c: c | {"layer_replication": [[0, 2], [1, 2]]},
    "target_parameters": lambda c: c | {"target_parameters": ["experts.gate_up_proj"]},
    "future_switch": lambda c: c | {"future_switch": 3},
    "peft_type": lambda c: c | {"peft_type": "LOHA"},
}


def test_what_we_cannot_represent_is_refused_naming_the_field(bases, tmp_path):
    pm = _peft_model(bases, "llama_gqa_untied", _lora(target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "ok")
    d, model, params = bases["llama_gqa_untied"]
    for field, edit in REFUSALS.items():
        bad = tmp_path / field
        shutil.copytree(tmp_path / "ok", bad)
        cfg = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps(edit(cfg)))
        with pytest.raises(ValueError, match=field):
            load_peft(bad, model, params)
    # A tensor we cannot place is named, not dropped.
    from safetensors.numpy import load_file, save_file

    extra = tmp_path / "extra"
    shutil.copytree(tmp_path / "ok", extra)
    tensors = load_file(extra / "adapter_model.safetensors") | {"base_model.model.model.mystery.weight": np.ones(3, np.float32)}
    save_file(tensors, extra / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="mystery"):
        load_peft(extra, model, params)
    # A registered codec's format refuses what its variant cannot hold, naming the field and the file.
    hira = _peft_model(bases, "llama_gqa_untied", _cfg("HiraConfig", r=4, target_modules=["q_proj"]))
    hira.save_pretrained(tmp_path / "hira")
    for field, value in (("rank_pattern", {"q_proj": 2}), ("init_weights", "pissa"), ("hira_future", 1)):
        cfg = json.loads((tmp_path / "hira" / "adapter_config.json").read_text())
        shutil.copytree(tmp_path / "hira", tmp_path / f"hira_{field}")
        (tmp_path / f"hira_{field}" / "adapter_config.json").write_text(json.dumps(cfg | {field: value}))
        with pytest.raises(ValueError, match=f"adapter_config.json: {field}"):
            load_peft(tmp_path / f"hira_{field}", model, params)


def test_hot_swapping_an_adapter_does_not_recompile_the_train_step_or_generate(bases, tmp_path):
    """Two PEFT adapters of other ranks and alphas, loaded ``like=`` the running tree: the jitted train step
    and ``generate`` run them from the cache (one compiled entry each), with each adapter's own logits."""
    import jax
    import optax
    from jax import random
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lorax_variants.models.generate import _generate
    from lorax_variants.sharding import make_mesh, state_shardings, tree_shardings
    from train.step import make_steps

    d, model, params = bases["llama_gqa_untied"]
    running = lv.adapt(params, lv.AdapterSpec(targets=r"layers/attn/(q_proj|v_proj)", stacked=model.stacked, r=8,
                                              alpha=16), 0)
    mesh = make_mesh(1, 1, 1)
    mask = lv.trainable_mask(running)
    tr_sh, fr_sh = lv.split(tree_shardings(running, mesh), mask)
    opt = optax.adam(1e-3)

    def split_state(tree):  # copies: the step donates its trainable and optimizer-state arguments
        trainable, frozen = lv.split(tree, mask)
        trainable = jax.tree.map(jnp.copy, trainable)
        return trainable, frozen, opt.init(trainable)

    trainable, frozen, state = split_state(running)
    opt_sh = state_shardings(jax.eval_shape(opt.init, trainable), trainable, tr_sh, NamedSharding(mesh, P()))
    fns = make_steps(model, "causal_lm", opt, mesh=mesh, trainable_sh=tr_sh, frozen_sh=fr_sh, opt_sh=opt_sh)
    ids = jnp.asarray(IDS[None])
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
    fns.train(trainable, frozen, state, batch, jnp.int32(0), random.key(0))
    model.generate(running, IDS[:, :4], max_new_tokens=3)
    compiled = (fns.train._cache_size(), _generate._cache_size())
    for i, (r, alpha) in enumerate([(4, 32), (2, 5)]):  # other ranks and scales than the running tree's
        pm = _peft_model(bases, "llama_gqa_untied", _lora(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
        pm.save_pretrained(tmp_path / f"a{i}")
        swapped = load_peft(tmp_path / f"a{i}", model, params, like=running)
        assert_close(np.asarray(model.apply(swapped, jnp.asarray(IDS))), H.torch_out(pm, IDS), 5e-4)
        fns.train(*split_state(swapped), batch, jnp.int32(1), random.key(0))
        model.generate(swapped, IDS[:, :4], max_new_tokens=3)
        assert (fns.train._cache_size(), _generate._cache_size()) == compiled, f"adapter {i} recompiled"
    with pytest.raises(ValueError, match="rank 16, more than the 8"):
        pm = _peft_model(bases, "llama_gqa_untied", _lora(r=16, target_modules=["q_proj", "v_proj"]))
        pm.save_pretrained(tmp_path / "big")
        load_peft(tmp_path / "big", model, params, like=running)



@pytest.mark.parametrize("base", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_expert_bank_adapters_in_peft_target_parameters_form(bases, base, tmp_path):
    """PEFT's LoRA on the fused expert parameters (``target_parameters``) loads as LoRA on our gate/up/down
    banks and exports back; our own bank LoRAs (gate and up apart, other scales) export to that form."""
    pm = _peft_model(bases, base, _lora(r=2, lora_alpha=4, target_modules=["q_proj"], rank_pattern={"gate_up_proj": 3},
                                        alpha_pattern={"down_proj": 7},
                                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    want = H.torch_out(pm, IDS)
    pm.save_pretrained(tmp_path / "theirs")
    d, model, params = bases[base]
    tree = load_peft(tmp_path / "theirs", model, params)
    assert tree["layers"]["moe"]["gate_proj"].lora_a.shape[-1] == 3 and tree["layers"]["moe"]["down_proj"].scale == 3.5
    assert_close(np.asarray(model.apply(tree, jnp.asarray(IDS))), want, 5e-4)
    _round_trip(bases, base, tmp_path / "back", tree, want)
    # Ours: LoRA on the three banks, gate and up with their own ranks and scales.
    spec = lv.AdapterSpec(targets=r"layers/moe/\w+_proj", stacked=model.stacked, r=2, alpha=4,
                          rank_pattern={"layers/moe/up_proj": 3}, alpha_pattern={"layers/moe/gate_proj": 10})
    ours = lv.adapt(params, spec, 1)
    ours = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.05) if isinstance(n, lv.LoraNode) else n, ours,
                        is_leaf=lambda n: isinstance(n, lv.LoraNode))
    import peft

    save_peft(tmp_path / "ours", model, ours)
    back = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(d), tmp_path / "ours").eval()
    assert_close(H.torch_out(back, IDS), np.asarray(model.apply(ours, jnp.asarray(IDS))), 5e-4)
    dora = lv.adapt(params, lv.AdapterSpec(targets=r"layers/moe/\w+_proj", stacked=model.stacked, r=2, variant="dora"), 1)
    with pytest.raises(ValueError, match="layers/moe/down_proj: PEFT holds expert-bank adapters as LoRA only"):
        save_peft(tmp_path / "dora", model, dora)


class _UnfusedExperts(torch.nn.ModuleList):
    """transformers' stacked experts as one ``nn.Linear`` per expert and projection (``<e>.gate_proj``; the model
    vLLM and PEFT see per-expert LoRA on), computing what the stacked module computes."""

    def __init__(self, fused, names):
        super().__init__()
        E, f2, _ = fused.gate_up_proj.shape
        f = f2 // 2
        self.names = names
        object.__setattr__(self, "act_fn", fused.act_fn)  # not an item of the list
        for e in range(E):
            m = torch.nn.Module()
            for name, w in zip(names, (fused.gate_up_proj[e, :f], fused.gate_up_proj[e, f:], fused.down_proj[e])):
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data.copy_(w)
                setattr(m, name, lin)
            self.append(m)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        g, u, dn = self.names
        out = torch.zeros_like(hidden_states)
        for e, ex in enumerate(self):
            token, pos = torch.where(top_k_index == e)
            if token.numel():
                x = hidden_states[token]
                y = getattr(ex, dn)(self.act_fn(getattr(ex, g)(x)) * getattr(ex, u)(x))
                out.index_add_(0, token, y * top_k_weights[token, pos, None])
        return out


def _unfused(d, arch):
    """A transformers MoE model with per-expert Linear modules under the checkpoint's names (Mixtral:
    ``block_sparse_moe.experts.<e>.w1``; Qwen3-MoE: ``mlp.experts.<e>.gate_proj``)."""
    hf = T.AutoModelForCausalLM.from_pretrained(d).eval()
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for layer in hf.model.layers:
        moe = layer.mlp
        moe.experts = _UnfusedExperts(moe.experts, names)
        if arch == "mixtral":  # registered as block_sparse_moe; the layer's forward still calls self.mlp
            del layer.mlp
            layer.block_sparse_moe = moe
            object.__setattr__(layer, "mlp", moe)
    hf.config.model_type += "_unfused"  # not the model PEFT converts per-expert adapters for (transformers 5's fused one)
    return hf


@pytest.mark.slow  # ~16 s a case (CI's `make test-slow`); the fused form's test above runs by default
@pytest.mark.parametrize("base", ["qwen3_moe", "mixtral"])
def test_per_expert_adapters_vllms_layout_load_in_peft_on_an_unfused_model(bases, base, tmp_path):
    """``save_peft(experts="per_expert")``: one LoRA module per layer, expert and projection (vLLM's MoE LoRA
    keys). PEFT loads it on the same model with per-expert Linear modules, with our logits; its deltas equal
    the fused form's; PEFT's own conversion of per-expert adapters for transformers 5's fused experts loads it on
    the standard model with our logits too; both forms read back to the same model."""
    import peft

    d, model, params = bases[base]
    spec = lv.AdapterSpec(targets=r"layers/(attn/q_proj|moe/\w+_proj)", stacked=model.stacked, r=2, alpha=4,
                          rank_pattern={"layers/moe/up_proj": 3}, alpha_pattern={"layers/moe/gate_proj": 10})
    tree = lv.adapt(params, spec, 1)
    tree = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.05) if isinstance(n, lv.LoraNode) else n, tree,
                        is_leaf=lambda n: isinstance(n, lv.LoraNode))
    ours = np.asarray(model.apply(tree, jnp.asarray(IDS)))
    save_peft(tmp_path / "per_expert", model, tree, experts="per_expert")
    unfused = _unfused(d, base)
    assert_close(H.torch_out(unfused, IDS), np.asarray(model.apply(params, jnp.asarray(IDS))), 1e-5)  # the same model
    back = peft.PeftModel.from_pretrained(unfused, tmp_path / "per_expert").eval()
    assert_close(H.torch_out(back, IDS), ours, 5e-4)
    moe = "block_sparse_moe" if base == "mixtral" else "mlp"
    gate = "w1" if base == "mixtral" else "gate_proj"
    assert f"base_model.model.model.layers.1.{moe}.experts.3.{gate}" in dict(back.named_modules())
    # PEFT's conversion of per-expert adapters for transformers 5's fused experts (one rank and alpha for all: it
    # drops per-module rank_pattern/alpha_pattern entries of the experts, which the unfused model above honours)
    uniform = lv.adapt(params, lv.AdapterSpec(targets=spec.targets, stacked=model.stacked, r=2, alpha=4), 1)
    uniform = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.05) if isinstance(n, lv.LoraNode) else n, uniform,
                           is_leaf=lambda n: isinstance(n, lv.LoraNode))
    save_peft(tmp_path / "uniform", model, uniform, experts="per_expert")
    converted = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(d), tmp_path / "uniform").eval()
    assert_close(H.torch_out(converted, IDS), np.asarray(model.apply(uniform, jnp.asarray(IDS))), 5e-4)
    # the per-expert deltas equal the fused form's: both merged by PEFT (target_parameters on transformers'
    # stacked experts; per-expert Linear modules), expert by expert
    save_peft(tmp_path / "fused", model, tree)
    fused = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(d), tmp_path / "fused").eval()
    merged_fused, merged_per = fused.merge_and_unload(), back.merge_and_unload()
    g, u, dn = ("w1", "w3", "w2") if base == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    with torch.no_grad():
        for lf, lp in zip(merged_fused.model.layers, merged_per.model.layers):
            for e, m in enumerate(getattr(lp, moe).experts):
                gu = torch.cat([getattr(m, g).weight, getattr(m, u).weight])
                assert_close(gu.numpy(), lf.mlp.experts.gate_up_proj[e].numpy(), 1e-6)
                assert_close(getattr(m, dn).weight.numpy(), lf.mlp.experts.down_proj[e].numpy(), 1e-6)
    for form in ("per_expert", "fused"):
        assert_close(np.asarray(model.apply(load_peft(tmp_path / form, model, params), jnp.asarray(IDS))), ours, 1e-5)
    with pytest.raises(ValueError, match="experts='stacked'; expected one of"):
        save_peft(tmp_path / "bad", model, tree, experts="stacked")
    dora = lv.adapt(params, lv.AdapterSpec(targets=r"layers/moe/\w+_proj", stacked=model.stacked, r=2, variant="dora"), 1)
    with pytest.raises(ValueError, match="layers/moe/down_proj: PEFT holds expert-bank adapters as LoRA only"):
        save_peft(tmp_path / "dora", model, dora, experts="per_expert")
