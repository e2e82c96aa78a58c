"""The allocator against PEFT's RankAllocator, step by step, through all three phases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import lorax_variants as lv
from lorax_variants.variants.adalora import adalora_allocator, budget_schedule, rank_pattern, with_rank_pattern
from tests import peft_refs as R
from tests.close import assert_close

SCHEDULE = dict(target_r=2, total_step=14, tinit=2, tfinal=3, delta_t=2, beta1=0.85, beta2=0.85)


def test_budgets_masks_and_parameters_equal_peft_step_by_step():
    model, ours = R.adalora_pair(target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=14, beta1=0.85, beta2=0.85)
    layers = {name: getattr(model.base_model.model, name) for name in ("up", "down")}
    trainable, frozen = lv.split(ours)
    x, y = torch.randn(16, 24), torch.randn(16, 16)
    torch_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    tx = adalora_allocator(optax.sgd(0.05), **SCHEDULE)
    state = tx.init(trainable)
    loss_fn = lambda t: jnp.mean((R.apply(lv.combine(t, frozen), jnp.asarray(x.numpy())) - jnp.asarray(y.numpy())) ** 2)  # noqa: E731
    step = jax.jit(lambda t, s: (lambda g: tx.update(g, s, t))(jax.grad(loss_fn)(t)))
    saw_masking = False
    for t in range(14):
        torch_opt.zero_grad()
        torch.mean((model(x) - y) ** 2).backward()
        torch_opt.step()
        model.base_model.update_and_allocate(t)
        u, state = step(trainable, state)
        trainable = optax.apply_updates(trainable, u)
        for name, layer in layers.items():
            e_peft = layer.lora_E["default"].detach().numpy()[:, 0]
            assert_close(trainable[name]["kernel"].lora_e, e_peft, 2e-4, err_msg=f"step {t} {name}")
            saw_masking |= bool((e_peft == 0).any())
    assert saw_masking
    # The final rank pattern equals PEFT's and reaches the target budget (2 per matrix on average).
    pattern = model.peft_config["default"].rank_pattern
    keep = dict(zip(["down", "up"], rank_pattern(state)))  # our tree order
    for name in ("up", "down"):
        key = next((k for k in pattern if f".{name}." in k or k.endswith(f".{name}") or f"{name}.lora_E" in k), None)
        assert key is not None, list(pattern)
        np.testing.assert_array_equal(np.asarray(keep[name]), np.asarray(pattern[key]))
    assert sum(int(np.sum(k)) for k in keep.values()) == 2 * 2
    exported = with_rank_pattern(lv.combine(trainable, frozen), state)
    assert [int(exported[n]["kernel"].ranks()) for n in ("down", "up")] == [int(np.sum(keep[n])) for n in ("down", "up")]


def test_budget_schedule_is_cubic_and_clamped():
    b = [int(budget_schedule(jnp.int32(t), 24, 8, 2, 3, 14, 2)[0]) for t in range(15)]
    assert b[:3] == [24] * 3 and b[-3:] == [8] * 3
    mid = [int(8 + 16 * (1 - (t - 2) / 9) ** 3) for t in range(3, 12)]
    assert b[3:12] == mid
    with pytest.raises(ValueError, match="total_step"):
        adalora_allocator(optax.sgd(0.1), target_r=2, total_step=4, tinit=2, tfinal=2)
