"""``from_pretrained(path)``: an HF model directory (config.json + safetensors, plain or bitsandbytes
4-bit) or a GGUF file -> ``(model, params)`` of our JAX models. Reads ``config.json`` through
transformers' config classes (defaults match transformers; never ``trust_remote_code``) and tensors with
numpy (no torch)."""

from __future__ import annotations

import os
from typing import Any

import jax

from lorax_variants.hf.bnb import bnb_reader, check_quantization_config
from lorax_variants.hf.build import from_config, load_hf_config, load_params
from lorax_variants.hf.gguf import GGUFTensors, from_gguf, gguf_hf_config
from lorax_variants.hf.safetensors_io import Checkpoint
from lorax_variants.quant import QuantSpec

__all__ = ["from_pretrained", "load_pretrained", "model_config"]


def from_pretrained(
    path: str | os.PathLike,
    dtype: Any = None,
    *,
    task: str | None = None,
    remat: str = "none",
    scan: bool = True,
    quantize: QuantSpec | None = None,
    num_labels: int | None = None,
    new_head: jax.Array | None = None,
) -> tuple[Any, dict[str, Any]]:
    """``(model, params)`` from an HF model directory (config.json + safetensors).

    A pre-quantized bitsandbytes 4-bit checkpoint (NF4 or FP4, with or without double quantization)
    loads its quantized weights as stored (``hf.bnb``); other quantization methods are refused by name.

    ``quantize``: a ``QuantSpec``; matching weights are quantized tensor by tensor as they are
    read (layers of a stacked leaf one at a time), so host memory peaks near the quantized
    size plus one full-precision tensor. ``dtype`` is the dtype the weights are cast to first
    (and the dtype a quantized weight dequantizes to).

    ``num_labels`` overrides the config's (classification heads). ``new_head``: a PRNG key; a
    task head (``head/...``) the checkpoint lacks (a base model loaded for classification) is
    initialized as transformers does (N(0, initializer_range²), zero biases) and its paths are
    listed in ``model.new_leaves``; without a key, missing head tensors are an error.
    """
    if str(path).endswith(".gguf"):
        if task not in (None, "causal_lm") or num_labels is not None or new_head is not None:
            raise ValueError(f"{path}: a GGUF file holds a causal LM; task, num_labels and new_head do not apply")
        return from_gguf(path, dtype, remat=remat, scan=scan, quantize=quantize)
    hf_config = load_hf_config(path)
    if num_labels is not None:
        hf_config.num_labels = num_labels
    model = from_config(hf_config, task=task, remat=remat, scan=scan)
    return model, load_pretrained(model, path, dtype, hf_config=hf_config, quantize=quantize, new_head=new_head)


def model_config(path: str | os.PathLike) -> Any:
    """The transformers config of an HF model directory or a GGUF file (``.gguf``)."""
    return gguf_hf_config(path) if str(path).endswith(".gguf") else load_hf_config(path)


def load_pretrained(model: Any, path: str | os.PathLike, dtype: Any = None, *, hf_config: Any,
                    quantize: QuantSpec | None = None, new_head: jax.Array | None = None) -> dict[str, Any]:
    """The params of an HF model directory (or a GGUF file) for a model already built from its ``hf_config``
    (what ``from_pretrained`` does after building it; a caller that built the model to plan around it loads
    into the same object, reading config.json once)."""
    if str(path).endswith(".gguf"):
        if new_head is not None and getattr(model, "task", None) not in (None, "causal_lm"):
            raise ValueError(f"{path}: a GGUF file holds a causal LM; a task head does not apply")
        params = load_params(model, GGUFTensors(path, model), dtype, quantize=quantize)
        model.gguf_path = str(path)
        return params
    checkpoint = Checkpoint(path)
    pre = bnb_reader(checkpoint, str(path)) if check_quantization_config(hf_config, str(path)) else None
    return load_params(model, checkpoint, dtype, quantize=quantize, new_head=new_head, prequantized=pre)
