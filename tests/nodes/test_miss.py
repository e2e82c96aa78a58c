"""MiSS (PEFT ``MissConfig``): each form (miss, mini, bat) equals PEFT's forward and gradients on the same
weights; merge equals the forward; NF4 bases; errors name the path."""

import jax
import jax.numpy as jnp
import peft
import pytest
import torch

import lorax_variants as lv
from tests import peft_refs as R
from tests.close import assert_close

FORMS = {"miss": dict(init_weights=True), "mini": dict(init_weights="mini", mini_r=4), "bat": dict(init_weights="bat")}


def _pair(mode, r=4, seed=0, d_in=24, d_mid=40):
    """A PEFT MiSS TwoLinear and our adapted tree holding the same (random) blocks."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(R.TwoLinear(d_in=d_in, d_mid=d_mid),
                                peft.MissConfig(r=r, target_modules=["up", "down"], **FORMS[mode]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "miss_block" in n:
                p.normal_(std=0.2)
    settings = lv.Miss(mode=mode, mini_r=FORMS[mode].get("mini_r", 1))
    ours = lv.adapt(R.weights_of(model), lv.AdapterSpec(targets=r"(up|down)/kernel", r=r, variant="miss",
                                                        settings=settings), 0)
    for name in ("up", "down"):
        block = getattr(model.base_model.model, name).miss_block["default"].detach().numpy()
        ours[name]["kernel"] = ours[name]["kernel"].replace(miss_block=jnp.asarray(block))
    return model, ours


@pytest.mark.parametrize("mode", list(FORMS))
def test_forward_and_gradients_equal_peft(mode):
    model, ours = _pair(mode)
    got, want, grads = R.forward_and_grads(model, ours, torch.randn(6, 24))
    assert_close(got, want, 1e-5)
    for name in ("up", "down"):
        ref = getattr(model.base_model.model, name).miss_block["default"].grad.numpy()
        assert_close(grads[name]["kernel"].miss_block, ref, 1e-5, err_msg=f"{mode} {name}")


def test_an_input_not_a_multiple_of_r_is_padded_as_peft():
    model, ours = _pair("miss", r=7, seed=1)  # 24 and 40 inputs: neither a multiple of 7
    x = torch.randn(3, 24)
    assert_close(R.apply(ours, jnp.asarray(x.numpy())), model(x).detach().numpy(), 1e-5)


@pytest.mark.parametrize("mode", list(FORMS))
def test_merge_equals_the_forward_and_init_is_the_base(mode):
    _, ours = _pair(mode, seed=2)
    x = jax.random.normal(jax.random.key(3), (5, 24))
    node = ours["up"]["kernel"]
    assert_close(x @ lv.merge(ours)["up"]["kernel"], lv.dense(x, node), 1e-5)
    fresh = lv.adapt({"w": node.weight}, lv.AdapterSpec("w", r=4, variant="miss", settings=lv.Miss(mode=mode,
                                                        mini_r=FORMS[mode].get("mini_r", 1))), 0)
    assert_close(lv.dense(x, fresh["w"]), x @ node.weight, 1e-6)


def test_parameter_counts_of_each_form():
    w = {"w": jnp.ones((24, 40))}
    count = lambda **s: lv.count_params(lv.adapt(w, lv.AdapterSpec("w", r=4, variant="miss",  # noqa: E731
                                                                   settings=lv.Miss(**s)), 0)).trainable
    assert count() == 4 * 40 and count(mode="mini", mini_r=8) == 4 * 8 and count(mode="bat") == (40 // 4) * 4 * 4


def test_over_nf4_each_form_uses_the_dequantized_weight():
    for mode in FORMS:
        model, ours = _pair(mode, seed=3)
        quantized = lv.quantize(R.weights_of(model), lv.QuantSpec(targets=r"(up|down)/kernel", block_size=8))
        tree = {k: dict(v, kernel=v["kernel"].with_weight(quantized[k]["kernel"])) for k, v in ours.items()}
        deq = {k: dict(v, kernel=v["kernel"].with_weight(lv.dequantize(quantized[k]["kernel"]))) for k, v in ours.items()}
        x = jax.random.normal(jax.random.key(4), (4, 24))
        assert_close(R.apply(tree, x), R.apply(deq, x), 1e-5, err_msg=mode)


def test_bad_shapes_are_named():
    w = {"w": jnp.ones((24, 42))}
    with pytest.raises(ValueError, match="w: MiSS bat needs in and out divisible by r=4"):
        lv.adapt(w, lv.AdapterSpec("w", r=4, variant="miss", settings=lv.Miss(mode="bat")), 0)
    with pytest.raises(ValueError, match="w: MiSS mini needs out=42 divisible by Miss.mini_r=4"):
        lv.adapt(w, lv.AdapterSpec("w", r=4, variant="miss", settings=lv.Miss(mode="mini", mini_r=4)), 0)
    with pytest.raises(ValueError, match="w: MiSS block size r=32 exceeds the weight's input dimension 24"):
        lv.adapt(w, lv.AdapterSpec("w", r=32, variant="miss"), 0)
    with pytest.raises(ValueError, match="Miss.mode must be one of"):
        lv.Miss(mode="lora")
