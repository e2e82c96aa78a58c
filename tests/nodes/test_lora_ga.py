"""LoRA-GA (PEFT ``init_lora_weights="lora_ga"``): on the same tiny Llama and batches, the averaged weight
gradients, the adapters (up to each SVD component's sign) and the moved base weights equal PEFT's for every
direction and scale; the adapted model starts equal to the base; the PEFT export (converted to plain LoRA on
the original base) gives our logits in PEFT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import lorax_variants as lv
from lorax_variants.hf import from_pretrained, save_peft
from tests import hf_models as H
from tests.close import assert_close

TARGETS = ["q_proj", "v_proj", "down_proj"]  # [32, 32], [32, 16], [64, 32]: q = min(4r, in, out) is exact at r=8
OURS = {"q_proj": "layers/attn/q_proj", "v_proj": "layers/attn/v_proj", "down_proj": "layers/mlp/down_proj"}
BATCHES = [np.random.default_rng(i).integers(2, 96, (2, 10)) for i in range(3)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    H.build("llama_gqa_untied", d)
    return d, *from_pretrained(d)


def _peft(d, direction, scale):
    import peft
    from peft.tuners.lora.loraga import preprocess_loraga

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_pretrained(d)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scale))

    def train_step():
        for ids in BATCHES:
            ids = torch.as_tensor(ids)
            model(input_ids=ids, labels=ids).loss.backward()

    preprocess_loraga(model, config, train_step)
    grads = {name: m._peft_loraga_grad.numpy().copy() for name, m in model.named_modules()
             if hasattr(m, "_peft_loraga_grad")}
    return peft.get_peft_model(model, config).eval(), grads


def _loss(model):
    def loss(tree, ids):  # transformers' causal LM loss: the mean next-token cross-entropy
        logits = model.apply(tree, ids)[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

    return loss


def _ours(model, params, settings):
    spec = lv.AdapterSpec(targets="|".join(OURS.values()), stacked=model.stacked, r=8, alpha=16)
    tree = lv.adapt(params, spec, 0)
    grads = lv.weight_gradients(_loss(model), tree, [jnp.asarray(b) for b in BATCHES])
    return lv.lora_ga(tree, grads, settings), grads


@pytest.mark.parametrize("direction, scale", [("ArB2r", "stable"), pytest.param("A2rBr", "weight_svd", marks=pytest.mark.slow),
                                              pytest.param("ArBr", "unit", marks=pytest.mark.slow),
                                              pytest.param("ArBr", "gd_scale", marks=pytest.mark.slow)])
def test_gradients_adapters_and_moved_base_equal_peft(base, direction, scale):
    d, model, params = base
    pm, their_grads = _peft(d, direction, scale)
    tree, grads = _ours(model, params, lv.LoraGa(direction=direction, scale=scale))
    nodes = dict(lv.leaves_with_paths(tree, nodes_are_leaves=True))
    for name, module in pm.base_model.model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in OURS or not hasattr(module, "lora_A"):
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        n = nodes[OURS[short]]
        g_theirs = their_grads[name.removeprefix("base_model.model.")]
        assert_close(np.asarray(grads[OURS[short]][layer]).T, g_theirs, 1e-5, err_msg=f"gradient {name}")
        a_t = module.lora_A["default"].weight.detach().numpy()  # [r, in]
        b_t = module.lora_B["default"].weight.detach().numpy()  # [out, r]
        a, b = np.asarray(n.lora_a[layer]).T, np.asarray(n.lora_b[layer]).T
        # Each SVD component is defined up to its sign (ours canonical, torch's from its random test matrix); A's
        # and B's columns come from different components, so each gets its own sign.
        sa, sb = np.sign(np.sum(a * a_t, axis=1)), np.sign(np.sum(b * b_t, axis=0))
        assert (sa != 0).all() and (sb != 0).all()
        # weight_svd: PEFT estimates sigma_1(W) with a randomized rank-r SVD (off by up to ~0.5% here); ours is
        # exact: B's first column has norm sigma_1 (U's columns are unit vectors)
        tol = 1e-2 if scale == "weight_svd" else 1e-4
        if scale == "weight_svd":
            w0 = np.asarray(params["layers"][OURS[short].split("/")[1]][short][layer], np.float64)
            assert abs(np.linalg.norm(b[:, 0]) / np.linalg.svd(w0, compute_uv=False)[0] - 1) < 1e-5
        assert_close(a * sa[:, None], a_t, 1e-4, err_msg=f"A {name}")
        assert_close(b * sb[None, :], b_t, tol, err_msg=f"B {name}")
        # the moved base W - s B A: ours, and with PEFT's signs exactly PEFT's
        s = n.scale
        w = np.asarray(n.weight[layer]).T.astype(np.float64)
        assert_close(w + s * (b @ a) - s * ((b * sb) @ (a * sa[:, None])), module.base_layer.weight.detach().numpy(),
                     tol if scale == "weight_svd" else 1e-5, err_msg=f"moved base {name}")
        w0 = np.asarray(params["layers"][OURS[short].split("/")[1]][short][layer]).T
        assert_close(w, w0 - s * (b @ a), 1e-5, err_msg=f"our moved base {name}")
    ids = jnp.asarray(BATCHES[0])
    assert_close(np.asarray(model.apply(tree, ids)), np.asarray(model.apply(params, ids)), 1e-5)  # starts as W
    assert_close(np.asarray(model.apply(tree, ids)), H.torch_out(pm, BATCHES[0]), 1e-4)


def test_peft_export_converted_to_lora_on_the_original_base(base, tmp_path):
    import peft

    d, model, params = base
    tree, _ = _ours(model, params, lv.LoraGa())
    trained = jax.tree.map(lambda x: x, tree)
    t, f = lv.split(trained)
    t = jax.tree.map(lambda x: x + 0.03 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), t)  # "trained"
    trained = lv.combine(t, f)
    save_peft(tmp_path / "a", model, trained, initial=tree)
    pm = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(d), tmp_path / "a").eval()
    ids = BATCHES[1]
    assert_close(H.torch_out(pm, ids), np.asarray(model.apply(trained, jnp.asarray(ids))), 1e-4)


def test_refusals_name_the_problem(base):
    d, model, params = base
    spec = lv.AdapterSpec(targets=OURS["v_proj"], stacked=model.stacked, r=9)
    tree = lv.adapt(params, spec, 0)
    grads = {OURS["v_proj"]: jnp.zeros(params["layers"]["attn"]["v_proj"].shape)}
    with pytest.raises(ValueError, match="2r = 18 directions of a \\[32, 16\\] gradient"):
        lv.lora_ga(tree, grads)
    with pytest.raises(ValueError, match="no gradient for"):
        lv.lora_ga(tree, {})
    q = lv.quantize(lv.adapt(params, lv.AdapterSpec(targets=OURS["q_proj"], stacked=model.stacked, r=4), 0),
                    lv.QuantSpec(kind="nf4", block_size=32, targets=OURS["q_proj"], stacked=model.stacked))
    with pytest.raises(ValueError, match="full-precision"):
        lv.weight_gradients(_loss(model), q, [jnp.asarray(BATCHES[0])])
    with pytest.raises(ValueError, match="LoraGa.direction"):
        lv.LoraGa(direction="BA")
