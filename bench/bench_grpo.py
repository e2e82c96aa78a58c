"""One GRPO iteration of the training app split into rollout and update, and the rollout against plain
``generate`` on the same prompts, in one process.

    python bench/bench_grpo.py [--d 256 --layers 4 --prompts 4 --group 8 --new 32 --reps 5]

Builds a random Llama with transformers (and a word-level tokenizer) in a temp dir, prepares a GRPO run through
the app (``train.run._prepare``, LoRA r=16 on every projection) and times, each the median of ``--reps`` after
a compiling call: the rollout (``train.rollout.rollout``: ``group_size`` sampled completions of each prompt with
the KV cache, decoding, the reward function, the update's rows), ``generate`` alone with the same arguments,
and the update (the app's jitted train step on the rollout's rows). Printed: seconds, tokens/s of the
generated tokens, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def words(prompt, completion, row):
    """A stand-in reward: a tenth of the completion's word count."""
    return len(completion.split()) / 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=9)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import lorax_variants as lv
    from tests import hf_models as H
    from train.config import load
    from train.rollout import rollout
    from train.run import _global_batch, _prepare, _steps, stop_tokens

    d = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    texts = H.lm_texts(400)
    H.random_llama(d / "model", a.d, a.layers, texts)
    (d / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": " ".join(t.split()[:8])}) for t in texts))
    b = a.prompts * a.group
    c = load(None, [f"model.path={d / 'model'}", f"data.source={d / 'prompts.jsonl'}", "data.prompt_field=prompt",
                    f"data.seq_len={16 + a.new}", "train.objective=grpo", "objective.grpo.reward=bench_grpo:words",
                    f"objective.grpo.group_size={a.group}", f"objective.grpo.max_completion_length={a.new}",
                    f"train.batch_size={b}", "adapter.r=16", "adapter.alpha=32", f"train.output_dir={d / 'run'}",
                    "train.progress=false"])
    sys.path.insert(0, str(Path(__file__).parent))
    p = _prepare(c, abstract=False)
    s, model, tok = c.objective.grpo, p.built.model, p.tokenizer
    tree = lv.combine(p.built.trainable, p.built.frozen)
    prompts = {k: v[: a.prompts] for k, v in p.train.arrays.items()}
    texts_, rows = p.train.prompt_rows
    stops = stop_tokens(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = np.repeat(prompts["input_ids"], a.group, axis=0)
    mask = np.repeat(prompts["attention_mask"], a.group, axis=0)

    def timed(*fns):
        """Median seconds of each of ``fns`` (called with the rep's index), compiled first, run alternately so
        that the machine's drift falls on all of them alike."""
        for fn in fns:
            fn(0)
        out = [[] for _ in fns]
        for i in range(a.reps):
            for fn, times in zip(fns, out):
                start = time.perf_counter()
                fn(i + 1)
                times.append(time.perf_counter() - start)
        return [statistics.median(t) for t in out]

    rolls = []
    t_roll, t_gen = timed(
        lambda i: rolls.append(rollout(model, tree, tok, prompts, texts_, rows, s, words, jax.random.key(i), stops,
                                       c.data.seq_len)),
        lambda i: np.asarray(jax.device_get(model.generate(
            tree, ids, attention_mask=mask, max_new_tokens=a.new, temperature=s.temperature, stop_tokens=stops,
            pad_token_id=pad, key=jax.random.key(i)))))
    generated = float(np.mean([r["length"].sum() for r in rolls]))
    fns = _steps(p)
    roll = rolls[-1]
    adv = np.asarray(lv.objectives.group_advantages(jnp.asarray(roll["reward"]), a.group))
    items = float((roll["loss_mask"][:, 1:] * roll["attention_mask"][:, 1:]).sum())
    local = {k: roll[k] for k in ("input_ids", "attention_mask", "loss_mask")} | {
        "advantages": adv.astype(np.float32), "share": np.ones(b, np.float32), "num_items": np.full(b, items, np.float32)}
    batch = _global_batch(local, 1, fns)
    state = {"t": p.built.trainable, "o": jax.jit(p.optimizer.init)(p.built.trainable)}

    def update(i):
        t, _, o, m = fns.train(state["t"], p.built.frozen, state["o"], batch, jnp.int32(i), jax.random.key(0))
        jax.block_until_ready(m["loss"])
        state.update(t=t, o=o)

    (t_upd,) = timed(update)
    print(f"Llama d={a.d} layers={a.layers}, LoRA r=16; {a.prompts} prompts x {a.group} completions, up to {a.new} "
          f"new tokens (mean {generated / b:.1f} generated), {jax.devices()[0].platform}")
    print(f"{'part':34} {'median s':>9} {'generated tok/s':>16} {'/ generate':>11}")
    print(f"{'generate alone':34} {t_gen:>9.3f} {generated / t_gen:>16,.0f} {1.0:>11.2f}")
    print(f"{'rollout (generate+decode+reward)':34} {t_roll:>9.3f} {generated / t_roll:>16,.0f} {t_roll / t_gen:>11.2f}")
    print(f"{'update (train step)':34} {t_upd:>9.3f} {'':>16} {t_upd / t_gen:>11.2f}")
    print(f"one GRPO iteration: {t_roll + t_upd:.3f} s, rollout {t_roll / (t_roll + t_upd):.0%} of it")


if __name__ == "__main__":
    main()
