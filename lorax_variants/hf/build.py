"""``from_config(hf_config)``, ``load_params`` and ``save_pretrained``: HF configs and tensors <-> our JAX
models (``hf.auto.from_pretrained`` puts them together for a directory or a GGUF file).

``from_pretrained`` reads ``config.json`` (through transformers' config classes, so defaults
match transformers; never ``trust_remote_code``) and safetensors with numpy (no torch), and
returns ``(model, params)``. ``from_config`` builds the model object from a config alone:
``jax.eval_shape(model.init, key)`` plans a 70B model's parameters without allocating them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.hf.convert import params_from_hf, to_hf
from lorax_variants.hf.names import shape_items
from lorax_variants.hf.safetensors_io import atomic_dir, write_safetensors
from lorax_variants.models.bert import Bert, BertConfig
from lorax_variants.models.gemma import Gemma, GemmaConfig
from lorax_variants.models.gpt2 import GPT2, GPT2Config
from lorax_variants.models.layers import init_from_shapes
from lorax_variants.models.llama import Llama, LlamaConfig

from lorax_variants.quant import QuantSpec, quantize_array
from lorax_variants.tree import compile_patterns, matches

__all__ = ["from_config", "save_pretrained", "SUPPORTED", "load_hf_config", "load_params", "write_config"]

SUPPORTED = ("bert", "gemma2", "gemma3_text", "gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe",
             "roberta")
_CAUSAL_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")


def _task_of(hf: Any, task: str | None) -> str:
    mt = hf.model_type
    archs = list(getattr(hf, "architectures", None) or [])
    if mt in ("bert", "roberta"):
        if task is not None:
            return task
        arch = archs[0] if archs else ""
        if arch.endswith("ForMaskedLM"):
            return "masked_lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence_classification"
        if arch in ("", f"{'Bert' if mt == 'bert' else 'Roberta'}Model"):
            return "base"
        raise ValueError(f"{mt} architecture {arch!r} is not supported; supported heads: base model, "
                         "ForMaskedLM, ForSequenceClassification (pass task= to choose)")
    if task not in (None, "causal_lm"):
        raise ValueError(f"{mt} models support task 'causal_lm' only, got {task!r}")
    for arch in archs:
        if not arch.endswith(("ForCausalLM", "LMHeadModel", "Model")):
            raise ValueError(f"{mt} architecture {arch!r} is not supported; supported: {_CAUSAL_ARCHS[mt]}")
    return "causal_lm"


def from_config(hf_config: Any, *, task: str | None = None, remat: str = "none", scan: bool = True) -> Any:
    """Our model for a transformers config object (no weights). A multimodal Gemma 3 config gives its text
    model (``text_config``): what fine-tuning the language model needs; exports are text-only Gemma 3."""
    if getattr(hf_config, "model_type", None) == "gemma3":
        hf_config = hf_config.text_config
    mt = getattr(hf_config, "model_type", None)
    if mt not in SUPPORTED:
        raise ValueError(f"model_type {mt!r} is not supported; supported: {list(SUPPORTED)}")
    task = _task_of(hf_config, task)
    if mt in _LLAMA_LIKE:
        model = Llama(LlamaConfig.from_hf(hf_config), remat=remat, scan=scan)
    elif mt in ("gemma2", "gemma3_text"):
        model = Gemma(GemmaConfig.from_hf(hf_config), remat=remat, scan=scan)
    elif mt == "gpt2":
        model = GPT2(GPT2Config.from_hf(hf_config), remat=remat, scan=scan)
    else:
        model = Bert(BertConfig.from_hf(hf_config), task=task, remat=remat, scan=scan)
    model.hf_config = hf_config
    model.task = task
    return model


def load_hf_config(path: str | os.PathLike) -> Any:
    """``config.json`` of a model directory as a transformers config (supported types only)."""
    import transformers

    cfg = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not cfg.exists():
        raise FileNotFoundError(f"{path}: no config.json")
    try:
        raw = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    mt = raw.get("model_type")
    if mt not in SUPPORTED and mt != "gemma3":
        raise ValueError(f"{cfg}: model_type {mt!r} is not supported; supported: {list(SUPPORTED)}")
    if raw.get("auto_map"):
        raise ValueError(f"{cfg}: custom code (auto_map) is never run; only built-in transformers configs load")
    return transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)


def load_params(model: Any, tensors: Any, dtype: Any = None, *, quantize: QuantSpec | None = None,
                new_head: jax.Array | None = None, prequantized: Any = None) -> dict[str, Any]:
    """``model``'s params from a mapping of HF tensor names to numpy arrays (read lazily, one at a time),
    cast to ``dtype`` and quantized per ``quantize`` as they are read; ``prequantized``: a quantized
    checkpoint's reader (``hf.bnb``), whose weights load as stored."""
    np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    per_tensor = None
    if quantize is not None:

        targets = compile_patterns(quantize.targets, what="QuantSpec.targets")
        quantize_one = jax.jit(lambda w, p: quantize_array(w, quantize, p), static_argnums=1)
        paths = [p for p, _ in shape_items(model.shapes())]
        chosen = [p for p in paths if matches(p, targets)]
        if not chosen:
            raise ValueError(f"QuantSpec.targets {quantize.targets!r} matched no weight of {model.config.model_type}; "
                             f"its paths: {paths[:12]}")
        per_tensor = lambda p: (lambda w: quantize_one(jnp.asarray(w), p)) if p in chosen else None  # noqa: E731
    model.new_leaves = []
    fill = _head_filler(model, new_head, dtype) if new_head is not None else None
    return params_from_hf(model, tensors, np_dtype, lambda _, a: jnp.asarray(a), per_tensor, fill, prequantized)



def _head_filler(model: Any, key: jax.Array, dtype: Any) -> Any:
    """``fill`` for ``params_from_hf``: new ``head/`` leaves, recorded in ``model.new_leaves``."""
    init = init_from_shapes(model.shapes().get("head", {}), key, model.config.initializer_range, dtype or jnp.float32)

    def fill(path: str) -> Any:
        if not path.startswith("head/"):
            return None
        model.new_leaves.append(path)
        return init[path.split("/", 1)[1]]

    return fill


def save_pretrained(out_dir: str | os.PathLike, model: Any, params: Any, *, overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors that transformers loads (atomic: temp dir, rename)."""
    tensors = to_hf(model, params)

    def write(tmp: Path) -> None:
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        write_config(tmp, model)

    return atomic_dir(out_dir, overwrite, write)


def write_config(directory: Path, model: Any, dtype: str | None = None, untied_head: bool = False) -> None:
    """``config.json`` of ``model`` as transformers reads it (its architecture, optionally a dtype;
    ``untied_head``: the weights hold a head of their own although ``model`` ties it)."""
    config = model.hf_config.to_dict()
    config["architectures"] = [_architecture(model)]
    if untied_head:
        config["tie_word_embeddings"] = False
    if dtype is not None:
        config["dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _architecture(model: Any) -> str:
    mt = model.config.model_type
    if mt in _CAUSAL_ARCHS:
        return _CAUSAL_ARCHS[mt]
    stem = "Bert" if mt == "bert" else "Roberta"
    return {"base": f"{stem}Model", "masked_lm": f"{stem}ForMaskedLM",
            "sequence_classification": f"{stem}ForSequenceClassification"}[model.task]
