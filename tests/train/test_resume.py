"""Interrupted and resumed runs end bit-identical to uninterrupted ones; signals save first."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train.conftest import ROOT, adapters, lm_args, losses, main, train
from tests.env import xla_env

# Dropout and DyLoRA's sampled rank make the RNG part of the state that must resume exactly.
VARIANTS = {"lora_dropout": ["adapter.dropout=0.1"], "dylora": ["adapter.variant=dylora"],
            "adalora": ["adapter.variant=adalora", "adapter.adalora.target_r=2", "adapter.adalora.tinit=1",
                        "adapter.adalora.tfinal=2"],
            "delta_lora": ["adapter.variant=delta_lora", "adapter.delta_lora.start=1"],
            # Stopped after the selection (step 2): the checkpoint carries the keep mask.
            "lora_drop": ["adapter.variant=lora_drop", "adapter.lora_drop.select_at=2", "adapter.lora_drop.threshold=0.5"],
            # Many adapters: tuples of per-adapter leaves (None where an adapter is absent) in the checkpoint.
            "many": ["adapter.variant=many", "data.source=", "adapter.many.adapters=[{name: a, r: 4, source: LM_FILE}, "
                     "{name: b, variant: dora, r: 2, targets: 'layers/attn/(q|v)_proj', source: LM_FILE}]"]}


# By default LoRA-drop (its selection resumed) and the SIGTERM case below (LoRA); dropout's RNG and the others in
# CI's slow pass.
@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS])  # CI's test-slow; the
# default run resumes after SIGTERM below
def test_stop_and_resume_is_bit_identical(assets, tmp_path, variant, capsys):
    extra = ["train.steps=8", *(a.replace("LM_FILE", str(assets["lm"])) for a in VARIANTS[variant])]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(lm_args(assets, whole, *extra))
    first = train(lm_args(assets, split, *extra, "train.stop_at=3"))
    assert first.summary["stopped_at"] == 3
    assert not (split / "adapters.safetensors").exists()
    capsys.readouterr()
    train(lm_args(assets, split, *extra))
    assert "resumed from step 3" in capsys.readouterr().err
    a, b = adapters(whole), adapters(split)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # bit for bit
    assert losses(split) == losses(whole)  # the resumed steps log the same losses (steps 1-3, then 4-8)


def test_fresh_refuses_existing_checkpoints_and_resume_needs_one(assets, tmp_path, capsys):
    out = tmp_path / "run"
    train(lm_args(assets, out, "train.steps=2"))
    code, err = main(lm_args(assets, out, "train.steps=2", "--fresh"), capsys)
    assert code == 2 and "already has checkpoints" in err
    code, err = main(lm_args(assets, tmp_path / "none", "--resume"), capsys)
    assert code == 2 and "has no checkpoint" in err


def test_resume_with_another_adapter_config_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "run"
    train(lm_args(assets, out, "train.steps=4", "train.stop_at=2"))
    code, err = main(lm_args(assets, out, "train.steps=4", "adapter.r=2"), capsys)
    assert code == 2
    assert "adapter_spec differs" in err and "r: checkpoint 4, this run 2" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_saves_then_resume_matches(assets, tmp_path, sig):
    extra = ["train.steps=200", "train.log_every=1", "adapter.dropout=0.1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(lm_args(assets, whole, *extra))
    env = xla_env(1, PYTHONPATH=str(ROOT))
    args = [a for kv in lm_args(assets, cut, *extra) for a in ("--set", kv)]
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 120
    def steps_logged() -> int:  # train rows only (the log holds other rows too)
        return metrics.read_text().count('"kind": "train"') if metrics.exists() else 0

    while time.time() < deadline and steps_logged() < 5:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    stopped = int(err.split("after step ")[1].split(";")[0])
    assert 5 <= stopped < 200, err[-500:]
    assert (cut / "checkpoints" / str(stopped)).is_dir()
    train(lm_args(assets, cut, *extra))
    a, b = adapters(whole), adapters(cut)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def _steps(out):
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_resume_on_other_weights_of_the_same_shapes_is_refused_naming_both(assets, tmp_path, capsys):
    """Same config.json, same tensor headers, one weight changed: the weights' bytes tell the models apart."""
    import json
    import shutil

    from lorax_variants.hf.safetensors_io import SafetensorsFile, write_safetensors

    other = tmp_path / "other"
    shutil.copytree(assets["llama"], other)
    f = SafetensorsFile(other / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    name = sorted(k for k in tensors if k.endswith("q_proj.weight"))[0]
    tensors[name][0, 0] += 1.0
    write_safetensors(other / "model.safetensors", tensors, f.metadata)
    assert (other / "model.safetensors").stat().st_size == (assets["llama"] / "model.safetensors").stat().st_size
    out = tmp_path / "run"
    train(lm_args(assets, out, "train.steps=4", "train.stop_at=2"))
    code, err = main(lm_args(assets, out, "train.steps=4", f"model.path={other}"), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"trained on the base model at {assets['llama']}" in err and f"model.path={other} holds other weights" in err
    assert "--force-base" in err and _steps(out) == [2]
    code, err = main(lm_args(assets, out, "train.steps=4", f"model.path={other}", "--force-base"), capsys)
    assert code == 0 and "warning: --force-base" in err
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert len(events) == 1 and "--force-base" in events[0]["message"]  # logged with the run


def test_lowering_train_steps_never_relabels_or_prunes_checkpoints(assets, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train.checkpoint_every=2", "train.keep=2"]
    train(lm_args(assets, out, "train.steps=6", *args))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    adapters_before = adapters(out)
    code, err = main(lm_args(assets, out, "train.steps=3", *args), capsys)
    assert code == 2 and "Traceback" not in err
    assert "train.steps=3" in err and "checkpoint at step 6" in err and "set train.steps to 6 or more" in err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before  # nothing relabelled or pruned
    after = adapters(out)
    assert all(np.array_equal(after[k], adapters_before[k]) for k in after)
    # the same end again is a finished run: nothing trains, nothing is pruned
    assert main(lm_args(assets, out, "train.steps=6", *args), capsys)[0] == 0
    assert _steps(out) == [4, 6]
    # a stop step already passed: nothing to do (it used to run on to the end)
    code, err = main(lm_args(assets, out, "train.steps=8", "train.stop_at=5", *args), capsys)
    assert code == 0 and "at or past train.stop_at=5: nothing to do" in err and _steps(out) == [4, 6]
