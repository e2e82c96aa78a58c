"""What the high-rank and data-driven variants buy on a real model and real text, through the training app.

    python bench/bench_variant_quality.py [--steps 30 --seeds 0,1 --methods lora,rslora64,...]

The LM demo's setting (``make demo-lm`` fetches the assets): SmolLM2-135M-Instruct (from its GGUF) learns the
State of the Union addresses 1790-2011 and is scored on those of 2012-2021 (held-out next-token loss). Every
method adapts every projection of every layer with the same steps, batch, sequence length and schedule, at
about LoRA r=16's trainable-parameter count (MiSS at r=32: r·out per weight), with the learning rate its
method's papers and PEFT's examples use for this scale. Printed per method: trainable parameters, held-out
loss per seed and its mean, and the step time against LoRA's (each run's seconds per step after its compiling
first step, all runs in this one process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# method -> app settings (beyond the shared ones below)
METHODS = {
    "lora": ["adapter.r=16", "adapter.alpha=32", "optim.lr=1e-3"],
    "rslora64": ["adapter.r=64", "adapter.alpha=16", "adapter.rslora=true", "optim.lr=1e-3"],  # s = 16/√64 = 2
    "dora": ["adapter.variant=dora", "adapter.r=16", "adapter.alpha=32", "optim.lr=1e-3"],
    "hira": ["adapter.variant=hira", "adapter.r=16", "optim.lr=3e-3"],
    "miss": ["adapter.variant=miss", "adapter.r=32", "optim.lr=1e-3"],
    "shira": ["adapter.variant=shira", "adapter.r=16", "adapter.shira.random_seed=0", "optim.lr=3e-3"],
    "lora_ga": ["adapter.init=lora_ga", "adapter.r=16", "adapter.alpha=32", "adapter.lora_ga.batches=4",
                "optim.lr=1e-3"],
    # EVA at tau 0.9 over 8 batches: at PEFT's tau 0.99 three layers' input PCA had not converged after 20 passes
    # over 4 batches (measured); the app refuses rather than use unconverged components
    "eva": ["adapter.init=eva", "adapter.r=16", "adapter.alpha=32", "adapter.eva.batches=8", "adapter.eva.tau=0.9",
            "optim.lr=1e-3"],
}


def run_one(method: str, seed: int, base: Path, data: Path, out: Path, steps: int, seq_len: int) -> dict:
    from train.config import load
    from train.run import run

    run_dir = out / f"{method}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"model.path={base}", "model.task=causal_lm", f"data.source={data / 'train'}", "data.format=text",
            f"data.eval_source={data / 'eval'}", f"data.seq_len={seq_len}", "data.packing=stream",
            f"data.seed={seed}", f"adapter.seed={seed}", "adapter.targets=layers/(attn|mlp)/\\w+_proj",
            "optim.warmup_steps=3", "optim.schedule=linear", f"train.steps={steps}", "train.batch_size=8",
            "train.log_every=1", "train.eval_every=0", "train.eval_batches=4", "train.samples=0",
            "train.progress=false", "train.checkpoint_every=0", f"train.output_dir={run_dir}", *METHODS[method]]
    t0 = time.perf_counter()
    result = run(load(None, sets))
    return {"loss": result.summary["eval"]["loss"], "trainable": result.summary["trainable_params"],
            "step_s": result.summary["seconds_per_step"], "wall_s": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="runs/bench-variant-quality")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from train.demo_lm import _prepare

    out = Path(a.out)
    base, data = _prepare(out, 2012)
    methods = a.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    res: dict[str, list[dict]] = {}
    for m in methods:
        for s in seeds:
            r = run_one(m, s, base, data, out / "runs", a.steps, a.seq_len)
            res.setdefault(m, []).append(r)
            print(f"{m} seed {s}: held-out loss {r['loss']:.4f}, {r['trainable']:,} trainable, "
                  f"{r['step_s']:.2f} s/step, run {r['wall_s']:.0f} s", flush=True)
    lora_step = statistics.mean(r["step_s"] for r in res["lora"]) if "lora" in res else None
    print(f"\nSmolLM2-135M-Instruct, State of the Union (held out: 2012-2021), {a.steps} steps x 8 x {a.seq_len} "
          f"tokens, {os.cpu_count()} CPU cores")
    print("| method | trainable | held-out loss per seed | mean | step time / LoRA |")
    print("|---|---|---|---|---|")
    for m, rs in res.items():
        mean = statistics.mean(r["loss"] for r in rs)
        ratio = statistics.mean(r["step_s"] for r in rs) / lora_step if lora_step else float("nan")
        per_seed = " / ".join(f"{r['loss']:.4f}" for r in rs)
        print(f"| {m} | {rs[0]['trainable']:,} | {per_seed} | {mean:.4f} | {ratio:.2f} |")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
