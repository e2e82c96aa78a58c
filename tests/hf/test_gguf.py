"""GGUF: tiny Llama and Qwen3 files written here the way llama.cpp's converter writes them (q/k rows permuted
for Llama, every quantization type), loaded by us and by transformers' own GGUF loader: the same logits.
The real SmolLM2-135M-Instruct Q4_1 file (fetched by `make`) too, with its tokenizer and chat template."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.hf.gguf import from_gguf, gguf_tokenizer
from tests.close import assert_close

Q = gguf.GGMLQuantizationType
SMALL = dict(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5)
K_LAYOUT = {Q.Q4_K: [0, 2], Q.Q6_K: [208]}  # byte offsets of each block's float16 scales (d, dmin)
ASSET = Path(os.environ.get("LORAX_ASSETS", Path(__file__).resolve().parents[2] / ".cache" / "assets"))
SMOLLM = ASSET / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _k_quant(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (gguf's Python side cannot quantize to them) with small finite scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off in K_LAYOUT[qtype]:
        raw[..., off:off + 2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, arch: str, cls, config, qtype: Q, seed: int = 0):
    """A transformers model saved as llama.cpp's converter would: names, q/k permutation (Llama), quantized."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    rng = np.random.default_rng(seed)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(256)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim) if arch == "qwen3" else None
    w.add_value_length(config.head_dim) if arch == "qwen3" else None
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(int(qtype))
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    for name, x in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("norm.weight") and "layernorm" not in name and x.ndim == 1 and "layers" in name:
            x = x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)  # q/k norms: make them matter
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            x = x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if x.ndim == 1 or qtype == Q.F32:
            w.add_tensor(target, x)
        elif qtype in K_LAYOUT:
            w.add_tensor(target, _k_quant(*x.shape, qtype, rng), raw_dtype=qtype)  # shape from the bytes
        else:
            w.add_tensor(target, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _transformers(path: Path):
    return T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


IDS = np.random.default_rng(0).integers(0, 96, (2, 9))


def _same_logits(model, params, path, ids=IDS, tol=1e-4):
    with torch.no_grad():
        ref = _transformers(path)(input_ids=torch.as_tensor(ids)).logits.numpy()
    assert_close(np.asarray(model.apply(params, jnp.asarray(ids))), ref, 2e-4)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_every_quant_type_loads_as_transformers_loads_it(tmp_path, qtype):
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", "llama", T.LlamaForCausalLM,
                      T.LlamaConfig(**SMALL, tie_word_embeddings=qtype != Q.Q8_0), qtype)
    model, params = hf.from_pretrained(path)  # the same as from_gguf
    assert model.config.tie_word_embeddings == (qtype != Q.Q8_0)
    _same_logits(model, params, path)


@pytest.mark.slow  # ~25 s (CI's `make test-slow`); the default run reads every quantization type above
def test_qwen3_file_and_nf4_while_loading(tmp_path):
    # head_dim 128: transformers' own GGUF reader takes Qwen3's head_dim from its default (ours reads key_length)
    path = write_gguf(tmp_path / "qwen3.gguf", "qwen3", T.Qwen3ForCausalLM,
                      T.Qwen3Config(**{**SMALL, "num_attention_heads": 2, "num_key_value_heads": 1}, head_dim=128,
                                    tie_word_embeddings=True), Q.Q8_0)
    model, params = from_gguf(path)
    _same_logits(model, params, path)
    spec = lv.QuantSpec(targets=r"layers/(attn|mlp)/\w+_proj", stacked=model.stacked, block_size=64)
    _, quantized = from_gguf(path, quantize=spec)  # NF4, one tensor at a time as they are dequantized
    after = lv.quantize(params, spec)
    for (path, a), (_, b) in zip(*(lv.leaves_with_paths(t) for t in (quantized, after))):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.integer):
            np.testing.assert_array_equal(a, b, err_msg=path)  # the codes: identical
        else:  # scales: a one-tensor jit and a stacked vmap may round the second-level mean 1 ulp apart
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=path)


def test_bad_files_are_refused_by_name(tmp_path):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture 'phi2' is not supported"):
        from_gguf(path)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF file"):
        from_gguf(tmp_path / "junk.gguf")


@pytest.mark.slow  # CI's `make test-slow` (about a minute: two GGUF parses of a 49k vocabulary in transformers)
def test_the_real_smollm2_file_with_its_tokenizer():
    if not SMOLLM.is_file():
        pytest.fail(f"{SMOLLM} is missing: `make assets` fetches it (pinned, checksum checked)")
    model, params = from_gguf(SMOLLM)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert lv.count_params(params).total == 134_515_008
    tok = gguf_tokenizer(SMOLLM)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    ids = np.asarray([tok(text)["input_ids"]])
    _same_logits(model, params, SMOLLM, ids=ids, tol=5e-4)  # 30 layers in fp32: relative 1e-5 of |logits| ~ 30
    out = np.asarray(model.generate(params, ids, max_new_tokens=8, stop_tokens=tok.eos_token_id))
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
