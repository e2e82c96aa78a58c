"""Safetensors checkpoints through the ``safetensors`` package, numpy side (no torch, never pickle).

Files are memory-mapped and a tensor is read only when asked for, so loading a sharded 70B checkpoint
holds one tensor at a time; bfloat16 and float8 come as ``ml_dtypes`` arrays. The package checks every
header against the file size: a truncated or corrupted file is an error naming the file. Written
here: what the package lacks (float8 reads into numpy, atomic writes, sharded directories with a
hostile-index check).

A directory holds ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import struct
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

__all__ = ["SafetensorsFile", "Checkpoint", "write_safetensors", "atomic_dir", "atomic_file", "write_bytes_atomic", "write_text_atomic", "DTYPES"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """One ``.safetensors`` file: ``keys()``, ``shape(name)``, ``dtype(name)``, ``get(name)``, ``metadata``.

    Through the ``safetensors`` package (``safe_open``, numpy): it memory-maps the file and checks the
    header against its size. Float8 tensors are the one thing its numpy side cannot return (numpy has no
    float8 type), so those few are sliced from the memory map here, by the offsets in the header, and
    viewed as ``ml_dtypes``' float8."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        try:
            self._file = safe_open(str(self.path), framework="np")
        except SafetensorError as e:
            raise ValueError(f"{self.path}: not a safetensors file, or a truncated or corrupted one ({e})") from None
        self.metadata = dict(self._file.metadata() or {})
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        for name in self._file.keys():
            info = self._file.get_slice(name)
            kind = info.get_dtype()
            if kind not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {kind}, which we do not read "
                                 f"(known: {sorted(DTYPES)})")
            self._entries[name] = (DTYPES[kind], tuple(int(n) for n in info.get_shape()))
        self._offsets: dict[str, tuple[int, int]] | None = None

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (from the header, nothing read)."""
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        """numpy dtype of tensor ``name`` (bfloat16/float8 as ml_dtypes)."""
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` read from the memory-mapped file."""
        dtype, shape = self._entries[name]
        if dtype.name.startswith("float8"):
            return self._float8(name, dtype, shape)
        return self._file.get_tensor(name)

    def _float8(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if self._offsets is None:  # the header, already validated by safe_open: just its offsets
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            self._offsets = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                             for k, v in header.items() if k != "__metadata__"}
        start, end = self._offsets[name]
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=start, shape=(end - start,)) if end > start \
            else np.zeros(0, np.uint8)
        return np.array(data).view(dtype).reshape(shape)


class Checkpoint(Mapping[str, np.ndarray]):
    """All tensors of a model directory (single file or index-sharded), read lazily by name."""

    def __init__(self, directory: str | os.PathLike):
        d = Path(directory)
        index = d / "model.safetensors.index.json"
        single = d / "model.safetensors"
        self._where: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
            files: dict[str, SafetensorsFile] = {}
            for name, fname in weight_map.items():
                shard = (d / fname).resolve()
                if shard.parent != d.resolve():
                    raise ValueError(f"{index}: shard {fname!r} for {name!r} points outside {d}")
                if fname not in files:
                    if not shard.exists():
                        raise FileNotFoundError(f"{index}: shard {fname!r} (holding {name!r}) is missing")
                    files[fname] = SafetensorsFile(shard)
                if name not in files[fname].keys():
                    raise ValueError(f"{index}: {name!r} is listed in {fname!r} but not stored there")
                self._where[name] = files[fname]
        elif single.exists():
            f = SafetensorsFile(single)
            self._where = {k: f for k in f.keys()}
        else:
            found = sorted(p.name for p in d.glob("*")) if d.is_dir() else None
            if found is None:
                raise FileNotFoundError(f"model directory {d} does not exist")
            bad = [n for n in found if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = f"; {bad} are pickle-based and are never loaded (convert them to safetensors)" if bad else ""
            raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json (found {found}){hint}")

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` in whichever shard holds it (nothing read)."""
        return self._where[name].shape(name)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy, any dtype in ``DTYPES``) with the ``safetensors`` package, atomically: a
    temporary file beside ``path``, fsync, rename."""
    path = Path(path)
    arrays = {}
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype not in _NAMES:
            raise TypeError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
        arrays[name] = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
    atomic_file(path, lambda tmp: safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata or {"format": "pt"})))


def atomic_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it to ``path``: a reader sees
    the old file or the whole new one, never part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a small file (JSON, HTML, PNG) atomically: a temporary file beside it, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``write_bytes_atomic`` for text (UTF-8)."""
    write_bytes_atomic(path, text.encode())


def atomic_dir(out_dir: str | os.PathLike, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a temporary sibling directory, then rename it to ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
