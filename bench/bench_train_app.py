"""The training app end to end on a random Llama: steady-state tokens/s per variant, against full
fine-tuning (``adapter.variant=none`` with every leaf trainable) in the same process.

    python bench/bench_train_app.py [--d 1024 --layers 8 --seq 512 --batch 16 --steps 30 --dtype bfloat16]

Builds the model with transformers (random init) and a word-level tokenizer in a temp dir, writes
a synthetic corpus, and runs ``python -m train``'s ``run`` for each variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variants", default="full,lora,dora,vera,qlora")
    args = ap.parse_args()


    from tests import hf_models as H
    from train.config import load
    from train.run import run

    d = Path(tempfile.mkdtemp(prefix="bench-app-"))
    texts = H.lm_texts(4000)
    H.random_llama(d / "model", args.d, args.layers, texts)
    (d / "lm.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    common = [f"model.path={d / 'model'}", f"data.source={d / 'lm.jsonl'}", f"data.seq_len={args.seq}",
              f"train.batch_size={args.batch}", f"train.steps={args.steps}", "train.progress=false",
              "train.samples=0", f"model.param_dtype={args.dtype}", f"model.compute_dtype={args.dtype}",
              "train.log_every=1", "adapter.r=16", "adapter.alpha=32", "mesh.fsdp=-1"]
    sets = {"full": ["adapter.variant=none", "adapter.train_extra=.*"], "lora": [], "dora": ["adapter.variant=dora"],
            "vera": ["adapter.variant=vera", "adapter.r=256"], "qlora": ["quant.kind=nf4"]}
    rows = {}
    for name in args.variants.split(","):
        s = run(load(None, common + sets[name] + [f"train.output_dir={d / name}"])).summary
        rows[name] = s
        print(f"{name:6s} {s['tokens_per_second']:12,.0f} tok/s  {s['seconds_per_step'] * 1e3:8.1f} ms/step  "
              f"loss {s['final_train_loss']:.3f}  trainable {s['trainable_params']:,}", flush=True)
    if "full" in rows:
        print("\nspeed vs full fine-tuning (tokens/s ratio, same process):")
        for name, s in rows.items():
            print(f"  {name:6s} {s['tokens_per_second'] / rows['full']['tokens_per_second']:.2f}x")


if __name__ == "__main__":
    main()
