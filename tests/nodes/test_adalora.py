import jax
import jax.numpy as jnp
import numpy as np
import torch

import lorax_variants as lv
from tests import peft_refs as R
from tests.close import assert_close


def _pair():
    return R.adalora_pair(target_r=2, total_step=100)


def test_forward_equals_peft_adalora():
    model, ours = _pair()
    x = torch.randn(5, 24)
    assert_close(R.apply(ours, jnp.asarray(x.numpy())), model(x).detach().numpy(), 5e-5)


def test_orthogonal_penalty_equals_peft():
    model, ours = _pair()
    total, n = 0.0, 0
    for name, p in model.named_parameters():  # PEFT's AdaLoraModel.forward regulariser
        if "lora_A" in name or "lora_B" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            total += torch.norm(cov - torch.eye(*cov.size()), p="fro").item()
            n += 1
    np.testing.assert_allclose(lv.orthogonal_penalty(ours), total / n, rtol=1e-5)


def test_init_scale_and_rank_mask():
    node = lv.adapt({"w": jnp.ones((64, 48))}, lv.AdapterSpec(targets="w", r=8, alpha=16, variant="adalora"), 0)["w"]
    assert not np.asarray(node.lora_e).any() and abs(float(np.std(node.lora_a)) - 0.02) < 0.004
    assert node.scale == 16 / (8 + 1e-5)
    node = node.replace(lora_e=jnp.arange(1.0, 9.0), rank_mask=jnp.array([1, 1, 0, 1, 0, 0, 0, 1], bool))
    x = jax.random.normal(jax.random.key(0), (3, 64))
    e = np.arange(1.0, 9.0) * np.array([1, 1, 0, 1, 0, 0, 0, 1.0])
    expect = np.asarray(x) @ (np.ones((64, 48)) + node.scale * (np.asarray(node.lora_a) * e) @ np.asarray(node.lora_b))
    assert_close(lv.dense(x, node), expect, 2e-4)
    assert int(node.ranks()) == 4
