"""Reading and writing safetensors checkpoints with numpy only (no torch, never pickle).

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{dtype, shape, data_offsets}``, then the raw bytes. We memory-map the data, so a tensor is
read only when asked for (loading a sharded 70B checkpoint touches one tensor at a time), and
bfloat16 / float8 come through ``ml_dtypes``. Every header is checked against the file size:
a truncated or corrupted file is an error naming the file and tensor.

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

__all__ = ["SafetensorsFile", "Checkpoint", "write_safetensors", "atomic_dir", "write_bytes_atomic", "write_text_atomic", "DTYPES"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """One ``.safetensors`` file: ``keys()``, ``shape(name)``, ``dtype(name)``, ``get(name)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"{self.path}: corrupted or truncated safetensors header (length {n}, file {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: corrupted safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupted safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                start, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: tensor {name!r} has an invalid header entry {e!r}") from None
            if end > data_len or start > end or (end - start) != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(
                    f"{self.path}: tensor {name!r} lies outside the file or has the wrong size "
                    f"(offsets {start}-{end}, data {data_len} bytes): truncated or corrupted"
                )
            self._entries[name] = (dtype, shape, start, end)
        self._data_len = data_len
        self._map: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[name]
        if self._map is None:
            # (np.memmap refuses an empty mapping: a file whose tensors are all empty maps nothing.)
            self._map = (np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start) if self._data_len > 0
                         else np.zeros(0, np.uint8))
        return self._map[start:end].view(dtype).reshape(shape)


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
        return self._where[name].shape(name)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy, any dtype in ``DTYPES``) atomically: a temporary file, then rename."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = a if a.flags.c_contiguous else a.copy(order="C")  # (not ascontiguousarray: it makes 0-d arrays 1-d)
        if a.dtype not in _NAMES:
            raise TypeError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for a in arrays:
                f.write(a.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
