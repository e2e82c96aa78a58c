"""Property-based tests over random shapes and dtypes: tree transforms (adapt, split/combine, merge),
quantization round trips, safetensors and PEFT/merged export and import back.

References are independent: numpy for the LoRA equation, the ``safetensors`` library for the file
format, transformers for loading what we write. Each example that meets a new shape compiles, so the
example counts are kept small (``max_examples``); a failure prints the example that reproduces it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorax_variants as lv
from lorax_variants.hf.safetensors_io import SafetensorsFile, write_safetensors
from lorax_variants.quant import NF4_CODE, quantize_array
from tests.close import assert_close

FLOATS = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Variants whose nodes merge to W + (a low-rank term that is zero at init).
MERGEABLE = ["lora", "lora_fa", "dora", "vera", "adalora", "dylora", "sora", "multitask"]


def _random_like(x: jax.Array, key: jax.Array, scale: float = 0.1) -> jax.Array:
    return (x + scale * jax.random.normal(key, x.shape, jnp.float32)).astype(x.dtype)


def _perturb(tree, seed: int):
    trainable, frozen = lv.split(tree)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    moved = [_random_like(x, k) if jnp.issubdtype(x.dtype, jnp.floating) else x for x, k in zip(leaves, keys)]
    return lv.combine(jax.tree.unflatten(treedef, moved), frozen)


# Random model-like trees: a few named 2-D weights (any float dtype) and 1-D biases.
@st.composite
def weight_trees(draw):
    n = draw(st.integers(1, 3))
    tree = {}
    for i in range(n):
        d_in, d_out = draw(st.integers(2, 9)), draw(st.integers(2, 9))
        dtype = FLOATS[draw(st.sampled_from(sorted(FLOATS)))]
        w = np.random.default_rng(i).normal(size=(d_in, d_out)).astype(dtype)
        tree[f"m{i}"] = {"w": jnp.asarray(w), "b": jnp.zeros((d_out,), dtype)}
    return tree


@settings(max_examples=4, deadline=None)
@given(tree=weight_trees(), variant=st.sampled_from(MERGEABLE), r=st.integers(1, 2), seed=st.integers(0, 999))
def test_adapt_keeps_the_base_and_split_combine_merge_are_consistent(tree, variant, r, seed):
    extra = {"settings": lv.MultiTask(n_tasks=2)} if variant == "multitask" else {}
    spec = lv.AdapterSpec(targets=r".*/w", variant=variant, r=r, alpha=2.0, **extra)
    adapted = lv.adapt(tree, spec, jax.random.key(seed))
    # At init the adapted tree merges back to the base weights, in the base dtype, and everything
    # else is untouched.
    merged = lv.merge(lv.select(adapted, 0) if variant == "multitask" else adapted)
    for name, sub in tree.items():
        assert merged[name]["w"].dtype == sub["w"].dtype
        assert_close(np.asarray(merged[name]["w"], np.float32), np.asarray(sub["w"], np.float32), 2e-6)
        assert merged[name]["b"] is sub["b"]
    # split/combine round trip is exact after training moved the trainable leaves, and keeps every dtype.
    moved = _perturb(adapted, seed + 1)
    trainable, frozen = lv.split(moved)
    back = lv.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(moved)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(moved)):
        assert x is y
    # Trainable leaves are exactly the adapter's: the base weights and biases are all frozen.
    for path, _ in lv.leaves_with_paths(trainable):
        assert not path.endswith(("/w/weight", "/b")), path


@settings(max_examples=5, deadline=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), r=st.integers(1, 4), rslora=st.booleans(),
       dtype=st.sampled_from(sorted(FLOATS)), seed=st.integers(0, 999))
def test_lora_merge_is_w_plus_scaled_ab(d_in, d_out, r, rslora, dtype, seed):
    rng = np.random.default_rng(seed)
    r = min(r, d_in, d_out)
    w = rng.normal(size=(d_in, d_out)).astype(FLOATS[dtype])
    spec = lv.AdapterSpec(targets="w", r=r, alpha=3.0, rslora=rslora)
    node = _perturb(lv.adapt({"w": jnp.asarray(w)}, spec, jax.random.key(seed)), seed)["w"]
    a, b = np.asarray(node.lora_a, np.float64), np.asarray(node.lora_b, np.float64)
    scale = 3.0 / (np.sqrt(r) if rslora else r)
    expect = w.astype(np.float64) + scale * a @ b
    got = node.merge()
    assert got.dtype == w.dtype
    tol = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}[dtype]  # one rounding to the base dtype
    assert_close(np.asarray(got, np.float64), expect, tol)


# --- quantization ---------------------------------------------------------------------------------

_NF4_HALF_GAP = float(np.max(np.diff(NF4_CODE)) / 2)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.integers(1, 3), d_out=st.integers(1, 5), layers=st.sampled_from([0, 2]),
       magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e30]), zero_block=st.booleans(), seed=st.integers(0, 999),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_nf4_round_trip_error_and_idempotence(blocks, d_out, layers, magnitude, zero_block, seed, dtype):
    """Each value comes back within half the widest NF4 code gap times its block's absmax; a block of zeros
    comes back as zeros; quantizing the dequantized weight gives the same codes (NF4 values are fixed points)."""
    bs = 64
    rng = np.random.default_rng(seed)
    shape = ((layers,) if layers else ()) + (blocks * bs, d_out)
    w = (rng.normal(size=shape) * magnitude).astype(np.float32)
    if zero_block:
        w[..., :bs, 0] = 0.0
    w = jnp.asarray(w).astype(dtype)
    spec = lv.QuantSpec(targets="w", kind="nf4", block_size=bs, double_quant=False)
    node = quantize_array(w, spec)
    back = np.asarray(node.dequantize(jnp.float32))
    wf = np.asarray(w, np.float32)
    absmax = np.abs(wf.reshape(*shape[:-2], blocks, bs, d_out)).max(axis=-2, keepdims=True)
    err = np.abs(back - wf).reshape(*shape[:-2], blocks, bs, d_out)
    assert np.all(np.isfinite(back))
    assert np.all(err <= absmax * _NF4_HALF_GAP * (1 + 1e-6) + 1e-37)
    if zero_block:
        assert np.all(back[..., :bs, 0] == 0.0)
    again = quantize_array(jnp.asarray(back), spec)
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(node.codes))


# --- safetensors --------------------------------------------------------------------------------------

ST_DTYPES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]


@st.composite
def tensor_dicts(draw):
    n = draw(st.integers(1, 5))
    out = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
        dt = draw(st.sampled_from(ST_DTYPES))
        x = np.asarray(np.random.default_rng(i).normal(size=shape) * 100)
        dtype = ml_dtypes.bfloat16 if dt == "bfloat16" else np.dtype(dt)
        out[draw(st.text("abcxyz._/0123", min_size=1, max_size=12)) + str(i)] = np.asarray((x > 0 if dt == "bool" else x).astype(dtype))
    return out


@settings(max_examples=40, deadline=None)
@given(tensors=tensor_dicts())
def test_safetensors_round_trip_against_the_reference_library(tensors, tmp_path_factory):
    import safetensors.numpy
    import safetensors.torch
    import torch

    d = tmp_path_factory.mktemp("st")
    write_safetensors(d / "ours.safetensors", tensors, {"format": "pt"})
    f = SafetensorsFile(d / "ours.safetensors")
    assert sorted(f.keys()) == sorted(tensors)
    for k, x in tensors.items():
        y = np.asarray(f.get(k))
        assert y.dtype == x.dtype and y.shape == x.shape, k
        assert y.tobytes() == np.asarray(x).tobytes(), k  # bit for bit
    # The reference library reads what we write (torch for bf16, which numpy lacks) ...
    theirs = safetensors.torch.load_file(d / "ours.safetensors")
    for k, x in tensors.items():
        t = theirs[k]
        got = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
        assert got.shape == x.shape and got.tobytes() == np.asarray(x).tobytes(), k
    # ... and we read what it writes.
    plain = {k: x for k, x in tensors.items() if x.dtype != ml_dtypes.bfloat16}
    if plain:
        safetensors.numpy.save_file(plain, d / "ref.safetensors")
        g = SafetensorsFile(d / "ref.safetensors")
        for k, x in plain.items():
            y = np.asarray(g.get(k))
            assert y.shape == x.shape and y.dtype == x.dtype and y.tobytes() == np.asarray(x).tobytes(), k


# --- export / import over random model shapes and dtypes ----------------------------------------------

@st.composite
def llama_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    head_dim = draw(st.sampled_from([4, 8]))
    return dict(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                intermediate_size=draw(st.integers(3, 20)), num_hidden_layers=draw(st.integers(1, 2)), vocab_size=50,
                max_position_embeddings=32, tie_word_embeddings=draw(st.booleans()))


@pytest.mark.slow
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=llama_configs(), dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       variant=st.sampled_from(["lora", "dora", "adalora", "vera"]), r=st.integers(1, 3), seed=st.integers(0, 999))
def test_peft_and_merged_export_import_round_trip(cfg, dtype, variant, r, seed, tmp_path_factory):
    _export_round_trip(cfg, dtype, variant, r, seed, tmp_path_factory.mktemp("x"))


@settings(max_examples=3, deadline=None)
@given(cfg=llama_configs(), dtype=st.sampled_from(["float32", "bfloat16"]), variant=st.sampled_from(["lora", "dora"]),
       seed=st.integers(0, 999))
def test_peft_and_merged_export_import_round_trip_quick(cfg, dtype, variant, seed, tmp_path_factory):
    _export_round_trip(cfg, dtype, variant, 2, seed, tmp_path_factory.mktemp("x"))


def _export_round_trip(cfg, dtype, variant, r, seed, d):
    """Random Llama (transformers, saved in ``dtype``) -> adapted, trained-looking adapters -> PEFT
    export -> import: the same adapter leaves; merged export -> transformers reads it, our loader too:
    the same merged weights (rounded once to the base dtype)."""
    import torch
    import transformers as T

    from lorax_variants.hf import from_pretrained, load_peft, save_merged, save_peft

    torch.manual_seed(seed)
    hf = T.LlamaForCausalLM(T.LlamaConfig(**cfg)).to(getattr(torch, dtype))
    hf.save_pretrained(d / "base")
    model, params = from_pretrained(d / "base")
    targets = r"layers/(attn|mlp)/(q_proj|v_proj|up_proj)"
    spec = lv.AdapterSpec(targets=targets, variant=variant, r=r, alpha=4.0, stacked=model.stacked)
    tree = _perturb(lv.adapt(params, spec, jax.random.key(seed)), seed)
    save_peft(d / "peft", model, tree, base_model=str(d / "base"))
    back = load_peft(d / "peft", model, params)
    ours = dict(lv.leaves_with_paths(lv.split(tree)[0]))
    theirs = dict(lv.leaves_with_paths(lv.split(back)[0]))
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        np.testing.assert_array_equal(np.asarray(theirs[k]), np.asarray(ours[k]), err_msg=k)
    save_merged(d / "merged", model, tree)
    _, loaded = from_pretrained(d / "merged")
    want = dict(lv.leaves_with_paths(lv.merge(tree)))
    got = dict(lv.leaves_with_paths(loaded))
    assert sorted(want) == sorted(got)
    for k in want:
        assert got[k].dtype == want[k].dtype == jnp.dtype(dtype), k
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32), err_msg=k)
    tm = T.AutoModelForCausalLM.from_pretrained(d / "merged", torch_dtype=getattr(torch, dtype))
    q = tm.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q.float().numpy().T, np.asarray(want["layers/attn/q_proj"], np.float32)[0])
