"""EVA (PEFT ``init_lora_weights="eva"``): on the same tiny Llama and batches (padding masked out), the ranks
PEFT redistributes and the A it sets (each layer's leading input components) equal ours; the incremental PCA
equals numpy's PCA of all rows where it keeps every component; B = 0 and the base unchanged."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import lorax_variants as lv
from lorax_variants.hf import from_pretrained
from lorax_variants.variants.eva import IncrementalPCA
from tests import hf_models as H
from tests.close import assert_close

# every input is 32 wide: PEFT's randomized PCA step (q = 4r = 32) is exact there, as ours
TARGETS = {"q_proj": "layers/attn/q_proj", "k_proj": "layers/attn/k_proj", "v_proj": "layers/attn/v_proj",
           "o_proj": "layers/attn/o_proj", "up_proj": "layers/mlp/up_proj", "gate_proj": "layers/mlp/gate_proj"}


def _batches():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(4):
        ids = rng.integers(2, 96, (8, 16))
        mask = np.ones_like(ids)
        mask[1, 12:] = 0  # right padding: those tokens' inputs are left out
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    H.build("llama_gqa_untied", d)
    return d, *from_pretrained(d)


def test_ranks_and_components_equal_peft(base):
    import peft

    d, model, params = base
    settings = lv.Eva(rho=2.0, tau=0.9)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), init_lora_weights="eva",
                             eva_config=peft.EvaConfig(rho=settings.rho, tau=settings.tau))
    pm = peft.get_peft_model(T.AutoModelForCausalLM.from_pretrained(d), config)
    batches = _batches()
    peft.initialize_lora_eva_weights(pm, [{k: torch.as_tensor(v) for k, v in b.items()} for b in batches],
                                     show_progress_bar=False)
    spec = lv.AdapterSpec(targets="|".join(TARGETS.values()), stacked=model.stacked, r=8, alpha=16)
    tree = lv.eva(lv.adapt(params, spec, 0), lambda t, b: model.apply(t, jnp.asarray(b["input_ids"]),
                                                                      jnp.asarray(b["attention_mask"])),
                  batches, mask=lambda b: b["attention_mask"], settings=settings)
    nodes = dict(lv.leaves_with_paths(tree, nodes_are_leaves=True))
    ranks, budget = [], 0
    for name, module in pm.base_model.model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in TARGETS or ".layers." not in name:
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        n = nodes[TARGETS[short]]
        budget += 8
        a_ours = np.asarray(n.lora_a[layer]).T  # [width, in]
        if not hasattr(module, "lora_A"):  # PEFT dropped a rank-0 layer's adapter
            rank = 0
        else:
            a_t = module.lora_A["default"].weight.detach().numpy()
            rank = a_t.shape[0]
            assert_close(a_ours[:rank], a_t, 1e-4, err_msg=f"A {name}")
            assert module.scaling["default"] == pytest.approx(n.scale)  # alpha follows the rank: alpha / r stays
        assert not np.any(a_ours[rank:]), name  # the rest of the path's width is zero: exactly rank `rank`
        assert not np.any(np.asarray(n.lora_b[layer])), name
        ranks.append(rank)
    assert sum(ranks) == budget and len(set(ranks)) > 1, ranks  # redistributed, the budget kept
    for path in TARGETS.values():
        np.testing.assert_array_equal(np.asarray(nodes[path].weight), np.asarray(params["layers"][path.split("/")[1]]
                                                                                 [path.rsplit("/", 1)[1]]))


def test_incremental_pca_keeping_every_component_is_the_pca_of_all_rows():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((90, 6)) @ rng.standard_normal((6, 6)) + 3.0
    pca = IncrementalPCA(6)
    for part in np.split(x, 3):
        pca.partial_fit(part)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    sign = np.sign(vt[np.arange(6), np.argmax(np.abs(vt), 1)])
    assert_close(pca.components_, vt * sign[:, None], 1e-9)
    assert_close(pca.singular_values_, s, 1e-9)
    assert_close(pca.explained_variance_ratio_, s ** 2 / np.sum(xc ** 2), 1e-9)


def test_refusals_name_the_problem(base):
    d, model, params = base
    spec = lv.AdapterSpec(targets=TARGETS["q_proj"], stacked=model.stacked, r=8)
    with pytest.raises(ValueError, match="did not converge"):
        lv.eva(lv.adapt(params, spec, 0), lambda t, b: model.apply(t, jnp.asarray(b["input_ids"])), _batches()[:2],
               settings=lv.Eva(tau=1.0, max_passes=2))
    with pytest.raises(ValueError, match="Eva.rho"):
        lv.Eva(rho=0.5)
