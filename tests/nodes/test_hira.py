"""HiRA (PEFT ``HiraConfig``): forward and gradients equal PEFT's on the same weights; NF4 bases; merge; init."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import lorax_variants as lv
from tests import peft_refs as R
from tests.close import assert_close


def _pair(seed=0):
    """A PEFT HiRA TwoLinear (r=4, A and B random) and our adapted tree holding the same factors."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(R.TwoLinear(), peft.HiraConfig(r=4, target_modules=["up", "down"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hira_B" in n:
                p.normal_(std=0.3)  # B starts at 0: move it so the update is not nothing
    ours = lv.adapt(R.weights_of(model), lv.AdapterSpec(targets=r"(up|down)/kernel", r=4, variant="hira"), 0)
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        ours[name]["kernel"] = ours[name]["kernel"].replace(
            hira_a=jnp.asarray(layer.hira_A["default"].detach().numpy().T),
            hira_b=jnp.asarray(layer.hira_B["default"].detach().numpy().T))
    return model, ours


def test_forward_and_gradients_equal_peft():
    model, ours = _pair()
    got, want, grads = R.forward_and_grads(model, ours, torch.randn(6, 24))
    assert_close(got, want, 1e-5)
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        assert_close(grads[name]["kernel"].hira_a, layer.hira_A["default"].grad.numpy().T, 1e-5, err_msg=name)
        assert_close(grads[name]["kernel"].hira_b, layer.hira_B["default"].grad.numpy().T, 1e-5, err_msg=name)


def test_init_is_the_base_and_trains_r_in_plus_out():
    torch.manual_seed(1)
    model = peft.get_peft_model(R.TwoLinear(), peft.HiraConfig(r=4, target_modules=["up", "down"]))
    ours = lv.adapt(R.weights_of(model), lv.AdapterSpec(targets=r"(up|down)/kernel", r=4, variant="hira"), 0)
    x = torch.randn(3, 24)
    assert_close(R.apply(ours, jnp.asarray(x.numpy())), model(x).detach().numpy(), 1e-6)  # B = 0 on both sides
    assert lv.count_params(ours).trainable == 4 * (24 + 40) + 4 * (40 + 16)
    a = np.asarray(ours["up"]["kernel"].hira_a)
    assert np.abs(a).max() <= 1 / np.sqrt(24) and np.abs(a).max() > 0.5 / np.sqrt(24)  # PEFT's Kaiming-uniform bound
    g = lv.adapt(R.weights_of(model), lv.AdapterSpec(targets=r"up/kernel", r=4, variant="hira", init="gaussian"), 0)
    assert 0.15 < float(np.std(np.asarray(g["up"]["kernel"].hira_a))) < 0.35  # std 1/r = 0.25, as PEFT's gaussian


def test_merge_is_w_times_one_plus_ab_and_equals_the_forward():
    _, ours = _pair(2)
    node = ours["up"]["kernel"]
    w = np.asarray(node.weight)
    ab = np.asarray(node.hira_a) @ np.asarray(node.hira_b)
    assert_close(lv.merge(ours)["up"]["kernel"], w * (1 + ab), 1e-6)
    x = jax.random.normal(jax.random.key(3), (5, 24))
    assert_close(x @ lv.merge(ours)["up"]["kernel"], lv.dense(x, node), 1e-5)


def test_over_nf4_the_update_multiplies_the_dequantized_weight():
    """QLoRA-style: HiRA over an NF4 base equals HiRA (ours and PEFT's) over the dequantized weight."""
    model, ours = _pair(3)
    quantized = lv.quantize(R.weights_of(model), lv.QuantSpec(targets=r"(up|down)/kernel", block_size=8))
    deq = {k: dict(v, kernel=lv.dequantize(v["kernel"])) for k, v in quantized.items()}
    tree = {k: dict(v, kernel=v["kernel"].with_weight(quantized[k]["kernel"])) for k, v in ours.items()}
    with torch.no_grad():  # PEFT over the same dequantized weights
        for name in ("up", "down"):
            getattr(model.base_model.model, name).base_layer.weight.copy_(
                torch.from_numpy(np.asarray(deq[name]["kernel"]).T.copy()))
    x = torch.randn(4, 24)
    assert_close(R.apply(tree, jnp.asarray(x.numpy())), model(x).detach().numpy(), 1e-5)
    assert isinstance(tree["up"]["kernel"].weight, lv.QuantizedNode)


def test_a_residual_init_is_refused_naming_the_path():
    with pytest.raises(ValueError, match="w: HiRA starts from B = 0"):
        lv.adapt({"w": jnp.ones((8, 8))}, lv.AdapterSpec("w", r=2, variant="hira", init="pissa"), 0)


# PEFT export and import (HiRA's codec): tests/hf/test_export.py and tests/hf/test_peft_import.py
