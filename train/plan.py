"""``--dry-run``: what a run would do (model, mesh, parameters, bytes per device, data, steps) without
training; only the config, tokenizer and data are read (the model abstractly)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train.config import Config
from train.data import packing_efficiency

__all__ = ["plan", "dry_run", "format_plan"]


def _device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` laid out with ``shardings``."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape = s.shard_shape(x.shape) if hasattr(s, "shard_shape") else x.shape
        total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
    return total


def plan(cfg: Config) -> dict[str, Any]:
    from train.run import _prepare

    p = _prepare(cfg, abstract=True)
    b, c = p.built, p.built.counts
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    return {
        "model": f"{b.model.config.model_type} ({type(b.model).__name__}, task {cfg.model.task}) from {cfg.model.path}",
        "layers": getattr(b.model.config, "num_hidden_layers", None) or getattr(b.model.config, "n_layer", None),
        "variant": cfg.adapter.variant, "adapter_spec": b.spec.to_dict() if b.spec else None,
        "quant": b.quant.to_dict() if b.quant else None,
        "mesh": dict(b.mesh.shape), "devices": b.mesh.size, "processes": jax.process_count(),
        "trainable_params": c.trainable, "frozen_params": c.frozen,
        "trainable_fraction": c.trainable_fraction,
        "bytes_per_device": {
            "trainable": _device_bytes(b.trainable, b.trainable_sh),
            "frozen": _device_bytes(b.frozen, b.frozen_sh),
            "optimizer_state": _device_bytes(p.opt_abstract, p.opt_sh),
        },
        "examples": {"train": p.train.stats["examples"], "eval": p.eval.stats["examples"] if p.eval else 0,
                     "rows": p.train.stats.get("rows", len(p.train)), "truncated": p.train.stats["truncated"],
                     "skipped_rows": p.train.stats.get("skipped_rows", 0),
                     "dropped_examples": p.train.stats.get("dropped_examples", 0),
                     "packing_efficiency": packing_efficiency(p.train.stats)},
        "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
        "tokens_per_step": tokens_per_step, "tokens_total": tokens_per_step * cfg.train.steps,
        "epochs": cfg.train.steps * cfg.train.batch_size / len(p.train),
    }


def dry_run(cfg: Config) -> dict[str, Any]:
    """The plan, printed: nothing is loaded beyond config, tokenizer and data; nothing trains."""
    info = plan(cfg)
    if jax.process_index() == 0:
        print(format_plan(info), flush=True)
    return info


def format_plan(info: dict[str, Any]) -> str:
    mb = lambda n: f"{n / 2**20:,.2f} MiB"  # noqa: E731
    by = info["bytes_per_device"]
    return "\n".join([
        f"model:      {info['model']}, {info['layers']} layers",
        f"variant:    {info['variant']}" + (f" (r={info['adapter_spec']['r']}, targets {info['adapter_spec']['targets']})"
                                             if info["adapter_spec"] else ""),
        f"quantized:  {info['quant']['kind'] if info['quant'] else 'no'}",
        f"mesh:       {info['mesh']} over {info['devices']} devices, {info['processes']} process(es)",
        f"params:     trainable {info['trainable_params']:,}, frozen {info['frozen_params']:,} "
        f"({100 * info['trainable_fraction']:.3f}% trainable)",
        f"per device: trainable {mb(by['trainable'])}, frozen {mb(by['frozen'])}, optimizer state {mb(by['optimizer_state'])}",
        f"data:       {info['examples']['train']} train examples -> {info['examples']['rows']} rows "
        f"({info['examples']['truncated']} truncated"
        + (f", packed at {info['examples']['packing_efficiency']:.1%} real tokens"
           if info["examples"].get("packing_efficiency") is not None else "")
        + f"), {info['examples']['eval']} eval examples",
        f"steps:      {info['steps']} x batch {info['batch_size']} (accumulation {info['grad_accum']}), "
        f"{info['epochs']:.2f} epochs, {info['tokens_per_step']:,} tokens/step, {info['tokens_total']:,} tokens",
    ])
