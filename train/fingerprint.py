"""The identity of a base model: a sha256 over its config, tokenizer and every weight byte.

A run's checkpoints hold only the trained leaves; the frozen weights are re-read from ``model.path`` on
resume and export. Two checkpoints of the same architecture have the same config and tensor headers, so
only the weights' bytes tell them apart: ``fingerprint(model_dir)`` streams every ``*.safetensors`` file
(and ``config.json`` and the tokenizer files, which change what the data tokenizes to) through sha256.

A big model is hashed once: each file's digest is cached with its size and modification time in
``.lorax_fingerprint.json`` beside the weights, or, where that directory cannot be written (a package's
data, a read-only mount), under ``$XDG_CACHE_HOME/lorax_variants/fingerprints/``. A file whose size or
mtime changed is hashed again. Fingerprints are ``"sha256:<hex>"``; checkpoints written before weights
were hashed hold a bare hex digest of the config and tensor headers (``legacy_fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lorax_variants.hf.export import TOKENIZER_FILES
from lorax_variants.hf.safetensors_io import write_text_atomic

__all__ = ["fingerprint", "legacy_fingerprint", "CACHE_NAME"]

CACHE_NAME = ".lorax_fingerprint.json"
PREFIX = "sha256:"


def _identity_files(model_dir: Path) -> list[Path]:
    """The files whose bytes make the model: weights, config, tokenizer (sorted by name)."""
    if model_dir.is_file():  # a GGUF file: weights, config and tokenizer in one
        return [model_dir]
    keep = {"config.json", *TOKENIZER_FILES}
    return sorted(p for p in model_dir.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name in keep))


def _cache_path(model_dir: Path) -> tuple[Path, Path]:
    """(beside the weights, in the user's cache): read the first that exists, write the first writable one."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorax_variants" / "fingerprints"
    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:32]
    beside = model_dir.with_name(model_dir.name + CACHE_NAME) if model_dir.is_file() else model_dir / CACHE_NAME
    return beside, root / f"{key}.json"


def _read_cache(paths: tuple[Path, Path]) -> dict[str, dict[str, object]]:
    for p in paths:
        try:
            data = json.loads(p.read_text())
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                return data["files"]
        except (OSError, ValueError):  # absent, unreadable or damaged: hash again
            continue
    return {}


def _write_cache(paths: tuple[Path, Path], files: dict[str, dict[str, object]]) -> None:
    text = json.dumps({"about": "sha256 of each file, by size and mtime (lorax_variants)", "files": files}, indent=1)
    for p in paths:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(p, text)
            return
        except OSError:  # read-only: try the next place; nowhere: hash again next time
            continue


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(model_dir: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` over the model's config, tokenizer and weight files (name and content digest each)."""
    model_dir = Path(model_dir)
    paths = _cache_path(model_dir)
    cached = _read_cache(paths)
    files, changed = {}, False
    for p in _identity_files(model_dir):
        st = p.stat()
        entry = cached.get(p.name)
        if not (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
                and isinstance(entry.get("sha256"), str)):
            entry, changed = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _digest(p)}, True
        files[p.name] = entry
    if changed or set(files) != set(cached):
        _write_cache(paths, files)
    h = hashlib.sha256()
    for name, entry in files.items():
        h.update(f"{name}\0{entry['sha256']}\n".encode())
    return PREFIX + h.hexdigest()


def legacy_fingerprint(model_dir: str | os.PathLike) -> str:
    """What checkpoints held before weights were hashed: config.json, safetensors headers and file sizes."""
    h = hashlib.sha256()
    for p in sorted(Path(model_dir).iterdir()):
        if p.name == "config.json":
            h.update(p.read_bytes())
        elif p.suffix == ".safetensors":
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(p.name.encode() + f.read(min(n, 1 << 26)) + str(p.stat().st_size).encode())
    return h.hexdigest()


def same_base(saved: str | None, current: str | None, model_dir: str | os.PathLike) -> bool:
    """Whether a checkpoint's recorded fingerprint names the model at ``model_dir`` (``current`` is its
    fingerprint); a legacy record is compared with the legacy hash."""
    if saved is None or current is None:
        return saved == current
    if not saved.startswith(PREFIX):
        return saved == legacy_fingerprint(model_dir)
    return saved == current
