"""The tiny models and assets of the GGUF tests (tests/hf/conftest.py builds them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import transformers as T

ASSET = Path(os.environ.get("LORAX_ASSETS", Path(__file__).resolve().parents[2] / ".cache" / "assets"))
SMOLLM = ASSET / "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER = ASSET / "llama.cpp" / "convert_hf_to_gguf.py"
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
ARCHS = {
    "llama": lambda v: (T.LlamaForCausalLM, T.LlamaConfig(vocab_size=v, **COMMON, tie_word_embeddings=True)),
    "llama31": lambda v: (T.LlamaForCausalLM, T.LlamaConfig(vocab_size=v, **COMMON, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))),
    # head_dim 128: transformers' GGUF reader takes Qwen3's head_dim from its default, not from key_length
    "qwen3": lambda v: (T.Qwen3ForCausalLM, T.Qwen3Config(vocab_size=v, **COMMON, head_dim=128, tie_word_embeddings=False)),
    "mistral": lambda v: (T.MistralForCausalLM, T.MistralConfig(vocab_size=v, **COMMON, tie_word_embeddings=False)),
    # Gemma: head_dim = query_pre_attn_scalar (llama.cpp scales queries by 1/sqrt(head_dim) below 27B, transformers'
    # GGUF reader leaves query_pre_attn_scalar at 256); a window shorter than the test's sequences
    "gemma2": lambda v: (T.Gemma2ForCausalLM, T.Gemma2Config(vocab_size=v, **COMMON, head_dim=256, query_pre_attn_scalar=256,
                                                            sliding_window=4)),
    "gemma3": lambda v: (T.Gemma3ForCausalLM, T.Gemma3TextConfig(vocab_size=v, **COMMON, head_dim=256,
                                                                query_pre_attn_scalar=256, sliding_window=4)),
    # mixture of experts: llama.cpp stacks each layer's experts into one tensor (Mixtral is written as llama)
    "qwen3_moe": lambda v: (T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(
        vocab_size=v, **COMMON, head_dim=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, tie_word_embeddings=False)),
    "mixtral": lambda v: (T.MixtralForCausalLM, T.MixtralConfig(vocab_size=v, **COMMON, num_local_experts=4,
                                                                num_experts_per_tok=2, tie_word_embeddings=False)),
}
# Gemma 3 with an embedding padded past its tokenizer (as Gemma 3's own: the converter cuts the extra rows)
ARCHS["gemma3_padded"] = lambda v: ARCHS["gemma3"](v + 64)
CONVERTED = [a for a in ARCHS if a != "gemma2"]  # the converter writes Gemma 2 with a SentencePiece vocabulary only
TARGETS = r"layers/(attn|mlp|moe)/(q_proj|k_proj|v_proj|o_proj|gate_proj|down_proj)"  # (moe: the expert banks)


SPM_TEXT = ["The quick brown fox jumps over the lazy dog. 3 + 4 = 7. Paris is the capital of France."] * 20 + [
    f"hello world {i} apples and oranges, {i * 7} pears" for i in range(100)]


def spm_tokenizer(directory: Path, kind: str) -> Any:
    """A SentencePiece BPE tokenizer (byte fallback, 400 pieces) trained here, saved as transformers saves a
    Llama or Gemma tokenizer plus its ``tokenizer.model`` (what llama.cpp's converter reads)."""
    import shutil

    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "spm.txt"
    text.write_text("\n".join(SPM_TEXT))
    ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1) if kind == "llama" else dict(pad_id=0, eos_id=1, bos_id=2,
                                                                                       unk_id=3)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(directory / "spm"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   minloglevel=2, **ids)
    shutil.copy(directory / "spm.model", directory / "tokenizer.model")
    tok = (T.LlamaTokenizer if kind == "llama" else T.GemmaTokenizer).from_pretrained(str(directory))
    tok.save_pretrained(directory)
    for f in ("spm.txt", "spm.model", "spm.vocab"):
        (directory / f).unlink()
    return tok


def spm_model(directory: Path, arch: str) -> tuple[Any, Any, Any]:
    """``(tokenizer, model, params)``: a tiny random ``arch`` model saved in ``directory`` with a SentencePiece
    tokenizer (``spm_tokenizer``; Gemma's special ids for the Gemma architectures), read back with our loader."""
    import torch

    from lorax_variants.hf import from_pretrained

    tok = spm_tokenizer(directory, "llama" if arch == "llama" else "gemma")
    cls, config = ARCHS[arch](len(tok))
    torch.manual_seed(0)
    cls(config).save_pretrained(directory)
    return (tok, *from_pretrained(directory))
