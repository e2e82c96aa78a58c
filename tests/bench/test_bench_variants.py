"""The training-quality benchmark runs every variant and optimizer end to end (reduced)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("bench_variants", Path(__file__).parents[2] / "bench" / "bench_variants.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.slow  # a minute of compiles; every variant also learns through the app in tests/train/test_app.py
def test_every_variant_learns_in_a_short_run():
    res = bench.run(steps=25, pretrain=10, seq=32, batch=8, r=4)
    assert set(res) == {"untuned base", "LoRA", "LoRA+", "LoRA-FA", "rsLoRA", "VeRA", "DoRA", "AdaLoRA", "Delta-LoRA",
                        "DyLoRA", "SoRA", "LoRA-drop", "full", "LoRA @5e-4", "LoRA+ @5e-4", "HiRA", "MiSS", "SHiRA",
                        "LoRA-GA", "EVA"}
    for name, r in res.items():
        if name == "untuned base":
            continue
        losses = r["losses"]
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), name  # training loss falls
        assert np.isfinite(r["eval"])
    assert res["full"]["trainable"] > 10 * res["LoRA"]["trainable"] > 10 * res["VeRA"]["trainable"] / 10
