import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_variants as lv
from tests.close import assert_close
from lorax_variants.adapt import path_key


def params(d_in=16, d_out=24):
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "attn": {
            "q_proj": jax.random.normal(k[0], (d_in, d_out)),
            "v_proj": jax.random.normal(k[1], (d_in, d_out)),
            "bias": jnp.zeros(d_out),
        },
        "head": jax.random.normal(k[2], (d_out, 3)),
    }


def test_only_targets_become_nodes_and_the_rest_is_untouched():
    p = params()
    a = lv.adapt(p, lv.AdapterSpec(targets=r"attn/(q|v)_proj", r=4), 0)
    assert isinstance(a["attn"]["q_proj"], lv.LoraNode) and isinstance(a["attn"]["v_proj"], lv.LoraNode)
    assert a["attn"]["bias"] is p["attn"]["bias"] and a["head"] is p["head"]
    assert a["attn"]["q_proj"].weight is p["attn"]["q_proj"]
    assert a["attn"]["q_proj"].lora_a.shape == (16, 4) and a["attn"]["q_proj"].lora_b.shape == (4, 24)


def test_kaiming_init_bounds_and_zero_b():
    a = lv.adapt(params(d_in=400), lv.AdapterSpec(targets="attn/q_proj", r=8), 0)["attn"]["q_proj"]
    A = np.asarray(a.lora_a)
    bound = 1 / np.sqrt(400)
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.95 * bound
    assert abs(A.std() - bound / np.sqrt(3)) < 0.05 * bound  # std of U(-b, b)
    assert not np.asarray(a.lora_b).any()


def test_gaussian_init_std_is_one_over_r():
    a = lv.adapt(params(d_in=400), lv.AdapterSpec(targets="attn/q_proj", r=8, init="gaussian"), 0)
    A = np.asarray(a["attn"]["q_proj"].lora_a)
    assert abs(A.std() - 1 / 8) < 0.01
    assert not np.asarray(a["attn"]["q_proj"].lora_b).any()


def test_init_depends_only_on_key_and_own_path():
    one = lv.adapt(params(), lv.AdapterSpec(targets="attn/q_proj", r=4), 7)
    both = lv.adapt(params(), lv.AdapterSpec(targets=r"attn/(q|v)_proj", r=4), 7)
    np.testing.assert_array_equal(one["attn"]["q_proj"].lora_a, both["attn"]["q_proj"].lora_a)
    assert not np.array_equal(both["attn"]["q_proj"].lora_a, both["attn"]["v_proj"].lora_a)
    expect = lv.inits.kaiming_a(path_key(jax.random.PRNGKey(7), "attn/q_proj"), (16, 4))
    np.testing.assert_array_equal(one["attn"]["q_proj"].lora_a, expect)


def test_rank_and_alpha_overrides_per_path():
    spec = lv.AdapterSpec(targets=r"attn/(q|v)_proj", r=4, alpha=8, rank_pattern={"attn/v_proj": 2}, alpha_pattern={"attn/v_proj": 6})
    a = lv.adapt(params(), spec, 0)["attn"]
    assert a["q_proj"].rank == 4 and a["q_proj"].scale == 2.0
    assert a["v_proj"].rank == 2 and a["v_proj"].scale == 3.0


def test_lora_fa_freezes_a():
    a = lv.adapt(params(), lv.AdapterSpec(targets="attn/q_proj", variant="lora_fa", r=4), 0)
    trainable, _ = lv.split(a)
    node = trainable["attn"]["q_proj"]
    assert node.lora_a is None and node.lora_b is not None
    assert lv.count_params(a).trainable == 4 * 24


def test_pure_under_jit_and_eval_shape():
    p = params()
    spec = lv.AdapterSpec(targets=r"attn/(q|v)_proj", r=4, init="pissa")
    eager = lv.adapt(p, spec, jax.random.PRNGKey(3))
    jitted = jax.jit(lambda p, k: lv.adapt(p, spec, k))(p, jax.random.PRNGKey(3))
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        assert_close(x, y, 1e-5)
    abstract = jax.eval_shape(lambda p: lv.adapt(p, spec, jax.random.PRNGKey(3)), p)
    assert jax.tree.structure(abstract) == jax.tree.structure(eager)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))


def test_paper_parameter_count_on_abstract_gpt3_shapes():
    """LoRA paper §4.2: |Θ| = 2 × L̂ × d_model × r for L̂ adapted d x d matrices (GPT-3: 96 layers)."""
    L, d, r = 96, 12288, 4
    abstract = {
        "layers": {
            name: jax.ShapeDtypeStruct((L, d, d), jnp.bfloat16) for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
    }
    spec = lv.AdapterSpec(targets=r"layers/(q|v)_proj", stacked=r"layers/.*", r=r)
    planned = jax.eval_shape(lambda p: lv.adapt(p, spec, jax.random.PRNGKey(0)), abstract)
    count = lv.count_params(planned)
    assert count.trainable == 2 * (2 * L) * d * r  # 18.9M for Wq, Wv at r=4
    assert count.frozen == 4 * L * d * d
    assert lv.tree_bytes(planned) == 4 * L * d * d * 2 + count.trainable * 4


def test_stacked_layers_get_their_own_factors():
    p = {"layers": {"w": jax.random.normal(jax.random.key(1), (3, 8, 6))}}
    a = lv.adapt(p, lv.AdapterSpec(targets="layers/w", stacked="layers/.*", r=2), 0)["layers"]["w"]
    assert a.lora_a.shape == (3, 8, 2) and a.lora_b.shape == (3, 2, 6)
    assert not np.array_equal(a.lora_a[0], a.lora_a[1])


def test_no_match_lists_closest_paths():
    with pytest.raises(ValueError, match=r"matched no leaf.*Closest paths: \['attn/q_proj'"):
        lv.adapt(params(), lv.AdapterSpec(targets="attn/q_prj"), 0)


def test_override_key_matching_no_target_is_an_error():
    spec = lv.AdapterSpec(targets="attn/q_proj", r=4, rank_pattern={"attn/k_proj": 2})
    with pytest.raises(ValueError, match=r"rank_pattern key 'attn/k_proj' matches none"):
        lv.adapt(params(), spec, 0)


def test_rank_larger_than_weight_names_path():
    with pytest.raises(ValueError, match=r"attn/q_proj: rank 17 exceeds min\(in, out\) = 16"):
        lv.adapt(params(), lv.AdapterSpec(targets="attn/q_proj", r=17), 0)


def test_non_2d_target_is_refused_with_path_and_shape():
    with pytest.raises(ValueError, match=r"attn/bias: adapter targets must be weights \[in, out\], got shape \(24,\)"):
        lv.adapt(params(), lv.AdapterSpec(targets="attn/bias"), 0)
    p = {"w": jnp.ones((2, 8, 8))}
    with pytest.raises(ValueError, match=r"w: .*got shape \(2, 8, 8\).*AdapterSpec.stacked"):
        lv.adapt(p, lv.AdapterSpec(targets="w", r=2), 0)
    with pytest.raises(ValueError, match=r"w: AdapterSpec.stacked matches it.*\[L, in, out\]"):
        lv.adapt({"w": jnp.ones((8, 8))}, lv.AdapterSpec(targets="w", r=2, stacked="w"), 0)


def test_adapting_twice_is_refused():
    a = lv.adapt(params(), lv.AdapterSpec(targets="attn/q_proj", r=2), 0)
    with pytest.raises(ValueError, match="attn/q_proj is already adapted"):
        lv.adapt(a, lv.AdapterSpec(targets="attn/q_proj", r=2), 0)


def test_unknown_variant_lists_known():
    with pytest.raises(ValueError, match=r"variant 'lorax' is unknown; known variants: \[.*'dora'.*'lora'.*'vera'"):
        lv.adapt(params(), lv.AdapterSpec(targets="attn/q_proj", variant="lorax"), 0)
