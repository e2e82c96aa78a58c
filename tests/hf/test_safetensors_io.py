import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch

from lorax_variants.hf.safetensors_io import Checkpoint, SafetensorsFile, write_safetensors


def test_reads_what_the_reference_library_writes_including_bf16(tmp_path):
    tensors = {"w": torch.randn(3, 4).to(torch.bfloat16), "f": torch.randn(5), "i": torch.arange(6).reshape(2, 3)}
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "model.safetensors")
    assert f.metadata == {"format": "pt"}
    assert f.dtype("w") == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(f.get("w").astype(np.float32), tensors["w"].float().numpy())
    np.testing.assert_array_equal(f.get("f"), tensors["f"].numpy())
    np.testing.assert_array_equal(f.get("i"), tensors["i"].numpy())


def test_what_we_write_the_reference_library_reads(tmp_path):
    ours = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, ml_dtypes.bfloat16)}
    write_safetensors(tmp_path / "x.safetensors", ours)
    back = safetensors.torch.load_file(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(back["a"].numpy(), ours["a"])
    assert back["b"].dtype == torch.bfloat16 and back["b"].float().sum() == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_truncated_and_corrupted_files_are_named(tmp_path):
    p = tmp_path / "model.safetensors"
    write_safetensors(p, {"w": np.ones((64, 64), np.float32)})
    raw = p.read_bytes()
    p.write_bytes(raw[:-100])
    named = r"model\.safetensors: not a safetensors file, or a truncated or corrupted one"
    with pytest.raises(ValueError, match=named + r".*not fully covered"):
        SafetensorsFile(p)
    p.write_bytes(raw[:5])
    with pytest.raises(ValueError, match=named + r".*too small"):
        SafetensorsFile(p)
    p.write_bytes(raw[:8] + b"{garbage" + raw[16:])
    with pytest.raises(ValueError, match=named + r".*JSON"):
        SafetensorsFile(p)


def test_float8_round_trips_and_torch_reads_it(tmp_path):
    """Float8, which the package's numpy side cannot return, comes back bit for bit (and torch agrees)."""
    x = np.array([0.5, -2.0, 448.0], np.float32)
    ours = {"e4": x.astype(ml_dtypes.float8_e4m3fn), "e5": x.astype(ml_dtypes.float8_e5m2), "f": x}
    write_safetensors(tmp_path / "f8.safetensors", ours)
    f = SafetensorsFile(tmp_path / "f8.safetensors")
    for k, v in ours.items():
        assert f.dtype(k) == v.dtype
        np.testing.assert_array_equal(f.get(k).view(np.uint8), v.view(np.uint8))
    back = safetensors.torch.load_file(tmp_path / "f8.safetensors")
    assert back["e4"].dtype == torch.float8_e4m3fn
    np.testing.assert_array_equal(back["e4"].float().numpy(), ours["e4"].astype(np.float32))


def test_sharded_checkpoint_and_hostile_index(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.ones(2, np.float32)})
    write_safetensors(tmp_path / "b.safetensors", {"y": np.zeros(3, np.float32)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    ckpt = Checkpoint(tmp_path)
    assert sorted(ckpt) == ["x", "y"] and ckpt["y"].shape == (3,)
    index.write_text(json.dumps({"weight_map": {"x": "../a.safetensors"}}))
    with pytest.raises(ValueError, match="points outside"):
        Checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"x": "c.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard 'c.safetensors'.*missing"):
        Checkpoint(tmp_path)


class _Crafted:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    import pickle

    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pickle-based and are never loaded"):
        Checkpoint(tmp_path)
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    marker = tmp_path / "unpickled"
    (crafted / "pytorch_model.bin").write_bytes(pickle.dumps(_Crafted(marker)))
    (crafted / "model.ckpt").write_bytes(pickle.dumps(_Crafted(marker)))
    with pytest.raises(FileNotFoundError, match=r"\['model.ckpt', 'pytorch_model.bin'\] are pickle-based"):
        Checkpoint(crafted)
    assert not marker.exists()
