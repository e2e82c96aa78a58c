"""``save_merged``: an adapted tree as a plain transformers checkpoint (W + ΔW folded in).

Every variant merges through its node's ``merge``: Delta-LoRA's changed W, QLoRA's dequantized
4-bit base plus its delta (what was trained), DyLoRA at a chosen rank, multi-task at a chosen
adapter. Large models are written in shards with ``model.safetensors.index.json`` as transformers
does; tokenizer files are copied from the base model directory when given. The write is atomic.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.hf import names
from lorax_variants.hf.build import write_config
from lorax_variants.hf.convert import to_hf
from lorax_variants.hf.safetensors_io import atomic_dir, write_safetensors
from lorax_variants.ops import as_lora, merge, one_adapter

__all__ = ["save_merged", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def save_merged(out_dir: str | os.PathLike, model: Any, tree: Any, *, rank: int | None = None, task: int | None = None,
                adapter: str | None = None, dtype: Any = None, tokenizer_from: str | os.PathLike | None = None, max_shard_bytes: int = 5 << 30,
                overwrite: bool = False) -> Path:
    """Merge ``tree``'s adapters into its weights and write an HF model directory transformers loads.

    ``rank``: DyLoRA's rank. ``task``: the multi-task adapter to merge (required for multi-task
    trees). ``adapter``: the named adapter of a tree of many (``lv.adapters``; required for those).
    ``dtype``: cast the merged weights (default: as merged, float32 for adapted weights).
    """
    if adapter is not None:
        tree = one_adapter(tree, adapter)
    params = jax.device_get(merge(as_lora(tree, rank=rank, task=task)))
    tensors = to_hf(model, params)
    if dtype is not None:
        tensors = {k: v.astype(np.dtype(jnp.dtype(dtype))) for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        _write_shards(tmp, tensors, max_shard_bytes)
        write_config(tmp, model, jnp_name(dtype) if dtype is not None else None,
                     untied_head=names.untied_head(model, [n[: -len(".weight")] for n in tensors]))
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_from) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)

    return atomic_dir(out_dir, overwrite, write)


def jnp_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def _write_shards(out: Path, tensors: dict[str, np.ndarray], max_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], {"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, shard, {"format": "pt"})
        weight_map |= {k: fname for k in shard}
    total = sum(t.nbytes for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
