"""Quantization against bitsandbytes (CPU), round trips, byte counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bitsandbytes import functional as F
from bitsandbytes.backends.utils import _get_4bit_code
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax_variants as lv
from lorax_variants.quant import DYNAMIC_CODE, NF4_CODE, QuantSpec, quantize_array
from tests.close import assert_close


def test_code_tables_equal_bitsandbytes():
    np.testing.assert_array_equal(NF4_CODE, _get_4bit_code("nf4", torch.device("cpu")).numpy())
    np.testing.assert_array_equal(DYNAMIC_CODE, F.create_dynamic_map(signed=True).numpy())


def _bnb(w_torch, double):
    q, state = F.quantize_4bit(w_torch, blocksize=64, compress_statistics=double, quant_type="nf4")
    return q.numpy().reshape(-1), state, F.dequantize_4bit(q, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 128), (40, 320), (100, 64), (256, 512)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nf4_double_quant_equals_bitsandbytes(dtype, shape, seed):
    torch.manual_seed(seed)
    w_torch = (torch.randn(shape) * 0.05).to(dtype)  # torch layout [out, in]
    codes, state, deq = _bnb(w_torch, double=True)
    w = jnp.asarray(w_torch.float().numpy().T).astype(jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)
    node = quantize_array(w, QuantSpec(targets="w"))
    # 4-bit codes, two per byte, high nibble first, blocks of 64 along the input axis: identical.
    np.testing.assert_array_equal(np.asarray(node.codes).T.reshape(-1), codes)
    # Double quantization. Offset and second-level scales: equal up to the last bits of torch's
    # float32 mean (its summation order is not correctly rounded).
    np.testing.assert_allclose(float(node.offset), float(state.offset), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(node.absmax2), state.state2.absmax.numpy(), rtol=1e-6)
    # 8-bit codes of absmax - mean: ours are the nearest code; bitsandbytes' CPU kernel finds the
    # bracket with an approximate bucket lookup (BinSearch "Direct2") and in about 0.1% of cases
    # lands one code away, on a farther code. So: nearly all identical, every difference one step,
    # and ours never farther from the value than theirs.
    ours_q8 = np.asarray(node.qabsmax).T.reshape(-1).astype(int)
    theirs_q8 = state.absmax.numpy().astype(int)
    same = ours_q8 == theirs_q8
    assert same.mean() >= 0.99 and np.all(np.abs(ours_q8 - theirs_q8) <= 1)
    scale2 = np.repeat(state.state2.absmax.numpy(), 256)[: ours_q8.size]
    _, absmax1 = torch.ops.bitsandbytes.quantize_4bit.default(w_torch, 64, "nf4", torch.uint8)
    value = (absmax1.numpy() - np.float32(state.offset)) / scale2
    assert np.all(np.abs(value - DYNAMIC_CODE[ours_q8]) <= np.abs(value - DYNAMIC_CODE[theirs_q8]) + 1e-7)
    # Dequantized weights: identical in every block whose scale code agrees.
    ours = np.asarray(node.dequantize()).T.reshape(-1, 64).astype(np.float32)
    ref = deq.float().numpy().reshape(-1, 64)
    assert_close(ours[same], ref[same], 2e-6)
    assert node.dequantize().dtype == w.dtype


def test_nf4_single_quant_equals_bitsandbytes():
    torch.manual_seed(3)
    w_torch = torch.randn(64, 192)
    codes, state, deq = _bnb(w_torch, double=False)
    node = quantize_array(jnp.asarray(w_torch.numpy().T), QuantSpec(targets="w", double_quant=False))
    np.testing.assert_array_equal(np.asarray(node.codes).T.reshape(-1), codes)
    np.testing.assert_array_equal(np.asarray(node.absmax).T.reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(node.dequantize()).T, deq.numpy())


def test_ties_go_to_the_lower_code_as_bucketize():
    mid = (NF4_CODE[7] + NF4_CODE[8]) / 2  # exactly between codes 7 and 8
    w = np.zeros((64, 1), np.float32)
    w[0, 0], w[1, 0] = 1.0, mid  # absmax 1: the scaled value is exactly the midpoint
    node = quantize_array(jnp.asarray(w), QuantSpec(targets="w", double_quant=False))
    assert int(node.codes[0, 0]) & 0xF == 7
    ref = torch.bucketize(torch.tensor([mid]), torch.tensor((NF4_CODE[:-1] + NF4_CODE[1:]) / 2))
    assert int(ref) == 7


@pytest.mark.parametrize("kind, qmax", [("int4", 7), ("int8", 127)])
@settings(max_examples=3)  # every new shape compiles: a few shapes per kind (the default run is time-boxed)
@given(rows=st.integers(1, 4), cols=st.integers(1, 9), seed=st.integers(0, 2**16), double=st.booleans())
def test_symmetric_int_round_trip_error_is_at_most_half_a_step(kind, qmax, rows, cols, seed, double):
    w = np.random.default_rng(seed).standard_normal((rows * 32, cols)).astype(np.float32)
    node = quantize_array(jnp.asarray(w), QuantSpec(targets="w", kind=kind, block_size=32, double_quant=double))
    back = np.asarray(node.dequantize())
    absmax = np.abs(w.reshape(rows, 32, cols)).max(axis=1, keepdims=True)
    if double:  # the scale itself is stored in 8 bits: q·ŝ - w = (q·s - w) + q·(ŝ - s)
        flat = DYNAMIC_CODE[np.asarray(node.qabsmax).T.reshape(-1)].reshape(-1)
        blocks = np.repeat(np.asarray(node.absmax2), 256)[: flat.size]
        absmax_hat = (flat * blocks + float(node.offset)).reshape(cols, rows).T[:, None, :]
    else:
        absmax_hat = absmax
    bound = absmax / qmax / 2 + np.abs(absmax_hat - absmax) + 1e-6
    assert np.all(np.abs(back - w).reshape(rows, 32, cols) <= bound)
    if kind == "int4":
        assert node.codes.shape == (rows * 16, cols) and node.codes.dtype == jnp.uint8


def test_int8_exact_on_grid_values():
    grid = np.arange(-127, 128, 2, dtype=np.float32)[:64].reshape(64, 1) / 127.0
    grid[0] = 1.0  # absmax 1 -> step 1/127
    node = quantize_array(jnp.asarray(grid), QuantSpec(targets="w", kind="int8", double_quant=False))
    assert_close(np.asarray(node.dequantize()), grid, 2e-7)


def test_nf4_double_quant_bits_per_weight():
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    node = jax.eval_shape(lambda w: quantize_array(w, QuantSpec(targets="w")), w)
    bits = 8 * lv.tree_bytes(node) / (4096 * 4096)
    assert 4.12 < bits <= 4.13
    assert lv.count_params({"w": node}).frozen == 4096 * 4096


def test_stacked_layers_quantize_per_layer():
    w = jax.random.normal(jax.random.key(0), (3, 128, 16))
    tree = lv.quantize({"layers": {"w": w}}, QuantSpec(targets="layers/w", stacked="layers/.*"))
    node = tree["layers"]["w"]
    assert node.shape == (3, 128, 16) and node.codes.shape == (3, 64, 16) and node.offset.shape == (3,)
    for i in range(3):
        np.testing.assert_array_equal(node.dequantize()[i], quantize_array(w[i], QuantSpec(targets="w")).dequantize())


def test_errors_name_the_path():
    p = {"a": jnp.ones((100, 8)), "b": jnp.ones((64, 8)), "v": jnp.ones(8)}
    with pytest.raises(ValueError, match=r"a: input dimension 100 is not a multiple of QuantSpec.block_size=64"):
        lv.quantize(p, QuantSpec(targets="a"))
    with pytest.raises(ValueError, match=r"matched no leaf"):
        lv.quantize(p, QuantSpec(targets="c"))
    with pytest.raises(ValueError, match=r"v: quantization targets must be weights \[in, out\], got shape \(8,\)"):
        lv.quantize(p, QuantSpec(targets="v"))
    q = lv.quantize(p, QuantSpec(targets="b"))
    with pytest.raises(ValueError, match="b is already a QuantizedNode"):
        lv.quantize(q, QuantSpec(targets="b"))
    with pytest.raises(ValueError, match=r"b/codes: quantized weights cannot be trained"):
        lv.split(q, extra=r"b/.*")
    with pytest.raises(ValueError, match="QuantSpec.kind"):
        QuantSpec(targets="b", kind="fp4")


def test_quantizing_an_adapter_target_quantizes_its_residual_weight():
    w = jax.random.normal(jax.random.key(0), (128, 32))
    pissa = lv.adapt({"w": w}, lv.AdapterSpec(targets="w", r=4, init="pissa"), 0)
    q = lv.quantize(pissa, QuantSpec(targets="w"))
    assert isinstance(q["w"], lv.LoraNode) and isinstance(q["w"].weight, lv.QuantizedNode)
    # PiSSA + NF4 residual reconstructs W better than NF4 of W itself (the point of PiSSA/QLoRA).
    direct = quantize_array(w, QuantSpec(targets="w")).dequantize()
    assert np.abs(lv.merge(q)["w"] - w).mean() < np.abs(direct - w).mean()
