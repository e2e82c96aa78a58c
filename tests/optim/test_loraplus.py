import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.variants.loraplus import loraplus, loraplus_labels
from tests import hf_models as H


def _ours_path(name: str) -> str:
    """PEFT parameter name -> our leaf path (layer index dropped: stacked)."""
    name = re.sub(r"^base_model\.model\.", "", name)
    rules = [
        (r"model\.embed_tokens\.lora_embedding_([AB])\.default", lambda m: f"embed/lora_{m[1].lower()}"),
        (r"model\.embed_tokens\.lora_magnitude_vector\.default\.weight", lambda m: "embed/magnitude"),
        (r"model\.layers\.\d+\.self_attn\.(\w+)\.lora_([AB])\.default\.weight", lambda m: f"layers/attn/{m[1]}/lora_{m[2].lower()}"),
        (r"model\.layers\.\d+\.self_attn\.(\w+)\.lora_magnitude_vector\.default\.weight", lambda m: f"layers/attn/{m[1]}/magnitude"),
        (r"model\.layers\.\d+\.self_attn\.(\w+)\.base_layer\.bias", lambda m: f"layers/attn/{m[1]}_bias"),
        (r"model\.norm\.weight", lambda m: "final_norm"),
        (r"lm_head(\.modules_to_save\.default)?\.weight", lambda m: "lm_head"),
    ]
    for pattern, fn in rules:
        m = re.fullmatch(pattern, name)
        if m:
            return fn(m)
    raise AssertionError(f"unmapped PEFT parameter {name}")


def test_groups_equal_peft_create_loraplus_optimizer(tmp_path):
    H.build("qwen2_bias", tmp_path)  # tied head; we untie nothing: lm_head is trained as modules_to_save
    torch_model = __import__("transformers").Qwen2ForCausalLM.from_pretrained(tmp_path)
    torch_model.config.tie_word_embeddings = False
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True)
    pm = peft.get_peft_model(torch_model, cfg)
    for name, p in pm.named_parameters():
        if name.endswith(("model.norm.weight", "q_proj.base_layer.bias")):
            p.requires_grad_(True)
    pm.base_model.model.lm_head = torch.nn.Linear(32, 96, bias=False)  # a trained 2-D head
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1)
    names = {id(p): n for n, p in pm.named_parameters()}
    peft_groups = {}
    for group, label in zip(opt.param_groups, ["A", "embedding", "B", "B_no_decay"]):
        for p in group["params"]:
            peft_groups[_ours_path(names[id(p)])] = label

    model, params = hf.from_pretrained(tmp_path)
    params["lm_head"] = jnp.zeros((32, 96))
    spec = lv.AdapterSpec(targets=r"embed|layers/attn/(q|v)_proj", stacked=model.stacked, r=4, variant="dora")
    trainable, _ = lv.split(lv.adapt(params, spec, 0), extra=[r"final_norm", r"lm_head", r"layers/attn/q_proj_bias"])
    ours = dict(lv.leaves_with_paths(loraplus_labels(trainable, stacked=model.stacked)))
    assert ours == peft_groups


def test_b_moves_ratio_times_faster_with_sgd_and_schedules_work():
    tree = lv.adapt({"w": jnp.ones((8, 8))}, lv.AdapterSpec(targets="w", r=2), 0)
    trainable, frozen = lv.split(tree)
    grads = jax.tree.map(jnp.ones_like, trainable)
    for lr in (0.01, optax.constant_schedule(0.01)):
        tx = loraplus(optax.sgd, lr, trainable, ratio=16.0)
        updates, _ = tx.update(grads, tx.init(trainable), trainable)
        np.testing.assert_allclose(updates["w"].lora_a, -0.01)
        np.testing.assert_allclose(updates["w"].lora_b, -0.16)
    with pytest.raises(ValueError, match="ratio must be positive"):
        loraplus(optax.sgd, 0.1, trainable, ratio=0)
