import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch

import lorax_variants as lv
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer
from tests import peft_refs as R
from tests.close import assert_close


def test_forward_equals_peft_vera_with_shared_sliced_projections():
    torch.manual_seed(0)
    model = peft.get_peft_model(R.TwoLinear(), peft.VeraConfig(r=4, target_modules=["up", "down"], d_initial=0.1))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lambda" in n:
                p.normal_()
    ours = lv.adapt(R.weights_of(model), lv.AdapterSpec(targets=r"(up|down)/kernel", r=4, variant="vera"), 0)
    vera_a = model.base_model.vera_A["default"].numpy()  # (r, max_in)
    vera_b = model.base_model.vera_B["default"].numpy()  # (max_out, r)
    owners = [n for n in ("up", "down") if ours[n]["kernel"].vera_a.value is not None]
    assert owners == ["down"]  # stored once: the first target in tree order owns it
    assert ours["down"]["kernel"].vera_a.value.shape == (vera_a.shape[1], 4)
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        node = ours[name]["kernel"]
        fields = dict(lambda_d=jnp.asarray(layer.vera_lambda_d["default"].detach().numpy()),
                      lambda_b=jnp.asarray(layer.vera_lambda_b["default"].detach().numpy()))
        if node.vera_a.value is not None:
            fields |= dict(vera_a=lv.Shared("vera_a", jnp.asarray(vera_a.T)), vera_b=lv.Shared("vera_b", jnp.asarray(vera_b.T)))
        ours[name]["kernel"] = node.replace(**fields)
    x = torch.randn(5, 24)
    assert_close(R.apply(ours, jnp.asarray(x.numpy())), model(x).detach().numpy(), 2e-5)


def test_init_and_parameter_count():
    p = {"a": jnp.ones((24, 40)), "b": jnp.ones((40, 16))}
    tree = lv.adapt(p, lv.AdapterSpec(targets="a|b", r=4, variant="vera", settings=lv.Vera(d_initial=0.25)), 0)
    assert np.all(np.asarray(tree["a"].lambda_d) == 0.25) and not np.asarray(tree["b"].lambda_b).any()
    assert lv.count_params(tree).trainable == (4 + 40) + (4 + 16)  # r + out per layer
    a = np.asarray(tree["a"].vera_a.value)
    assert a.shape == (40, 4) and np.abs(a).max() <= np.sqrt(6 / 40)  # Kaiming-uniform, fan_in = max_in
    trainable, frozen = lv.split(tree)
    assert lv.tree_bytes(frozen) == (24 * 40 + 40 * 16) * 4 + (40 * 4 + 4 * 40) * 4  # projections once


def test_stacked_vera_under_scan_equals_merged():
    model = TinyTransformer(TinyConfig(d_model=32, n_heads=2, d_ff=64, n_layers=3))
    params = model.init(jax.random.key(0))
    spec = lv.AdapterSpec(targets=r"layers/(attn|mlp)/\w+_proj", stacked=STACKED, r=4, variant="vera")
    tree = jax.tree.map(lambda x: x + 0.1 if x.ndim == 2 and x.shape[-1] in (32, 64) else x, lv.adapt(params, spec, 0))
    tree = jax.tree.map(lambda n: n.replace(lambda_b=n.lambda_b + 0.5) if isinstance(n, lv.VeraNode) else n, tree,
                        is_leaf=lambda n: isinstance(n, lv.VeraNode))
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
    assert_close(model.apply(tree, ids), model.apply(lv.merge(tree), ids), 2e-4)
    assert_close(model.apply(tree, ids, scan=False), model.apply(tree, ids), 2e-5)
