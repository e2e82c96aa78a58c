"""Tiny HF models with tokenizers and small datasets on disk, shared by the training-app tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorax_variants.hf.safetensors_io import SafetensorsFile
from tests import hf_models as H
from tests.env import xla_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("train_assets")
    texts = H.lm_texts(200)
    rows = [r | {"task": ("reviews", "tweets")[(i // 2) % 2]} for i, r in enumerate(H.sentiment(120))]
    H.tiny_run_model("llama_gqa_untied", d / "llama", texts)
    H.tiny_run_model("gpt2", d / "gpt2", texts)
    H.tiny_run_model("bert_base", d / "bert", [r["sentence"] for r in rows])
    (d / "lm.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    (d / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"dir": d, "llama": d / "llama", "gpt2": d / "gpt2", "bert": d / "bert", "lm": d / "lm.jsonl",
            "cls": d / "cls.jsonl"}


def lm_args(assets: dict[str, Path], out: Path, *extra: str, model: str = "llama") -> list[str]:
    return [f"model.path={assets[model]}", f"data.source={assets['lm']}", "data.seq_len=16", "train.batch_size=16",
            "train.steps=6", "train.log_every=1", "train.progress=false", f"train.output_dir={out}", "adapter.r=4",
            "optim.lr=0.01", "optim.warmup_steps=0", "train.samples=0", *extra]


def cls_args(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [f"model.path={assets['bert']}", "model.task=sequence_classification", f"data.source={assets['cls']}",
            "data.text_field=sentence", "data.label_field=sentiment", "data.seq_len=12", "train.batch_size=8",
            "train.steps=6", "train.log_every=1", "train.progress=false", f"train.output_dir={out}", "adapter.r=4",
            "optim.lr=0.01", "data.eval_fraction=0.2", *extra]


def cli(args: list[str], *, devices: int = 1, env: dict[str, str] | None = None, timeout: int = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    """``python -m train --set ...`` in a fresh process with ``devices`` simulated CPU devices."""
    e = xla_env(devices, PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, "-m", "train"] + [a for kv in args for a in (("--set", kv) if "=" in kv and not kv.startswith("-") else (kv,))]
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def adapters(out: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(out / "adapters.safetensors")
    return {k: np.asarray(f.get(k)) for k in f.keys()}


def losses(out: Path, kind: str = "train") -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == kind]


def train(args: list[str], resume: bool | None = None):
    """The app in this process (one CPU device): ``run(load(None, args))``."""
    from train.config import load
    from train.run import run

    return run(load(None, [a for a in args if "=" in a]), resume=resume)


def main(args: list[str], capsys) -> tuple[int, str]:
    """``python -m train`` in this process: (exit code, stderr)."""
    from train.cli import main as cli_main

    argv = [a for kv in args for a in (("--set", kv) if "=" in kv and not kv.startswith("-") else (kv,))]
    code = cli_main(argv)
    return code, capsys.readouterr().err
