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

Damage: once a step is committed, ``manifest.json`` beside its items records every file's size and
sha256. Before a step is read, the manifest is checked: a file cut short, zeroed, replaced or deleted is
named (``CheckpointDamaged``) before orbax reads anything; the training app then sets the step aside
(``set_aside``: moved, never deleted) and resumes from the previous good one. A step without a manifest
(written before manifests, or killed in the moment between the commit and the manifest's write) is read
unverified; orbax's own checksums of the array data still apply, and its errors are reported the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.fingerprint import same_base


__all__ = ["Checkpointer", "CheckpointMismatch", "CheckpointDamaged", "check_base", "check_meta"]


TRASH = ".trash"  # old steps are renamed here (atomic), then deleted
MANIFEST = "manifest.json"  # in each step directory: every other file's size and sha256
DAMAGED = "damaged-checkpoints"  # beside checkpoints/: steps set aside because a file of theirs is damaged


class CheckpointMismatch(ValueError):
    """A checkpoint that belongs to another model, variant or data layout."""


class CheckpointDamaged(ValueError):
    """A checkpoint step that cannot be read as written: ``path`` is the file at fault (or the step)."""

    def __init__(self, step: int, path: Path, reason: str):
        super().__init__(f"checkpoint step {step} is damaged: {path}: {reason}")
        self.step, self.path, self.reason = step, path, reason


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _quiet_closed_loop() -> None:
    """Orbax reads arrays concurrently; when one read fails, the others' callbacks find its event loop
    closed and Python prints each as an unraisable exception. Those (and only those) are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "_lorax_quiet", False):
        return

    def hook(u: Any) -> None:
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        previous(u)

    hook._lorax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _settle(before: set[threading.Thread], timeout: float = 300.0) -> None:
    """After a failed save, wait for the writer threads that save started. When one item fails (a full disk
    while the meta item is written), orbax raises at once while the other item's array writes go on in its
    own threads; returning then would let them write into the temporary directory that the next run (or the
    next save of the same step) removes or reuses. Pool workers idle forever and are not waited for."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t in before or t is threading.current_thread() or t.name.startswith(("ThreadPoolExecutor", "asyncio")):
            continue
        t.join(max(0.0, deadline - time.monotonic()))


def _file_in(message: str, step_dir: Path) -> Path:
    """The file an orbax/tensorstore error names (the innermost one under the step directory; the step
    directory when it names none)."""
    named = [Path(m.group(1)) for m in re.finditer(r'(?:local file|file|path)[:\s]+"?([^"\s\]]+)', message)]
    inside = [p for p in named if str(p).startswith(str(step_dir))]
    files = [p for p in inside if p.is_file()]
    return (files or inside or [step_dir])[-1]


def _reason(e: BaseException) -> str:
    text = str(e)
    for cut in (" [tensorstore_spec", " See full TensorStore details"):  # kilobytes of JSON follow
        text = text.split(cut, 1)[0]
    return f"{type(e).__name__}: {text[:300]}"


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
        _quiet_closed_loop()

    def _empty_trash(self) -> None:
        if not self.read_only and jax.process_index() == 0:
            shutil.rmtree(self.directory / TRASH, ignore_errors=True)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        before = set(threading.enumerate())
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()
        except BaseException:
            _settle(before)
            raise
        if jax.process_index() == 0:
            self._write_manifest(step)
        self._empty_trash()

    def _write_manifest(self, step: int) -> None:
        from lorax_variants.hf.safetensors_io import write_text_atomic

        d = self.directory / str(step)
        files = {str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(d)}
        write_text_atomic(d / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))

    def verify(self, step: int) -> str | None:
        """Check step ``step``'s files against its manifest: ``CheckpointDamaged`` naming the first file that
        differs; a note (to log) when the step has no manifest and is read unverified."""
        d = self.directory / str(step)
        try:
            manifest = json.loads((d / MANIFEST).read_text())
            files = manifest["files"]
            if manifest.get("step") != step or not isinstance(files, dict):
                raise ValueError(f"it is the manifest of step {manifest.get('step')!r}")
        except FileNotFoundError:
            return (f"note: checkpoint step {step} has no {MANIFEST} (written before manifests, or the run was killed "
                    "as it wrote one); read without checking its files")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointDamaged(step, d / MANIFEST, f"unreadable ({type(e).__name__}: {e})") from None
        bad = []
        for name, entry in sorted(files.items()):
            p = d / name
            if not p.is_file():
                bad.append((p, "missing"))
                continue
            size = p.stat().st_size
            if size != entry.get("size"):
                bad.append((p, f"{size} bytes, {entry.get('size')} when written (cut short or replaced)"))
            elif _sha256(p) != entry.get("sha256"):
                bad.append((p, "its content changed since it was written (sha256 differs)"))
        if len(bad) == 1:
            raise CheckpointDamaged(step, *bad[0])
        if bad:  # every file at once: more likely the manifest than the step
            raise CheckpointDamaged(step, d / MANIFEST, f"{len(bad)} of the {len(files)} files it lists differ from it "
                                    f"(first: {bad[0][0].relative_to(d)}, {bad[0][1]}): the manifest or the step "
                                    "is damaged")
        return None

    def meta(self, step: int) -> dict[str, Any]:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds for unreadable items
            raise self._damaged(step, e, self.directory / str(step) / "meta" / "metadata") from None
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise CheckpointDamaged(step, self.directory / str(step) / "meta" / "metadata",
                                    f"it holds the metadata of step {meta.get('step') if isinstance(meta, dict) else meta!r}")
        return meta

    def restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
        """The state at ``step``, laid out (shapes, dtypes, shardings) like ``like``."""
        abstract = jax.tree.map(_abstract, like)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001
            raise self._damaged(step, e, self.directory / str(step) / "state") from None
        return out["state"]

    def _damaged(self, step: int, e: BaseException, default: Path) -> CheckpointDamaged:
        path = _file_in(str(e), self.directory / str(step))
        return CheckpointDamaged(step, default if path == self.directory / str(step) else path, _reason(e))

    def set_aside(self, step: int) -> Path:
        """Move damaged step ``step`` out of the checkpoints (to ``<output_dir>/damaged-checkpoints/``), never
        deleting it; the manager forgets it."""
        where = self.directory.parent / DAMAGED
        where.mkdir(exist_ok=True)
        dest, n = where / str(step), 1
        while dest.exists():
            dest, n = where / f"{step}.{n}", n + 1
        os.replace(self.directory / str(step), dest)
        return dest

    def reload(self) -> None:
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def check_base(saved: dict[str, Any], current: dict[str, Any], where: Path, force: bool = False) -> str | None:
    """Refuse a checkpoint trained on other base weights than ``model.path`` holds now, naming both paths;
    ``force`` (``--force-base``) lets it through and returns the warning to log."""
    if same_base(saved.get("base_fingerprint"), current.get("base_fingerprint"), current.get("base_model") or "."):
        return None
    then, now = saved.get("base_model"), current.get("base_model")
    what = (f"checkpoint {where} was trained on the base model at {then} (weights {_short(saved.get('base_fingerprint'))}); "
            f"model.path={now} holds other weights ({_short(current.get('base_fingerprint'))})")
    if force:
        return f"warning: --force-base: {what}; resuming on the new base as asked"
    raise CheckpointMismatch(f"{what}. Point model.path at the model it was trained on, use another train.output_dir, "
                             "or pass --force-base to go on with these weights")


def _short(fp: Any) -> str:
    return str(fp).removeprefix("sha256:")[:12] if fp else "unknown"


def check_meta(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint written by a different variant or data layout (the base model: ``check_base``)."""
    keys = ("adapter_spec", "quant_spec", "task", "trainable", "batch_size", "grad_accum",
            "data_source", "seq_len", "optimizer")
    for k in keys:
        a, b = saved.get(k), current.get(k)
        if k == "adapter_spec" and a is not None:  # a spec saved before the variants' settings moved: as read now
            from lorax_variants import AdapterSpec

            a = AdapterSpec.from_dict(a).to_dict()
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
                detail = "; ".join(f"{f}: checkpoint {a.get(f)!r}, this run {b.get(f)!r}" for f in diff[:4])
            elif isinstance(a, list) and isinstance(b, list):
                detail = f"checkpoint has {len(a)} entries, this run {len(b)}; first difference: " + next(
                    (f"{x!r} vs {y!r}" for x, y in zip(a, b) if x != y), "length")
            else:
                detail = f"checkpoint {a!r}, this run {b!r}"
            what = {"data_source": "data.source",
                    "seq_len": "data.seq_len", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum"}.get(k, k)
            raise CheckpointMismatch(f"checkpoint {where} was written by a different run ({what} differs: {detail}); "
                                     "use another train.output_dir or start fresh")

