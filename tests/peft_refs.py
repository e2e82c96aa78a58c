"""Small torch models wrapped by PEFT, for forward-parity tests."""

import torch


class TwoLinear(torch.nn.Module):
    """Two projections of different shapes (VeRA slices its shared matrices per layer)."""

    def __init__(self, d_in=24, d_mid=40, d_out=16):
        super().__init__()
        self.up = torch.nn.Linear(d_in, d_mid)
        self.down = torch.nn.Linear(d_mid, d_out)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def weights_of(model):
    """Our params tree ([in, out] kernels + biases) for the base of a (PEFT-wrapped) TwoLinear."""
    import jax.numpy as jnp

    base = model.base_model.model if hasattr(model, "base_model") else model
    out = {}
    for name in ("up", "down"):
        layer = getattr(base, name)
        layer = getattr(layer, "base_layer", layer)
        out[name] = {"kernel": jnp.asarray(layer.weight.detach().numpy().T), "bias": jnp.asarray(layer.bias.detach().numpy())}
    return out


def apply(tree, x):
    """Our forward of TwoLinear over an adapted tree."""
    import jax

    import lorax_variants as lv

    tree = lv.resolve_shared(tree)
    h = jax.nn.relu(lv.dense(x, tree["up"]["kernel"]) + tree["up"]["bias"])
    return lv.dense(h, tree["down"]["kernel"]) + tree["down"]["bias"]


def adalora_pair(**config):
    """A PEFT AdaLoRA TwoLinear (init_r=6, alpha=12, random Λ) and our adapted tree with equal factors."""
    import jax.numpy as jnp
    import peft

    import lorax_variants as lv

    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=6, lora_alpha=12, target_modules=["up", "down"], **config)
    model = peft.get_peft_model(TwoLinear(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_()
    ours = lv.adapt(weights_of(model), lv.AdapterSpec(targets=r"(up|down)/kernel", r=6, alpha=12, variant="adalora"), 0)
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        ours[name]["kernel"] = ours[name]["kernel"].replace(
            lora_a=jnp.asarray(layer.lora_A["default"].detach().numpy().T),
            lora_e=jnp.asarray(layer.lora_E["default"].detach().numpy()[:, 0]),
            lora_b=jnp.asarray(layer.lora_B["default"].detach().numpy().T))
    return model, ours


def forward_and_grads(model, ours, x):
    """``(ours_out, peft_out, our_grads)`` on the same input ``x`` (torch [batch, 24]) and loss sum(out²): PEFT's
    parameters hold their gradients afterwards, ``our_grads`` is the gradient of our trainable tree."""
    import jax
    import jax.numpy as jnp

    import lorax_variants as lv

    out = model(x)
    (out ** 2).sum().backward()
    xj = jnp.asarray(x.numpy())
    trainable, frozen = lv.split(ours)
    grads = jax.grad(lambda t: jnp.sum(apply(lv.combine(t, frozen), xj) ** 2))(trainable)
    return apply(ours, xj), out.detach().numpy(), grads
