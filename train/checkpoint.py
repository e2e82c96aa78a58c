"""Checkpoints with orbax: what a run needs to continue exactly, and nothing it can regenerate.

Saved every ``train.checkpoint_every`` steps and at the end (the last ``train.keep`` kept):
- ``state``: the trainable leaves, the optimizer state's leaves, the base RNG key, and the variant's
  ``extras`` (its recipe's: Delta-LoRA's adapted frozen weights, which that variant changes);
- ``meta`` (JSON): step, data position, the run's whole config, the base model's path and
  fingerprint, the adapter and quantization specs, the seeds, and the trainable paths and shapes.

Frozen weights are re-read from the base model (and re-quantized, and VeRA's projections
regenerated from the seed) on resume; a checkpoint whose meta disagrees with the run is refused,
naming the field. Orbax writes each step to a temporary directory and renames it when complete,
so a checkpoint is never read half-written; an old step is first renamed into ``checkpoints/.trash``
and only then deleted, so a kill during that deletion cannot leave a half-deleted step that still
looks like a checkpoint. Temporary directories of a killed save are removed when the next run opens
the directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


__all__ = ["fingerprint", "Checkpointer", "CheckpointMismatch"]


TRASH = ".trash"  # old steps are renamed here (atomic), then deleted


class CheckpointMismatch(ValueError):
    """A checkpoint that belongs to another model, variant or data layout."""


def fingerprint(model_dir: Path) -> str:
    """sha256 over config.json, the safetensors headers and file sizes (cheap for any model size)."""
    h = hashlib.sha256()
    for p in sorted(Path(model_dir).iterdir()):
        if p.name == "config.json":
            h.update(p.read_bytes())
        elif p.suffix == ".safetensors":
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(p.name.encode() + f.read(min(n, 1 << 26)) + str(p.stat().st_size).encode())
    return h.hexdigest()


def _abstract(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x  # host values (the RNG key) restore as numpy
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


class Checkpointer:
    """An orbax ``CheckpointManager`` over ``<output_dir>/checkpoints``."""

    def __init__(self, output_dir: str | Path, keep: int, *, read_only: bool = False):
        self.directory = Path(output_dir).absolute() / "checkpoints"
        if read_only:  # export, the kill tests: reads only; nothing cleaned up or deleted
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                                   enable_async_checkpointing=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                                   cleanup_tmp_directories=True, todelete_subdir=TRASH)
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # orbax warns that a read-only manager is read-only
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        finally:
            absl.setLevel(level)
        self.read_only = read_only
        self._empty_trash()

    def _empty_trash(self) -> None:
        if not self.read_only and jax.process_index() == 0:
            shutil.rmtree(self.directory / TRASH, ignore_errors=True)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        self._empty_trash()

    def meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
        """The state at ``step``, laid out (shapes, dtypes, shardings) like ``like``."""
        abstract = jax.tree.map(_abstract, like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return out["state"]

    def close(self) -> None:
        self.manager.close()


def check_meta(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint written by a different model, variant or data layout."""
    keys = ("base_fingerprint", "adapter_spec", "quant_spec", "task", "trainable", "batch_size", "grad_accum",
            "data_source", "seq_len", "optimizer")
    for k in keys:
        a, b = saved.get(k), current.get(k)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
                detail = "; ".join(f"{f}: checkpoint {a.get(f)!r}, this run {b.get(f)!r}" for f in diff[:4])
            elif isinstance(a, list) and isinstance(b, list):
                detail = f"checkpoint has {len(a)} entries, this run {len(b)}; first difference: " + next(
                    (f"{x!r} vs {y!r}" for x, y in zip(a, b) if x != y), "length")
            else:
                detail = f"checkpoint {a!r}, this run {b!r}"
            what = {"base_fingerprint": "base model weights (model.path)", "data_source": "data.source",
                    "seq_len": "data.seq_len", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum"}.get(k, k)
            raise CheckpointMismatch(f"checkpoint {where} was written by a different run ({what} differs: {detail}); "
                                     "use another train.output_dir or start fresh")

