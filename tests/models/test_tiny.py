import dataclasses

import jax

import lorax_variants as lv
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer
from tests.close import assert_close


def test_scan_unrolled_remat_and_merged_paths_agree():
    model = TinyTransformer(TinyConfig(d_model=32, n_heads=2, d_ff=64, n_layers=3))
    params = model.init(jax.random.key(0))
    spec = lv.AdapterSpec(targets=r"layers/(attn|mlp)/\w+_proj", stacked=STACKED, r=4)
    adapted = jax.tree.map(lambda x: x + 0.01, lv.adapt(params, spec, 1))  # non-zero B
    ids = jax.random.randint(jax.random.key(2), (2, 16), 0, 256)
    scanned = model.apply(adapted, ids)
    assert_close(model.apply(adapted, ids, scan=False), scanned, 2e-5)
    remat = TinyTransformer(dataclasses.replace(model.config, remat=True))
    assert_close(remat.apply(adapted, ids), scanned, 2e-5)
    assert_close(lv.merged(model.apply)(adapted, ids), scanned, 2e-4)


def test_causal_future_tokens_do_not_change_past_logits():
    model = TinyTransformer(TinyConfig(d_model=32, n_heads=2, d_ff=64, n_layers=2))
    params = model.init(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (1, 10), 0, 256)
    changed = ids.at[0, 7:].set(3)
    assert_close(model.apply(params, ids)[:, :7], model.apply(params, changed)[:, :7], 5e-6)
