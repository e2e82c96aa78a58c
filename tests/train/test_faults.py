"""Fault injection over run directories. Every file of a finished run, and of a run killed while it wrote a
checkpoint, is damaged in turn (cut to half, a byte range zeroed, deleted, replaced by the file of another
run), then the run is resumed, exported and reported. Each case must end in one of:

- ``ok``: the right result (a resume ends with the adapters of the undamaged run, bit for bit; an export
  writes the same tensors), possibly after a fallback the log states (the previous good checkpoint, the
  checkpoint's own copy of the config, a metrics file moved aside);
- ``error``: exit status 2 and one message that names the damaged file;

never a traceback, never a silently different result, and no checkpoint file the user had is deleted (a
damaged step is moved to ``damaged-checkpoints/``). Also here: a config changed between runs in each field
that matters, and a disk that fills up while a checkpoint is written.

The default run takes ``REDUCED``; the whole matrix (every file x every damage x every action) is ``slow``.
``LORAX_FAULT_TABLE=path`` writes the outcomes of the cases run as JSON lines (the README's table).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lorax_variants.hf.safetensors_io import SafetensorsFile
from tests.train.conftest import ROOT, adapters, lm_args, main
from tests.env import xla_env

BASE = ["train.steps=6", "train.checkpoint_every=2", "train.keep=3", "data.eval_fraction=0.1", "train.eval_every=0"]
OPS = ("truncate", "zero", "delete", "replace")
ACTIONS = ("resume", "export", "report")


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """A finished run, another run (its files replace ours), a run killed before its second checkpoint's
    rename, the finished run's adapters and its PEFT export (the right results)."""
    d = tmp_path_factory.mktemp("faults")
    from tests.train.conftest import train

    train(lm_args(assets, d / "finished", *BASE))
    train(lm_args(assets, d / "other", *BASE, "adapter.seed=1", "data.seed=1"))
    env = xla_env(1, PYTHONPATH=str(ROOT))
    argv = [a for kv in lm_args(assets, d / "killed", *BASE) for a in ("--set", kv)]
    proc = subprocess.run([sys.executable, "-m", "tests.train.crash", "ckpt_finalize", "4", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in (d / "killed" / "checkpoints").iterdir())
    assert names[0] == "2" and names[1].startswith("4.") and "tmp" in names[1], names  # killed committing step 4
    from train.export import export

    for which in ("finished", "killed"):  # what an export of the undamaged run writes (its latest checkpoint)
        export(d / which, "peft", d / f"export_{which}")
    return {"dir": d, "finished": d / "finished", "other": d / "other", "killed": d / "killed",
            "adapters": adapters(d / "finished"), "export": {w: _tensors(d / f"export_{w}") for w in ("finished", "killed")}}


def _tensors(export_dir: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(export_dir / "adapter_model.safetensors")
    return {k: np.asarray(f.get(k)) for k in f.keys()}


def _counterpart(run: Path, other: Path, rel: str) -> Path:
    """The other run's file at ``rel``, or (content-addressed names differ) the one at the same place in its
    directory's sorted listing."""
    if (other / rel).is_file():
        return other / rel
    parent = (other / rel).parent
    siblings = sorted(p for p in parent.iterdir() if p.is_file()) if parent.is_dir() else []
    ours = sorted(p.name for p in (run / rel).parent.iterdir() if p.is_file())
    if not siblings:
        pytest.skip(f"the other run has no file like {rel}")
    return siblings[min(ours.index(Path(rel).name), len(siblings) - 1)]


def damage(run: Path, rel: str, op: str, other: Path) -> None:
    p = run / rel
    size = p.stat().st_size
    if op == "truncate":
        os.truncate(p, size // 2)
    elif op == "zero":
        data = bytearray(p.read_bytes())
        lo, hi = (size // 4, max(size // 4 + 1, size // 2)) if size >= 4 else (0, size)
        data[lo:hi] = bytes(hi - lo)
        p.write_bytes(bytes(data))
    elif op == "delete":
        p.unlink()
    else:
        shutil.copyfile(_counterpart(run, other, rel), p)


def _checkpoint_files(d: Path) -> set[str]:
    """Files of committed steps, with a damaged step's files counted where they came from (temporary
    directories of a killed save are not the user's: orbax removes them)."""
    out = set()
    for sub in ("checkpoints", "damaged-checkpoints"):
        steps = [p for p in (d / sub).iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)] if (d / sub).is_dir() else []
        for step in steps:
            for p in step.rglob("*"):
                if p.is_file():
                    out.add(str(Path("checkpoints", step.name.split(".")[0], p.relative_to(step))))
    return out


def act(action: str, d: Path, assets: dict, capsys) -> tuple[int, str]:
    if action == "resume":
        return main(lm_args(assets, d, *BASE), capsys)
    if action == "export":
        return main(["export", "--checkpoint", str(d), "--format", "peft", "--out", str(d.parent / "export")], capsys)
    return main(["report", str(d)], capsys)


def check(runs: dict, which: str, rel: str, op: str, action: str, tmp_path: Path, assets: dict, capsys) -> str:
    """Damage ``rel`` of a copy of run ``which`` by ``op``, run ``action``, check the outcome; returns it."""
    d = tmp_path / "run"
    shutil.copytree(runs[which], d)
    damage(d, rel, op, runs["other"])
    before = _checkpoint_files(d)
    code, err = act(action, d, assets, capsys)
    where = str(d / rel)
    assert "Traceback" not in err, err[-3000:]
    assert before <= _checkpoint_files(d), sorted(before - _checkpoint_files(d))  # nothing the user had is deleted
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("train: error:")]
        assert len(errors) == 1, err[-3000:]
        assert where in errors[0], errors[0]  # the damaged file, by name
        return "error: names the file"
    assert code == 0, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith(("warning:", "note:", "train export: "))
            and where in line or (rel.startswith("checkpoints/") and "damaged" in line)]
    if action == "resume":
        got = adapters(d)
        assert sorted(got) == sorted(runs["adapters"])
        assert all(np.array_equal(got[k], runs["adapters"][k]) for k in got), "resumed to different adapters"
        assert json.loads((d / "summary.json").read_text())["steps"] == 6
    elif action == "export":
        got, want = _tensors(d.parent / "export"), runs["export"][which]
        assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in got), "a different export"
    else:
        assert (d / "report" / "index.html").is_file()
    moved = (d / "damaged-checkpoints").is_dir()
    return "ok: " + ("fell back to the previous checkpoint, said so" if moved else
                     "said what it did" if said else "unaffected or rewritten")


def _record(which: str, rel: str, op: str, action: str, outcome: str) -> None:
    path = os.environ.get("LORAX_FAULT_TABLE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"run": which, "file": rel, "damage": op, "action": action, "outcome": outcome}) + "\n")


def _latest_data_file(run: Path, step: int) -> str:
    data = sorted((run / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d").iterdir())
    return str(max(data, key=lambda p: p.stat().st_size).relative_to(run))


# (run, file or a callable of the run dir giving it, damage, action, expected outcome prefix)
REDUCED = [
    ("finished", "checkpoints/6/meta/metadata", "truncate", "resume", "ok: fell back"),
    ("finished", lambda r: _latest_data_file(r, 6), "zero", "resume", "ok: fell back"),
    ("finished", lambda r: _latest_data_file(r, 6), "replace", "export", "error"),
    ("finished", "checkpoints/6/manifest.json", "delete", "resume", "ok"),
    ("finished", "config.json", "truncate", "export", "ok: said"),
    ("finished", "metrics.jsonl", "zero", "resume", "ok: said"),
    ("finished", "metrics.jsonl", "replace", "report", "error"),
    ("finished", "summary.json", "replace", "report", "error"),
    ("killed", "checkpoints/2/state/_METADATA", "zero", "resume", "error"),
]


@pytest.mark.parametrize("case", range(len(REDUCED)), ids=[f"{w}-{f if isinstance(f, str) else 'data'}-{o}-{a}"
                                                           for w, f, o, a, _ in REDUCED])
def test_reduced_fault_matrix(runs, assets, tmp_path, capsys, case):
    which, rel, op, action, want = REDUCED[case]
    rel = rel if isinstance(rel, str) else rel(runs[which])
    outcome = check(runs, which, rel, op, action, tmp_path, assets, capsys)
    _record(which, rel, op, action, outcome)
    assert outcome.startswith(want), outcome


def _all_cases() -> list[tuple[str, str, str, str]]:
    """Every file of the finished and the killed run (their layout is fixed by the fixture's settings: the
    listing is taken from a run made the same way at collection time, lazily, by the test itself)."""
    return [(w, op, a) for w in ("finished", "killed") for op in OPS for a in ACTIONS]


@pytest.mark.slow
@pytest.mark.parametrize("which, op, action", _all_cases())
def test_full_fault_matrix(runs, assets, tmp_path, capsys, which, op, action):
    """Every file of the run directory, damaged by ``op``, then ``action``: each one a checked outcome."""
    failures = []
    for i, rel in enumerate(_files(runs[which])):
        sub = tmp_path / str(i)
        sub.mkdir()
        try:
            outcome = check(runs, which, rel, op, action, sub, assets, capsys)
        except pytest.skip.Exception:
            continue
        except AssertionError as e:
            failures.append(f"{rel}: {str(e)[:500]}")
            continue
        _record(which, rel, op, action, outcome)
        shutil.rmtree(sub, ignore_errors=True)
    assert not failures, "\n".join(failures)


# A config changed between the runs of one directory: each field that matters is refused by name; a mesh
# change resumes (the state is resharded; the batches are the same global batches).
CHANGES = {
    "variant": ("adapter.variant=dora", r"variant: checkpoint 'lora', this run 'dora'"),
    "rank": ("adapter.r=2", r"r: checkpoint 4, this run 2"),
    "targets": ("adapter.targets=layers/attn/q_proj", r"adapter_spec differs: targets"),
    "quantization": ("quant.kind=nf4 quant.block_size=32", r"quant_spec differs"),
    "seq_len": ("data.seq_len=8", r"data.seq_len differs"),
    "batch": ("train.batch_size=8", r"train.batch_size differs"),
    "data": ("data.source=LM_COPY", r"data.source differs"),
}


@pytest.fixture(scope="module")
def stopped(runs, assets):
    out = runs["dir"] / "stopped"
    from tests.train.conftest import train

    train(lm_args(assets, out, *BASE, "train.stop_at=2"))
    return out


@pytest.mark.parametrize("field", [pytest.param(f, marks=() if f in ("targets", "quantization", "seq_len")
                                                else pytest.mark.slow) for f in CHANGES])
def test_a_changed_config_is_refused_by_field(stopped, assets, tmp_path, capsys, field):
    d = tmp_path / "run"
    shutil.copytree(stopped, d)
    before = sorted(_files(d / "checkpoints"))
    change, message = CHANGES[field]
    if "LM_COPY" in change:
        shutil.copy(assets["lm"], tmp_path / "copy.jsonl")
        change = change.replace("LM_COPY", str(tmp_path / "copy.jsonl"))
    code, err = main(lm_args(assets, d, *BASE, *change.split()), capsys)
    assert code == 2 and "Traceback" not in err and re.search(message, err), err[-2000:]
    assert sorted(_files(d / "checkpoints")) == before


@pytest.mark.slow
def test_a_changed_mesh_resumes_resharded(stopped, runs, assets, tmp_path):
    from tests.train.conftest import cli

    d = tmp_path / "run"
    shutil.copytree(stopped, d)
    proc = cli(lm_args(assets, d, *BASE, "mesh.fsdp=2"), devices=2)
    assert "resumed from step 2" in proc.stderr
    got, want = adapters(d), runs["adapters"]
    for k in want:  # the same steps on the same batches; only the order of float sums differs
        scale = max(float(np.abs(want[k]).max()), 1e-30)
        assert float(np.abs(got[k] - want[k]).max()) / scale < 1e-4, k


def test_disk_full_while_a_checkpoint_is_written_keeps_the_previous_one(runs, assets, tmp_path, capsys, monkeypatch):
    """The second checkpoint's write fails with ENOSPC: a named error, checkpoint 2 intact, and the next run
    resumes from it to the undamaged run's adapters."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
    from orbax.checkpoint._src.handlers import standard_checkpoint_handler as sh

    orig, calls = jh.JsonCheckpointHandler.async_save, []

    async def full(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", "meta")
        return await orig(self, *a, **k)

    # orbax raises at once while the state item's writes go on in their own threads; one made slow here
    # (a write landing 0.5 s late) must be over before the run returns, or it races the next run's cleanup
    orig_state, late, state_calls = sh.StandardCheckpointHandler.async_save, [], []

    async def slow(self, directory, *a, **k):
        state_calls.append(1)

        def write_late():
            time.sleep(0.5)
            (Path(directory) / "late").write_text("x")
            late.append(Path(directory) / "late")

        if len(state_calls) == 2:  # the save whose meta fails
            threading.Thread(target=write_late, name="slow-writer").start()
        return await orig_state(self, directory, *a, **k)

    monkeypatch.setattr(jh.JsonCheckpointHandler, "async_save", full)
    monkeypatch.setattr(sh.StandardCheckpointHandler, "async_save", slow)
    d = tmp_path / "run"
    code, err = main(lm_args(assets, d, *BASE), capsys)
    assert code == 2 and "No space left on device" in err and "Traceback" not in err, err[-2000:]
    assert len(late) == 1, "the run returned while a writer of its failed save was still writing"
    monkeypatch.setattr(jh.JsonCheckpointHandler, "async_save", orig)
    monkeypatch.setattr(sh.StandardCheckpointHandler, "async_save", orig_state)
    assert sorted(p.name for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    code, err = main(lm_args(assets, d, *BASE), capsys)
    assert code == 0 and "resumed from step 2" in err, err[-2000:]
    got = adapters(d)
    assert all(np.array_equal(got[k], runs["adapters"][k]) for k in runs["adapters"])


def test_disk_full_while_the_manifest_is_written_leaves_a_readable_checkpoint(runs, assets, tmp_path, capsys,
                                                                              monkeypatch):
    """The write fails after orbax committed the step, before its manifest: the step is read unverified (said)."""
    from train import checkpoint as ckpt

    orig = ckpt.Checkpointer._write_manifest

    def full(self, step):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / str(step) / ckpt.MANIFEST))
        return orig(self, step)

    monkeypatch.setattr(ckpt.Checkpointer, "_write_manifest", full)
    d = tmp_path / "run"
    code, err = main(lm_args(assets, d, *BASE), capsys)
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    monkeypatch.setattr(ckpt.Checkpointer, "_write_manifest", orig)
    code, err = main(lm_args(assets, d, *BASE), capsys)
    assert code == 0 and "resumed from step 4" in err and "has no manifest.json" in err, err[-2000:]
    got = adapters(d)
    assert all(np.array_equal(got[k], runs["adapters"][k]) for k in runs["adapters"])
