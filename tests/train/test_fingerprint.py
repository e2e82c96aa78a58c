"""The base model's fingerprint: every weight byte counts; a big model is hashed once (cached by size and mtime)."""

from __future__ import annotations

import os
import shutil

import numpy as np

from lorax_variants.hf.safetensors_io import SafetensorsFile, write_safetensors
from train import fingerprint as F


def _copy(src, dst):
    shutil.copytree(src, dst)
    (dst / F.CACHE_NAME).unlink(missing_ok=True)  # hashed afresh (other tests may have cached the original)


def _flip_one_weight(d):
    f = SafetensorsFile(d / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    k = sorted(tensors)[-1]
    tensors[k].flat[3] += 0.5
    write_safetensors(d / "model.safetensors", tensors, f.metadata)


def test_weights_of_the_same_shapes_differ_and_the_old_fingerprint_did_not_see_it(assets, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _copy(assets["llama"], a)
    _copy(assets["llama"], b)
    assert F.fingerprint(a) == F.fingerprint(b)
    _flip_one_weight(b)
    assert F.fingerprint(a) != F.fingerprint(b)
    assert F.legacy_fingerprint(a) == F.legacy_fingerprint(b)  # config and headers only: the fault this fixes
    assert F.same_base(F.legacy_fingerprint(a), F.fingerprint(b), b)  # an old checkpoint is compared the old way


def test_a_model_is_hashed_once_and_again_when_a_file_changes(assets, tmp_path, monkeypatch):
    d = tmp_path / "m"
    _copy(assets["llama"], d)
    calls = []
    digest = F._digest
    monkeypatch.setattr(F, "_digest", lambda p: calls.append(p.name) or digest(p))
    first = F.fingerprint(d)
    assert "model.safetensors" in calls and (d / F.CACHE_NAME).is_file()
    calls.clear()
    assert F.fingerprint(d) == first and calls == []  # from the cache
    _flip_one_weight(d)
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert F.fingerprint(d) != first and calls == ["model.safetensors"]  # only the changed file


def test_a_model_directory_that_cannot_be_written_caches_in_the_user_cache(assets, tmp_path, monkeypatch):
    d = tmp_path / "ro"
    _copy(assets["llama"], d)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write = F.write_text_atomic

    def refuse_model_dir(path, text):  # a read-only mount (root ignores chmod, so the write is refused here)
        if path.parent == d:
            raise PermissionError(13, "Read-only file system", str(path))
        write(path, text)

    monkeypatch.setattr(F, "write_text_atomic", refuse_model_dir)
    first = F.fingerprint(d)
    assert not (d / F.CACHE_NAME).exists() and len(list((tmp_path / "cache").rglob("*.json"))) == 1
    calls = []
    monkeypatch.setattr(F, "_digest", lambda p: calls.append(p.name))
    assert F.fingerprint(d) == first and calls == []  # read back from the user cache
