"""SHiRA (PEFT ``ShiraConfig``): PEFT's random mask reproduced from the seed, forward and gradients equal
PEFT's on the same values, the sparse apply forms no weight-sized temporary, merge, NF4."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import lorax_variants as lv
from lorax_variants.variants.shira import random_mask_indices
from tests import peft_refs as R
from tests.close import assert_close


def _pair(seed, r=2):
    torch.manual_seed(0)
    model = peft.get_peft_model(R.TwoLinear(), peft.ShiraConfig(r=r, target_modules=["up", "down"], random_seed=seed))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "shira_weight" in n:
                p.normal_(std=0.3)
    ours = lv.adapt(R.weights_of(model), lv.AdapterSpec(targets=r"(up|down)/kernel", r=r, variant="shira",
                                                        settings=lv.Shira(random_seed=seed)), 0)
    return model, ours


@pytest.mark.parametrize("seed", [7, None])
def test_the_mask_is_peft_s_from_the_same_seed(seed):
    model, ours = _pair(seed)
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        idx = layer.shira_indices["default"].numpy()
        node = ours[name]["kernel"]
        np.testing.assert_array_equal(np.asarray(node.shira_rows), idx[0], err_msg=name)
        np.testing.assert_array_equal(np.asarray(node.shira_cols), idx[1], err_msg=name)


def test_forward_and_gradients_equal_peft():
    model, ours = _pair(11)
    for name in ("up", "down"):
        values = getattr(model.base_model.model, name).shira_weight["default"].detach().numpy()
        ours[name]["kernel"] = ours[name]["kernel"].replace(shira_weight=jnp.asarray(values))
    got, want, grads = R.forward_and_grads(model, ours, torch.randn(6, 24))
    assert_close(got, want, 1e-5)
    for name in ("up", "down"):
        ref = getattr(model.base_model.model, name).shira_weight["default"].grad.numpy()
        assert_close(grads[name]["kernel"].shira_weight, ref, 1e-5, err_msg=name)
    x2 = jax.random.normal(jax.random.key(2), (4, 24))
    assert_close(x2 @ lv.merge(ours)["up"]["kernel"], lv.dense(x2, ours["up"]["kernel"]), 1e-5)
    assert lv.count_params(ours).trainable == 2 * (24 + 40) + 2 * (40 + 16)  # LoRA's count at the same r


def test_randperm_head_equals_torch_on_larger_sizes():
    for n_in, n_out, k, seed in [(96, 50, 600, 0), (128, 300, 2000, 123456789)]:
        g = torch.Generator()
        g.manual_seed(seed)
        flat = np.sort(torch.randperm(n_in * n_out, generator=g)[:k].numpy())
        rows, cols = random_mask_indices(n_in, n_out, k, seed)
        np.testing.assert_array_equal(rows.astype(np.int64) * n_in + cols, flat)


def test_over_nf4_and_stacked_layers_share_the_mask():
    w = {"w": jax.random.normal(jax.random.key(0), (3, 24, 40)) * 0.1}
    spec = lv.AdapterSpec("w", r=2, variant="shira", stacked="w", settings=lv.Shira(random_seed=5))
    tree = lv.adapt(w, spec, 0)
    node = tree["w"]
    assert node.shira_rows.shape == (3, 128) and (np.asarray(node.shira_rows) == np.asarray(node.shira_rows)[0]).all()
    moved = node.replace(shira_weight=jax.random.normal(jax.random.key(1), node.shira_weight.shape))
    q = lv.quantize(w, lv.QuantSpec("w", stacked="w", block_size=8))["w"]
    x = jax.random.normal(jax.random.key(2), (5, 24))
    for layer in range(3):
        one = jax.tree.map(lambda a: a[layer], moved.with_weight(q))
        ref = jax.tree.map(lambda a: a[layer], moved.with_weight(lv.dequantize(q)))
        assert_close(lv.dense(x, one), lv.dense(x, ref), 1e-5)
        assert_close(lv.dense(x, ref), x @ lv.merge({"w": ref})["w"], 1e-5)
