"""Tiny random transformers models, saved locally, and their torch outputs (test references)."""

from __future__ import annotations

import numpy as np
import torch
import transformers as T

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

CONFIGS = {
    "llama_gqa_untied": lambda: (T.LlamaForCausalLM, T.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3_rope_tied_bias": lambda: (T.LlamaForCausalLM, T.LlamaConfig(
        **SMALL, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_linear_rope": lambda: (T.LlamaForCausalLM, T.LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral_window": lambda: (T.MistralForCausalLM, T.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4)),
    "qwen2_bias": lambda: (T.Qwen2ForCausalLM, T.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_layer_windows": lambda: (T.Qwen2ForCausalLM, T.Qwen2Config(
        **SMALL, num_key_value_heads=4, use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "qwen3_windows": lambda: (T.Qwen3ForCausalLM, T.Qwen3Config(
        **SMALL, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, use_sliding_window=True, sliding_window=3,
        max_window_layers=1, layer_types=["full_attention", "sliding_attention"])),
    "gemma3": lambda: (T.Gemma3ForCausalLM, T.Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 3}, num_key_value_heads=2, head_dim=8, sliding_window=3, query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "gemma2_softcap": lambda: (T.Gemma2ForCausalLM, T.Gemma2Config(
        **SMALL, num_key_value_heads=1, head_dim=8, sliding_window=3, query_pre_attn_scalar=8, pad_token_id=0,
        attn_logit_softcapping=0.5, final_logit_softcapping=1.5)),
    "qwen3_moe": lambda: (T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(
        **SMALL, num_key_value_heads=2, head_dim=8, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True)),
    "mixtral": lambda: (T.MixtralForCausalLM, T.MixtralConfig(
        **SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=5)),
    "gpt2": lambda: (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                     bos_token_id=0, eos_token_id=0)),
    "gpt2_untied": lambda: (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)),
    "bert_mlm": lambda: (T.BertForMaskedLM, T.BertConfig(**SMALL, max_position_embeddings=64)),
    "bert_cls": lambda: (T.BertForSequenceClassification, T.BertConfig(**SMALL, max_position_embeddings=64, num_labels=3)),
    "bert_base": lambda: (T.BertModel, T.BertConfig(**SMALL, max_position_embeddings=64)),
    "roberta_mlm": lambda: (T.RobertaForMaskedLM, T.RobertaConfig(**SMALL, max_position_embeddings=64, pad_token_id=1)),
    "roberta_cls": lambda: (T.RobertaForSequenceClassification, T.RobertaConfig(**SMALL, max_position_embeddings=64,
                                                                                 pad_token_id=1, num_labels=2)),
}


def build(name: str, directory, seed: int = 0):
    """Save a random tiny model (non-trivial norms and biases) to ``directory``; return it."""
    cls, config = CONFIGS[name]()
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))  # so a wrong norm/bias mapping shows
    model.save_pretrained(directory)
    return model


def torch_out(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def inputs(vocab: int, pad_id: int, batch: int = 3, seq: int = 12, seed: int = 0, left: bool = False):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (batch, seq))
    lengths = [seq, seq - 5, seq - 2][:batch]
    mask = np.zeros((batch, seq), np.int64)
    for b, n in enumerate(lengths):
        if left:
            mask[b, seq - n:] = 1
        else:
            mask[b, :n] = 1
    ids = np.where(mask == 1, ids, pad_id)
    return ids, mask


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]


def save_tokenizer(directory, texts, *, bert: bool = False, vocab_size: int = 96):
    """A word-level tokenizer trained on ``texts`` (ids < vocab_size), saved as transformers saves one.

    BERT style wraps a text as ``[CLS] text [SEP]``; causal style prefixes ``<s>`` (EOS ``</s>``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 4)])
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                     eos_token="</s>", cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(directory)
    return fast


_WORDS = "the a cat dog bird sat ran flew on under over mat log tree and then quickly slowly home".split()
POSITIVE = "good great lovely fine superb warm bright".split()
NEGATIVE = "bad awful dull poor grim cold boring".split()


def lm_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Sentences of a tiny grammar (a causal LM learns it quickly)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        subj, verb = rng.choice(["cat", "dog", "bird"]), rng.choice(["sat", "ran", "flew"])
        out.append(f"the {subj} {verb} {rng.choice(['on', 'under', 'over'])} the {rng.choice(['mat', 'log', 'tree'])}")
    return out


def sentiment(n: int = 120, seed: int = 0) -> list[dict]:
    """Labelled sentences: the label is which word list the adjectives come from."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pos = bool(i % 2)
        adj = POSITIVE if pos else NEGATIVE
        words = list(rng.choice(_WORDS, 4)) + list(rng.choice(adj, 2))
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "sentiment": "pos" if pos else "neg"})
    return rows


def tiny_run_model(name: str, directory, texts) -> None:
    """A tiny random HF model plus a tokenizer fitted to ``texts``, in ``directory``."""
    build(name, directory)
    save_tokenizer(directory, texts, bert=name.startswith(("bert", "roberta")))


def random_llama(directory, d: int, layers: int, texts, vocab: int = 128) -> None:
    """A random Llama of width ``d`` and ``layers`` layers (GQA, SwiGLU) with a word-level tokenizer fitted to
    ``texts``, saved in ``directory`` (the benchmarks' model)."""
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
                        num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 128),
                        intermediate_size=int(d * 8 / 3) // 64 * 64, max_position_embeddings=4096)
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).save_pretrained(directory)
    save_tokenizer(directory, texts, vocab_size=vocab)
