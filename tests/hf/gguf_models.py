"""The tiny models and assets of the GGUF tests (tests/hf/conftest.py builds them)."""

from __future__ import annotations

import os
from pathlib import Path

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
CONVERTED = [a for a in ARCHS if a != "gemma2"]  # the converter writes Gemma 2 with a SentencePiece vocabulary only
TARGETS = r"layers/(attn|mlp|moe)/(q_proj|k_proj|v_proj|o_proj|gate_proj|down_proj)"  # (moe: the expert banks)
