"""GGUF files for llama.cpp / Ollama: ``save_gguf`` writes the merged model of any adapted tree.

Written with the ``gguf`` package's ``GGUFWriter`` the way llama.cpp's own converter
(``convert_hf_to_gguf.py``) writes a transformers checkpoint, so that llama.cpp reads our file as it reads its
own (the tests run that converter on our merged transformers export and require the same tensors, byte for
byte, and the same metadata):

- the architecture's hyperparameters under ``<arch>.*``; Mistral and Mixtral are written as ``llama``, as
  llama.cpp's converter does;
- tensor names through gguf's ``TensorNameMap``; llama.cpp's row permutation of q and k for the ``llama``
  architecture (its RoPE pairs neighbouring dimensions; transformers' pairs halves):
  ``w.reshape(heads, 2, d/heads/2, in).swapaxes(1, 2).reshape(d, in)`` (key-value heads for k);
  Llama 3.1's RoPE scaling as the ``rope_freqs`` factors tensor; each layer's experts (Qwen3-MoE as
  ``qwen3moe``, Mixtral as ``llama``) stacked into one ``[E, out, in]`` tensor per projection;
- tensor types as the converter chooses them: vectors, norms and MoE routers in F32, every other weight in the file type,
  a weight whose rows are not a whole number of quantization blocks in F16;
- the tokenizer: copied field for field from a GGUF file (the base model's, when it was loaded from one),
  or built from a transformers tokenizer directory as the converter builds it: SentencePiece
  (``tokenizer.model``: pieces, scores, types, added tokens; for the architectures whose converter reads it
  first) or BPE (``tokenizer.json``):
  tokens and their types, merges, special token ids, ``add_bos_token``/``add_eos_token`` and the chat
  template (gguf's ``SpecialVocab``), and ``tokenizer.ggml.pre``, the pre-tokenizer llama.cpp must apply,
  recognized as the converter recognizes it (a hash of the tokenization of a fixed text; ``pre=`` names it
  for a tokenizer this table does not know).

File types: ``f32``, ``f16``, ``bf16`` and ``q8_0`` (the converter's own), and ``q4_0``, ``q4_1``, ``q5_0``,
``q5_1`` (the other block types the ``gguf`` package can quantize to; applied to every weight matrix
alike, where llama.cpp's ``llama-quantize`` would pick some types per tensor). The K-quants and I-quants
are not written: the ``gguf`` package can only read them (quantize with llama.cpp's ``llama-quantize``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lorax_variants.hf.convert import to_hf
from lorax_variants.hf.gguf import ARCHITECTURES, NORM_SHIFT, expert_split, tensor_name_map
from lorax_variants.hf.peft import _adapter_nodes, _module_list
from lorax_variants.hf.safetensors_io import atomic_file
from lorax_variants.ops import as_lora, merge, one_adapter

__all__ = ["save_gguf", "save_gguf_lora", "FILE_TYPES", "GGUF_ARCHITECTURES"]

# our model_type -> GGUF architecture (whether llama.cpp permutes its q/k rows, and its norm shift, are the
# reader's tables: ARCHITECTURES, NORM_SHIFT)
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                      "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3"}

# file type name -> (tensor type of the weight matrices, general.file_type)
FILE_TYPES = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}

# llama.cpp's converter identifies a BPE tokenizer's pre-tokenizer by the sha256 of str(token ids of this text)
# (convert_hf_to_gguf.py, get_vocab_base_pre); these are its entries for the families we load.
_CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
               '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
               '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
               '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 .. Qwen3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}


def save_gguf(path: str | os.PathLike, model: Any, tree: Any, *, file_type: str = "f16",
              tokenizer: str | os.PathLike | None = None, pre: str | None = None, name: str | None = None,
              rank: int | None = None, task: int | None = None, adapter: str | None = None,
              overwrite: bool = False) -> Path:
    """Merge ``tree``'s adapters into its weights and write one GGUF file llama.cpp runs.

    ``file_type``: one of ``FILE_TYPES``. ``tokenizer``: a GGUF file whose ``tokenizer.*`` fields are copied,
    or a transformers tokenizer directory (BPE, ``tokenizer.json``); default: the GGUF file the model was
    loaded from. ``pre``: the llama.cpp pre-tokenizer name, for a BPE tokenizer whose hash is not known here.
    ``name``: ``general.name``. ``rank``/``task``/``adapter``: as ``save_merged``.
    """
    import gguf

    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type {file_type!r} is not one gguf can write; choose from {sorted(FILE_TYPES)} "
                         "(K-quants and I-quants: quantize our f16 file with llama.cpp's llama-quantize)")
    arch, permute = _architecture(model)
    source = _tokenizer_source(model, tokenizer)

    if adapter is not None:
        tree = one_adapter(tree, adapter)
    params = jax.device_get(merge(as_lora(tree, rank=rank, task=task)))
    tensors = to_hf(model, params)
    hp = model.hf_config.to_dict()

    w = gguf.GGUFWriter(None, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or _default_name(model, source))
    _hyperparameters(w, arch, hp, FILE_TYPES[file_type][1])
    if isinstance(source, Path) and source.suffix == ".gguf":
        _copy_tokenizer(w, source)
    else:
        _directory_tokenizer(w, Path(source), hp, arch, pre)
    if arch == "gemma3":  # the converter cuts the embedding to the tokenizer's real size (Gemma3Model.modify_tensors)
        embed = tensors["model.embed_tokens.weight"]
        tensors["model.embed_tokens.weight"] = embed[:_real_vocab(source, hp)]
    _tensors(w, arch, permute, hp, tensors, FILE_TYPES[file_type][0])
    return _write(w, out)


def _real_vocab(source: Path, hp: dict[str, Any]) -> int:
    """How many tokens the tokenizer has (the rows of Gemma 3's embedding llama.cpp keeps): the SentencePiece
    vocabulary as written, ``tokenizer.json``'s vocabulary plus its added tokens, or a GGUF file's token list."""
    if source.suffix == ".gguf":
        import gguf

        return len(gguf.GGUFReader(str(source)).fields["tokenizer.ggml.tokens"].data)
    if (source / "tokenizer.model").is_file():
        return len(_spm_vocab(source, hp)[0])
    data = json.loads((source / "tokenizer.json").read_text())
    return len(data["model"]["vocab"]) + len(data["added_tokens"])


def save_gguf_lora(path: str | os.PathLike, model: Any, tree: Any, *, file_type: str = "f32",
                   name: str | None = None, rank: int | None = None, task: int | None = None,
                   adapter: str | None = None, overwrite: bool = False) -> Path:
    """Write ``tree``'s adapters as a llama.cpp LoRA adapter file (``llama-cli -m base.gguf --lora this.gguf``).

    For LoRA and every variant that reduces to it (``as_lora``: rsLoRA, LoRA-FA, PiSSA's and OLoRA's factors
    over their residual base, VeRA, AdaLoRA, DyLoRA at ``rank``, SoRA, a multi-task ``task``, ...). Written as
    llama.cpp's ``convert_lora_to_gguf.py`` writes a PEFT LoRA: per adapted weight ``<gguf name>.lora_a``
    ``[r, in]`` and ``.lora_b`` ``[out, r]`` (q/k rows permuted for the ``llama`` architecture) and
    ``adapter.lora.alpha``; llama.cpp scales each product by alpha / r. Where the adapters do not share one
    scale and rank (rsLoRA's alpha/√r with per-layer ranks, EVA's ranks) the scale is folded into ``lora_b`` and
    alpha is 0, which llama.cpp reads as a scale of 1. Variants that do not reduce to a low-rank product
    (DoRA's magnitude, HiRA, MiSS, SHiRA, Delta-LoRA's moved base) are refused: export them merged
    (``save_gguf``). The base GGUF must hold the same base weights the adapters were trained over (for
    QLoRA: the dequantized base, e.g. ``save_gguf`` of the unadapted tree).
    """
    import gguf

    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if file_type not in ("f32", "f16", "bf16", "q8_0"):
        raise ValueError(f"file_type {file_type!r}: a GGUF LoRA adapter is written in f32, f16, bf16 or q8_0")
    arch, permute = _architecture(model)
    if adapter is not None:
        tree = one_adapter(tree, adapter)
    nodes = _adapter_nodes(as_lora(tree, rank=rank, task=task))
    if not nodes:
        raise ValueError("save_gguf_lora: the tree has no adapter nodes")
    for p, n in nodes:
        if getattr(type(n), "variant", None) != "lora":  # (what as_lora leaves otherwise does not reduce)
            raise ValueError(f"{p}: a {type(n).__name__} does not reduce to LoRA, so llama.cpp's LoRA format cannot "
                             "hold it; export the merged model (save_gguf / --format gguf)")
        if n.lora_a.ndim > 3:
            raise ValueError(f"{p}: expert-bank adapters are not written as GGUF LoRA; export the merged model")
        if p.rsplit("/", 1)[-1] in ("embed", "lm_head"):
            raise ValueError(f"{p}: adapters on the embedding or the head are not written as GGUF LoRA here; export "
                             "the merged model")
    scales = {(float(n.scale), int(n.lora_a.shape[-1])) for _, n in nodes}
    fold = len(scales) > 1
    alpha = 0.0 if fold else next(iter(scales))[0] * next(iter(scales))[1]
    hp = model.hf_config.to_dict()
    heads = hp["num_attention_heads"]
    kv_heads = hp.get("num_key_value_heads") or heads
    tmap = tensor_name_map(arch, hp["num_hidden_layers"])
    qtype = gguf.GGMLQuantizationType[FILE_TYPES[file_type][0]]

    w = gguf.GGUFWriter(None, arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_name(name or "adapter")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)  # (no general.file_type: the converter writes none here)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pairs = {}
    for p, n in nodes:
        a = np.asarray(jax.device_get(n.lora_a), np.float32)
        b = np.asarray(jax.device_get(n.lora_b), np.float32) * (float(n.scale) if fold else 1.0)
        if a.ndim == 2:
            a, b = a[None], b[None]
        for i, module in enumerate(_module_list(model, p, a.shape[0])):
            lb = b[i].T  # [out, r]
            if permute and module.endswith(("q_proj", "k_proj")):
                h = heads if module.endswith("q_proj") else kv_heads
                lb = _permute(lb, h)
            theirs = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
            if theirs is None:
                raise ValueError(f"{p}: no GGUF name for {module} in llama.cpp's {arch} table")
            pairs[theirs] = (np.ascontiguousarray(a[i].T), np.ascontiguousarray(lb))
    for theirs in sorted(pairs):
        _add(w, theirs + ".lora_a", pairs[theirs][0], qtype)
        _add(w, theirs + ".lora_b", pairs[theirs][1], qtype)
    return _write(w, out)


def _architecture(model: Any) -> tuple[str, bool]:
    """The GGUF architecture ``model`` is written as, and whether llama.cpp permutes its q/k rows."""
    mt = model.config.model_type
    if mt not in GGUF_ARCHITECTURES:
        raise ValueError(f"{mt}: no GGUF export for this architecture; supported: {sorted(GGUF_ARCHITECTURES)}")
    if mt == "qwen3_moe" and not model.hf_config.norm_topk_prob:
        raise ValueError("qwen3_moe with norm_topk_prob=False: llama.cpp's qwen3moe always renormalizes the top-k "
                         "router weights, so it would run a different model; no GGUF export")
    return GGUF_ARCHITECTURES[mt], ARCHITECTURES[GGUF_ARCHITECTURES[mt]]


def _write(w: Any, out: Path) -> Path:
    """The writer's file, atomically (a temporary file beside ``out``, renamed when whole)."""

    def write(tmp: Path) -> None:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()

    return atomic_file(out, write)


def _tokenizer_source(model: Any, tokenizer: Any) -> Path:
    src = tokenizer if tokenizer is not None else getattr(model, "gguf_path", None)
    if src is None:
        raise ValueError("save_gguf needs the tokenizer: tokenizer= a GGUF file or a transformers tokenizer "
                         "directory (the base model's)")
    p = Path(src)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer {p}: no such GGUF file")
        return p
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
        raise ValueError(f"tokenizer {p}: no tokenizer.json or tokenizer.model there (a transformers tokenizer "
                         "directory or a .gguf file is needed)")
    return p


def _default_name(model: Any, source: Path) -> str:
    return source.stem if source.suffix == ".gguf" else source.name


def _hyperparameters(w: Any, arch: str, hp: dict[str, Any], file_type: str) -> None:
    """As convert_hf_to_gguf.py's TextModel.set_gguf_parameters (plus LlamaModel's for ``llama``; Gemma 2's
    and Gemma 3's own)."""
    import gguf

    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads") or hp["num_attention_heads"])
    if arch == "gemma2":  # Gemma2Model.set_gguf_parameters (no RoPE base: llama.cpp's default 10000)
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
        w.add_file_type(getattr(gguf.LlamaFileType, file_type))
        w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        w.add_sliding_window(hp["sliding_window"])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        return
    rope = _rope(hp)
    kind = rope.get("rope_type")
    if kind == "linear" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind not in (None, "default", "llama3", "dynamic"):
        raise ValueError(f"rope_type {kind!r}: llama.cpp has no equivalent we can write")
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])
    local = (hp.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
    if local is not None:
        w.add_rope_freq_base_swa(local)
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    experts = hp.get("num_local_experts") or hp.get("num_experts")
    if experts:  # Mixtral, Qwen3-MoE
        w.add_expert_count(experts)
        w.add_expert_used_count(hp["num_experts_per_tok"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(getattr(gguf.LlamaFileType, file_type))
    if arch == "gemma3":  # Gemma3Model.set_gguf_parameters, after the base's
        w.add_context_length(hp.get("max_position_embeddings", 131072))
        w.add_head_count(hp.get("num_attention_heads", 8))
        w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
        w.add_key_length(hp.get("head_dim", 256))
        w.add_value_length(hp.get("head_dim", 256))
        w.add_rope_freq_base(rope.get("rope_theta") or 1_000_000.0)
        if hp.get("attn_logit_softcapping") is not None:
            raise ValueError("gemma3 with attn_logit_softcapping: llama.cpp's gemma3 has no attention soft cap")
        if hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        if hp.get("sliding_window_pattern") != 1:
            w.add_sliding_window(hp["sliding_window"])
        w.add_head_count_kv(hp.get("num_key_value_heads", 4))
    if arch == "qwen3moe":  # Qwen2MoeModel.set_gguf_parameters
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    if arch == "llama":
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope(hp: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in ``rope_parameters`` (older configs: ``rope_scaling`` and
    ``rope_theta``); per layer type for Gemma 3 (the global layers' here, as the converter reads them)."""
    rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    rope.setdefault("rope_theta", hp.get("rope_theta"))
    return rope


def _llama3_factors(hp: dict[str, Any]) -> np.ndarray | None:
    """Llama 3.1's per-frequency RoPE factors, as the converter writes them (``rope_freqs.weight``)."""
    rope = _rope(hp)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta") or 10000.0
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    import torch  # the converter computes them in torch float32; so do we, to match it bit for bit

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def _tensors(w: Any, arch: str, permute: bool, hp: dict[str, Any], tensors: dict[str, np.ndarray],
             qtype_name: str) -> None:
    """As convert_hf_to_gguf.py's prepare_tensors: names, q/k permutation, the type of each tensor."""
    import gguf

    tmap = tensor_name_map(arch, hp["num_hidden_layers"])
    heads = hp["num_attention_heads"]
    kv_heads = hp.get("num_key_value_heads") or heads
    qtype = gguf.GGMLQuantizationType[qtype_name]
    shift = NORM_SHIFT.get(arch, 0.0)  # Gemma: llama.cpp multiplies by w, Gemma's RMSNorm by 1 + w
    tensors = _stack_experts(tensors)
    for name in sorted(tensors):
        x = np.asarray(tensors[name], np.float32)
        if shift and name.endswith("norm.weight"):
            x = x + np.float32(shift)
        if name == "lm_head.weight" and arch == "gemma2":  # llama.cpp's gemma2 always ties the head
            embed = tensors.get("model.embed_tokens.weight")
            if embed is None or not np.array_equal(np.asarray(embed, np.float32), x):
                raise ValueError("gemma2: llama.cpp's gemma2 ties the head to the embedding, and this model's head "
                                 "differs from it (an adapted or trained head): it cannot be written as gemma2 GGUF")
            continue  # the converter skips it too
        if permute and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            n = heads if ".q_proj." in name else kv_heads
            x = _permute(x, n)
        theirs = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if theirs is None:
            raise ValueError(f"tensor {name}: no GGUF name for it in llama.cpp's {arch} table")
        _add(w, theirs, x, qtype)
    factors = _llama3_factors(hp)
    if factors is not None:
        _add(w, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors, qtype)


def _stack_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each layer's per-expert weights (``...experts.<e>.<proj>.weight``) as one ``[E, out, in]`` tensor under
    the name without the index, as the converter stacks them before it maps names."""
    out: dict[str, Any] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, x in tensors.items():
        stacked, e = expert_split(name)
        if e is None:
            out[name] = x
        else:
            stacks.setdefault(stacked, {})[e] = x
    for name, by_expert in stacks.items():
        out[name] = np.stack([np.asarray(by_expert[e], np.float32) for e in range(len(by_expert))])
    return out


def _permute(x: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for the ``llama`` architecture (rows ``[heads, 2, d/heads/2]`` -> ``[heads,
    d/heads/2, 2]``); ``GGUFTensors`` undoes it."""
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _add(w: Any, name: str, x: np.ndarray, qtype: Any) -> None:
    import gguf

    t = qtype
    if (x.ndim <= 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight"))  # (the router: F32, as the converter)
            or not name.endswith((".weight", ".lora_a", ".lora_b"))):
        t = gguf.GGMLQuantizationType.F32
    try:
        data = gguf.quants.quantize(x, t)
    except gguf.QuantError:  # rows not a whole number of blocks: the converter's fallback
        t = gguf.GGMLQuantizationType.F16
        data = gguf.quants.quantize(x, t)
    w.add_tensor(name, data, raw_dtype=t)


def _copy_tokenizer(w: Any, path: Path) -> None:
    """Every ``tokenizer.*`` field of a GGUF file, as it is there."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = [f for k, f in reader.fields.items() if k.startswith("tokenizer.")]
    if not any(f.name == "tokenizer.ggml.tokens" for f in fields):
        raise ValueError(f"tokenizer {path}: this GGUF file holds no tokenizer (no tokenizer.ggml.tokens)")
    for f in fields:
        kind = f.types[0]
        sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), kind, sub_type=sub)


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


# GGUF architectures whose converter reads a SentencePiece ``tokenizer.model`` when the directory has one (Llama's,
# Mistral's, Mixtral's, Qwen 2/3's and Gemma's converters; Qwen3-MoE's never does). Gemma 2's converter reads nothing
# else; we also write a Gemma 2 with a BPE tokenizer (llama.cpp takes any vocabulary with any architecture).
_SPM_FIRST = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")


def _directory_tokenizer(w: Any, directory: Path, hp: dict[str, Any], arch: str, pre: str | None) -> None:
    """The tokenizer of a transformers directory as the converter's ``set_vocab`` writes it: SentencePiece
    (``tokenizer.model``) where that architecture's converter reads it first, else BPE (``tokenizer.json``)."""
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if arch == "llama" and config.get("add_prefix_space") is not None:
        w.add_add_space_prefix(config["add_prefix_space"])
    spm = (directory / "tokenizer.model").is_file()
    if spm and arch in _SPM_FIRST:
        _spm_tokenizer(w, directory, hp)
        if arch in ("gemma2", "gemma3"):
            w.add_add_space_prefix(False)
    else:
        if not (directory / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer {directory}: no tokenizer.json there (a BPE tokenizer directory, a "
                             "SentencePiece tokenizer.model or a .gguf file is needed)")
        _bpe_tokenizer(w, directory, hp, arch, pre)
    if arch == "llama" and hp.get("vocab_size") == 49152:
        w.add_add_bos_token(False)  # the converter's rule for this vocabulary (Granite's and SmolLM's: no BOS)


def _spm_vocab(directory: Path, hp: dict[str, Any]) -> tuple[list[bytes], list[float], list[int]]:
    """convert_hf_to_gguf.py's _create_vocab_sentencepiece: pieces, scores and types of ``tokenizer.model``,
    then ``added_tokens.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder``, padded to vocab_size."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise ImportError(f"tokenizer {directory}: reading its SentencePiece tokenizer.model needs the sentencepiece "
                          "package (pip install sentencepiece), or pass the base model's GGUF file") from None
    T = gguf.TokenType  # (the converter's SentencePieceTokenTypes: the same values)
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(directory / "tokenizer.model"))
    vocab_size = hp.get("vocab_size") or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [T.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        kind = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.UNUSED if sp.IsUnused(i)
                else T.BYTE if sp.IsByte(i) else T.NORMAL)
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), kind
    added_file = directory / "added_tokens.json"
    for text, i in (json.loads(added_file.read_text()) if added_file.is_file() else {}).items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text.encode(), -1000.0, T.USER_DEFINED
    config_file = directory / "tokenizer_config.json"
    decoder = json.loads(config_file.read_text()).get("added_tokens_decoder", {}) if config_file.is_file() else {}
    for key, data in decoder.items():
        i, text = int(key), data["content"]
        if i >= vocab_size:
            continue
        if data.get("special") or _looks_special(text):
            types[i] = T.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = T.USER_DEFINED
        scores[i], tokens[i] = -1000.0, text.encode()
    return tokens, scores, types


def _spm_tokenizer(w: Any, directory: Path, hp: dict[str, Any]) -> None:
    """convert_hf_to_gguf.py's _set_vocab_sentencepiece."""
    import gguf

    tokens, scores, types = _spm_vocab(directory, hp)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _bpe_tokenizer(w: Any, directory: Path, hp: dict[str, Any], arch: str, pre: str | None) -> None:
    """convert_hf_to_gguf.py's _set_vocab_gpt2 (get_vocab_base + SpecialVocab) for a transformers tokenizer."""
    import gguf
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model_kind = json.loads((directory / "tokenizer.json").read_text()).get("model", {}).get("type")
    if model_kind != "BPE":
        raise ValueError(f"tokenizer {directory}: a {model_kind} tokenizer; only BPE tokenizers are written from "
                         "a transformers directory (pass the base model's GGUF file as tokenizer=)")
    vocab = tok.get_vocab()
    vocab_size = hp.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer {directory}: token id {max(vocab.values())} >= the model's vocab_size "
                         f"{vocab_size}")
    if pre is None:
        digest = hashlib.sha256(str(tok.encode(_CHECK_TEXT)).encode()).hexdigest()
        pre = _PRE_TOKENIZERS.get(digest)
        if pre is None:
            raise ValueError(f"tokenizer {directory}: its pre-tokenizer (hash {digest}) is not one this exporter "
                             "knows; pass pre= the llama.cpp name (tokenizer.ggml.pre, e.g. 'llama-bpe')")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True).add_to_gguf(w, quiet=True)
