"""Train-step time against PEFT + PyTorch on CPU, same model, batch, rank and optimizer (AdamW).

    python bench/bench_vs_peft.py [--d 512 --layers 8 --seq 256 --batch 8 --r 16 --variants lora,dora,vera,adalora,full]

A Llama built with transformers (random init, fp32) is loaded by PEFT and by us (from its
safetensors); both adapt q/k/v/o/gate/up/down. Each step is forward + backward + AdamW update;
times are medians over ``--steps`` after warm-up (JAX: after compilation). Printed: ms/step each
and the ratio PEFT / ours (above 1: we are faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _median_ms(step, n: int, warm: int = 2) -> float:
    for _ in range(warm):
        step()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def torch_step_ms(model_dir: Path, variant: str, args) -> float:
    import peft
    import torch
    import transformers as T

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if variant != "full":
        cfg = {"lora": lambda: peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS),
               "dora": lambda: peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, use_dora=True),
               "vera": lambda: peft.VeraConfig(r=16 * args.r, target_modules=TARGETS),
               "adalora": lambda: peft.AdaLoraConfig(init_r=args.r, target_r=args.r // 2, target_modules=TARGETS,
                                                     total_step=1000)}[variant]()
        model = peft.get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size if variant == "full" else model.base_model.config.vocab_size,
                        (args.batch, args.seq))

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()

    return _median_ms(step, args.steps)


def jax_step_ms(model_dir: Path, variant: str, args) -> float:
    import jax
    import jax.numpy as jnp
    import optax

    import lorax_variants as lv
    from lorax_variants.hf import from_pretrained
    from train.step import task_loss

    model, params = from_pretrained(model_dir, scan=not args.unrolled)
    if variant == "full":
        trainable, frozen = params, jax.tree.map(lambda _: None, params)
    else:
        kind = {"lora": "lora", "dora": "dora", "vera": "vera", "adalora": "adalora"}[variant]
        r = 16 * args.r if variant == "vera" else args.r
        spec = lv.AdapterSpec(targets=r"layers/(attn|mlp)/(" + "|".join(TARGETS) + ")", stacked=model.stacked,
                              variant=kind, r=r, alpha=2 * r)
        trainable, frozen = lv.split(lv.adapt(params, spec, jax.random.key(0)))
    tx = optax.adamw(1e-4)
    opt_state = tx.init(trainable)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, model.config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}

    def loss(tr, fr, b):
        total, count, _ = task_loss("causal_lm", model.apply(lv.combine(tr, fr), b["input_ids"]), b)
        return jnp.sum(total) / jnp.sum(count)

    @jax.jit
    def step(tr, fr, st, b):
        g = jax.grad(loss)(tr, fr, b)
        up, st = tx.update(g, st, tr)
        return optax.apply_updates(tr, up), st

    state = [trainable, opt_state]

    def run():
        state[0], state[1] = step(state[0], frozen, state[1], batch)
        jax.block_until_ready(state[0])

    return _median_ms(run, args.steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", default="lora,dora,vera,adalora,full")
    ap.add_argument("--unrolled", action="store_true", help="our layers unrolled instead of lax.scan")
    ap.add_argument("--ours-only", action="store_true")
    args = ap.parse_args()
    import torch
    import transformers as T

    d = Path(tempfile.mkdtemp(prefix="bench-peft-")) / "llama"
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=8192, hidden_size=args.d, num_hidden_layers=args.layers,
                        num_attention_heads=args.d // 64, num_key_value_heads=args.d // 64,
                        intermediate_size=int(args.d * 8 / 3) // 64 * 64, max_position_embeddings=4 * args.seq)
    T.LlamaForCausalLM(cfg).save_pretrained(d)
    print(f"Llama d={args.d} layers={args.layers} seq={args.seq} batch={args.batch} r={args.r} fp32, "
          f"torch threads {torch.get_num_threads()}; median ms/step of {args.steps}")
    print(f"{'variant':8} {'PEFT+torch':>11} {'ours (JAX)':>11} {'PEFT/ours':>10}")
    for v in args.variants.split(","):
        theirs, ours = (float("nan") if args.ours_only else torch_step_ms(d, v, args)), jax_step_ms(d, v, args)
        print(f"{v:8} {theirs:11.1f} {ours:11.1f} {theirs / ours:9.2f}x", flush=True)


if __name__ == "__main__":
    main()
