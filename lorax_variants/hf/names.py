"""Our param paths <-> transformers' tensor names, per architecture.

Each table maps a path of ``model.shapes()`` to ``(hf_name, kind)``: ``{i}`` in a name is the
layer index of a stacked leaf, ``{e}`` the expert index of an expert bank (``[L, E, in, out]``); kind ``linear`` is a torch ``nn.Linear`` weight stored
``[out, in]`` (transposed to our ``[in, out]``), ``plain`` is stored as is (embeddings, norms,
biases, GPT-2's Conv1D kernels, which are already ``[in, out]``).

``ignorable(model)`` lists buffers that checkpoints may carry and that hold no parameters;
``tied(model)`` lists tensors that must equal one of ours when present (tied heads).
"""

from __future__ import annotations

import re
from typing import Any

import jax

__all__ = ["table", "ignorable", "tied", "untied_head", "prefix_of", "shape_items"]


def shape_items(shapes: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """``(path, shape)`` for every leaf of a ``model.shapes()`` tree (shapes are tuples)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    return [("/".join(str(k.key) for k in kp), s) for kp, s in flat]


def _paths(shapes: dict[str, Any]) -> list[str]:
    return [p for p, _ in shape_items(shapes)]


def _module(name: str) -> tuple[str, str]:
    """``q_proj`` -> (``q_proj``, ``weight``); ``q_proj_bias`` -> (``q_proj``, ``bias``)."""
    return (name[: -len("_bias")], "bias") if name.endswith("_bias") else (name, "weight")


def _llama(model: Any, prefix: str) -> dict[str, tuple[str, str]]:
    L = prefix + "layers.{i}."
    out = {
        "embed": (prefix + "embed_tokens.weight", "plain"),
        "final_norm": (prefix + "norm.weight", "plain"),
        "lm_head": ("lm_head.weight", "linear"),
        "layers/attn_norm": (L + "input_layernorm.weight", "plain"),
        "layers/mlp_norm": (L + "post_attention_layernorm.weight", "plain"),
    }
    moe = "block_sparse_moe" if model.config.model_type == "mixtral" else "mlp"
    experts = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if moe == "block_sparse_moe" else {}
    for path in _paths(model.shapes()):
        parts = path.split("/")
        if parts[0] == "layers" and len(parts) == 3:
            mod, kind = _module(parts[2])
            if parts[1] == "moe":
                out[path] = (f"{L}{moe}.gate.weight", "linear") if mod == "router" else (
                    f"{L}{moe}.experts.{{e}}.{experts.get(mod, mod)}.weight", "linear")
                continue
            block = "self_attn" if parts[1] == "attn" else "mlp"
            linear = kind == "weight" and not mod.endswith("_norm")  # Qwen3's q_norm/k_norm are vectors
            out[path] = (f"{L}{block}.{mod}.{kind}", "linear" if linear else "plain")
    return out


_GEMMA_NORMS = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}


def _gemma(model: Any, prefix: str) -> dict[str, tuple[str, str]]:
    out = _llama(model, prefix)  # embeddings, projections, q/k norms and the final norm are named as Llama's
    L = prefix + "layers.{i}."
    out |= {f"layers/{ours}": (f"{L}{theirs}.weight", "plain") for ours, theirs in _GEMMA_NORMS.items()}
    return out


def _gpt2(model: Any, prefix: str) -> dict[str, tuple[str, str]]:
    L = prefix + "h.{i}."
    out = {
        "embed": (prefix + "wte.weight", "plain"),
        "pos": (prefix + "wpe.weight", "plain"),
        "final_norm_scale": (prefix + "ln_f.weight", "plain"),
        "final_norm_bias": (prefix + "ln_f.bias", "plain"),
        "lm_head": ("lm_head.weight", "linear"),
    }
    for n in ("ln_1", "ln_2"):
        out[f"layers/{n}_scale"] = (f"{L}{n}.weight", "plain")
        out[f"layers/{n}_bias"] = (f"{L}{n}.bias", "plain")
    for path in _paths(model.shapes()):
        parts = path.split("/")
        if parts[0] == "layers" and len(parts) == 3:
            mod, kind = _module(parts[2])
            out[path] = (f"{L}{parts[1]}.{mod}.{kind}", "plain")  # Conv1D: [in, out] already
    return out


_BERT_LAYER = {
    "attn/query": "attention.self.query", "attn/key": "attention.self.key", "attn/value": "attention.self.value",
    "attn/out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "mlp/intermediate": "intermediate.dense", "mlp/output": "output.dense", "mlp_norm": "output.LayerNorm",
}


def _bert(model: Any, prefix: str) -> dict[str, tuple[str, str]]:
    E, L = prefix + "embeddings.", prefix + "encoder.layer.{i}."
    out = {
        "embed": (E + "word_embeddings.weight", "plain"),
        "pos": (E + "position_embeddings.weight", "plain"),
        "token_type": (E + "token_type_embeddings.weight", "plain"),
        "embed_norm_scale": (E + "LayerNorm.weight", "plain"),
        "embed_norm_bias": (E + "LayerNorm.bias", "plain"),
    }
    for ours, theirs in _BERT_LAYER.items():
        if ours.endswith("norm"):
            out[f"layers/{ours}_scale"] = (f"{L}{theirs}.weight", "plain")
            out[f"layers/{ours}_bias"] = (f"{L}{theirs}.bias", "plain")
        else:
            out[f"layers/{ours}"] = (f"{L}{theirs}.weight", "linear")
            out[f"layers/{ours}_bias"] = (f"{L}{theirs}.bias", "plain")
    roberta = model.config.model_type == "roberta"
    if model.task == "masked_lm":
        h = "lm_head." if roberta else "cls.predictions."
        dense, norm = ("dense", "layer_norm") if roberta else ("transform.dense", "transform.LayerNorm")
        out |= {
            "head/transform": (f"{h}{dense}.weight", "linear"), "head/transform_bias": (f"{h}{dense}.bias", "plain"),
            "head/norm_scale": (f"{h}{norm}.weight", "plain"), "head/norm_bias": (f"{h}{norm}.bias", "plain"),
            "head/bias": (f"{h}bias", "plain"),
        }
    elif model.task == "sequence_classification":
        pairs = {"dense": "classifier.dense", "out_proj": "classifier.out_proj"} if roberta else {
            "pooler": prefix + "pooler.dense", "classifier": "classifier"}
        for ours, theirs in pairs.items():
            out[f"head/{ours}"] = (f"{theirs}.weight", "linear")
            out[f"head/{ours}_bias"] = (f"{theirs}.bias", "plain")
    return out


_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
_TABLES = {**{mt: _llama for mt in _LLAMA_LIKE}, "gemma2": _gemma, "gemma3_text": _gemma, "gpt2": _gpt2, "bert": _bert,
           "roberta": _bert}


def prefix_of(model: Any, names: list[str]) -> str:
    """The base-model prefix the checkpoint uses (``model.``, ``transformer.``, ``bert.``, ...)."""
    mt = model.config.model_type
    options = {"gpt2": ["transformer.", ""], "bert": ["bert.", ""], "roberta": ["roberta.", ""],
               # Gemma 3's multimodal checkpoints hold the text model under language_model
               "gemma3_text": ["model.", "language_model.model.", "model.language_model."]}.get(mt, ["model."])
    probe = {"gpt2": "wte.weight", "bert": "embeddings.word_embeddings.weight",
             "roberta": "embeddings.word_embeddings.weight"}.get(mt, "embed_tokens.weight")
    for p in options:
        if p + probe in names:
            return p
    return options[0]


def default_prefix(model: Any) -> str:
    mt = model.config.model_type
    if mt in ("bert", "roberta"):
        return "" if model.task == "base" else mt + "."
    return {"gpt2": "transformer."}.get(mt, "model.")


def table(model: Any, prefix: str, *, untied_head: bool = False) -> dict[str, tuple[str, str]]:
    """Our weight path -> (HF tensor name template with ``{i}`` for the layer, kind: linear/conv1d/plain) for
    every leaf of ``model``, under ``prefix``; ``untied_head``: with the ``lm_head`` of a model whose config
    ties it (a head PEFT's ``modules_to_save`` untied, see ``untied_head``)."""
    full = _TABLES[model.config.model_type](model, prefix)
    paths = _paths(model.shapes())
    if untied_head and "lm_head" in full and "lm_head" not in paths:
        paths.append("lm_head")
    return {p: full[p] for p in paths}


def untied_head(model: Any, paths: Any) -> bool:
    """Whether a tree with these leaf ``paths`` holds its own ``lm_head`` although ``model``'s config ties the
    head to the embedding (the head then reads ``lm_head``: ``ZooModel.head``)."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and getattr(model, "causal", False) \
        and "lm_head" in set(paths)


def ignorable(model: Any, prefix: str) -> list[re.Pattern]:
    """Patterns of checkpoint tensors we do not load (buffers transformers stores, heads of other tasks, the
    vision tower of a multimodal checkpoint)."""
    pats = [r".*rotary_emb\.inv_freq", r".*\.attn\.(masked_)?bias", r".*position_ids", r"cls\.seq_relationship\..*"]
    if prefix in ("language_model.model.", "model.language_model."):  # the text model of a multimodal checkpoint
        pats += [r"(model\.)?vision_tower\..*", r"(model\.)?multi_modal_projector\..*", r"(language_model\.)?lm_head\..*"]
    if model.config.model_type in ("bert", "roberta"):
        # Heads of the other tasks (loading an MLM checkpoint's encoder as task="base", say).
        if model.task != "sequence_classification":
            pats += [re.escape(prefix) + r"pooler\..*", r"classifier\..*"]
        if model.task != "masked_lm":
            pats += [r"cls\.predictions\..*", r"lm_head\..*"]
    return [re.compile(p) for p in pats]


def tied(model: Any) -> dict[str, str]:
    """HF names of tied copies -> our path they must equal."""
    mt = model.config.model_type
    if mt in ("bert", "roberta"):
        h = "lm_head." if mt == "roberta" else "cls.predictions."
        return {h + "decoder.weight": "embed", h + "decoder.bias": "head/bias"} if model.task == "masked_lm" else {}
    return {"lm_head.weight": "embed"} if model.config.tie_word_embeddings else {}
