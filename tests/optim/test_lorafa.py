import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from peft.optimizers import create_lorafa_optimizer

import lorax_variants as lv
from lorax_variants.variants.lora_fa import lorafa_projection
from tests import peft_refs as R
from tests.close import assert_close


def test_projection_equals_the_formula():
    tree = lv.adapt({"w": jax.random.normal(jax.random.key(0), (12, 10))}, lv.AdapterSpec(targets="w", r=3, alpha=6, variant="lora_fa"), 0)
    trainable, _ = lv.split(tree)
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), trainable)
    out, _ = lorafa_projection(tree).update(g, optax.EmptyState())
    a = np.asarray(tree["w"].lora_a, np.float64)
    expect = np.linalg.pinv(a.T @ a + 1e-8 * np.eye(3)) @ np.asarray(g["w"].lora_b) / 2.0**2
    assert_close(out["w"].lora_b, expect, 2e-4)
    with pytest.raises(ValueError, match="no LoRA-FA nodes"):
        lorafa_projection(lv.adapt({"w": jnp.ones((4, 4))}, lv.AdapterSpec(targets="w", r=2), 0))


def test_one_adamw_step_matches_peft_lorafa_optimizer():
    torch.manual_seed(0)
    model = peft.get_peft_model(R.TwoLinear(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ours = lv.adapt(R.weights_of(model), lv.AdapterSpec(targets=r"(up|down)/kernel", r=4, alpha=8, variant="lora_fa"), 0)
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        ours[name]["kernel"] = ours[name]["kernel"].replace(
            lora_a=jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T),
            lora_b=jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T))
    opt = create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.0)
    x, y = torch.randn(8, 24), torch.randn(8, 16)
    torch.mean((model(x) - y) ** 2).backward()
    opt.step()
    trainable, frozen = lv.split(ours)
    loss = lambda t: jnp.mean((R.apply(lv.combine(t, frozen), jnp.asarray(x.numpy())) - jnp.asarray(y.numpy())) ** 2)  # noqa: E731
    projected, _ = lorafa_projection(ours).update(jax.grad(loss)(trainable), optax.EmptyState())
    # PEFT's AdamW, first step, written out: m = (1-β1) g, v = (1-β2) g², eps added before the
    # bias correction (lr · sqrt(1-β2)/(1-β1) · m / (sqrt(v) + eps)). Applied to our projected
    # gradient it reproduces PEFT's step, up to PEFT's bf16 autocast of the projection.
    b1, b2, eps, lr = 0.9, 0.999, 1e-6, 1e-2
    for name in ("up", "down"):
        g = np.asarray(projected[name]["kernel"].lora_b, np.float64)
        m, v = (1 - b1) * g, (1 - b2) * g * g
        step = -lr * np.sqrt(1 - b2) / (1 - b1) * m / (np.sqrt(v) + eps)
        before = np.asarray(trainable[name]["kernel"].lora_b)
        theirs = getattr(model.base_model.model, name).lora_B["default"].weight.detach().numpy().T - before
        close = np.isclose(step, theirs, rtol=2e-2, atol=1e-4)
        assert close.mean() >= 0.97 and np.all(np.abs(step - theirs) < 0.15 * lr)  # bf16 outliers only
