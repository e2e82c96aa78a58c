"""QLoRA vs bf16 LoRA: weight bytes, compiled step memory, and the time cost of dequantization.

    python bench/bench_qlora.py [--d 2048 --layers 8 --time-d 1024 --time-layers 4 --reps 3]

Memory: a Llama (vocab 2048, so the layers' weights dominate) with every projection and the
head either bf16 or NF4 + double quantization, LoRA r=16 on all projections, Adam; the train
step is lowered from abstract shapes and compiled (nothing allocated) and XLA's memory analysis
gives argument and temporary bytes. Time: the same step on a smaller config with real weights,
bf16 compute, median wall time; the ratio is the cost of dequantizing inside the step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
import transformers as T

import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.models import lm_loss

QUANT = r"layers/(attn|mlp)/\w+_proj|lm_head"


def build(d: int, layers: int, quantized: bool, abstract: bool, remat: str = "none"):
    config = T.LlamaConfig(vocab_size=2048, hidden_size=d, intermediate_size=int(2.75 * d), num_hidden_layers=layers,
                           num_attention_heads=d // 64, num_key_value_heads=d // 128, tie_word_embeddings=False)
    model = hf.from_config(config, remat=remat)
    spec = lv.AdapterSpec(targets=r"layers/(attn|mlp)/\w+_proj", stacked=model.stacked, r=16, alpha=32)
    qspec = lv.QuantSpec(targets=QUANT, stacked=model.stacked)

    def make(key):
        params = model.init(key, jnp.bfloat16)
        if quantized:
            params = lv.quantize(params, qspec)
        return lv.adapt(params, spec, key)

    tree = jax.eval_shape(make, jax.random.PRNGKey(0)) if abstract else jax.jit(make)(jax.random.PRNGKey(0))
    return model, tree


def step_fn(model, frozen, opt):
    def step(t, s, ids):
        loss, g = jax.value_and_grad(lambda t: lm_loss(model.apply(lv.combine(t, frozen), ids), ids))(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    return step


def memory(d: int, layers: int, seq: int, batch: int, quantized: bool, remat: str) -> dict[str, float]:
    model, tree = build(d, layers, quantized, abstract=True, remat=remat)
    trainable, frozen = lv.split(tree)
    opt = optax.adam(1e-4)
    s = jax.eval_shape(opt.init, trainable)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    step = lambda t, f, s, ids: step_fn(model, f, opt)(t, s, ids)  # noqa: E731
    m = jax.jit(step).lower(trainable, frozen, s, ids).compile().memory_analysis()
    return {"frozen": lv.tree_bytes(frozen), "args": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes,
            "total": m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes}


def step_time(d: int, layers: int, seq: int, batch: int, quantized: bool, reps: int) -> float:
    model, tree = build(d, layers, quantized, abstract=False)
    trainable, frozen = lv.split(tree)
    opt = optax.adam(1e-4)
    s = opt.init(trainable)
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, 2048)
    step = jax.jit(step_fn(model, frozen, opt))
    trainable, s, loss = step(trainable, s, ids)
    loss.block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        trainable, s, loss = step(trainable, s, ids)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--time-d", type=int, default=1024)
    ap.add_argument("--time-layers", type=int, default=4)
    ap.add_argument("--time-seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(f"compiled train step, Llama d={a.d} layers={a.layers} vocab 2048, seq {a.seq} batch {a.batch}, "
          f"LoRA r=16 on all projections, bf16 base (MB):")
    print(f"{'':22} {'frozen weights':>15} {'arguments':>10} {'temporaries':>12} {'step total':>11}")
    for remat in ("none", "full"):
        lora, qlora = (memory(a.d, a.layers, a.seq, a.batch, q, remat) for q in (False, True))
        for name, m in (("bf16 LoRA", lora), ("QLoRA NF4", qlora)):
            print(f"{name + ', remat ' + remat:22} {m['frozen'] / 2**20:>15.1f} {m['args'] / 2**20:>10.1f} "
                  f"{m['temp'] / 2**20:>12.1f} {m['total'] / 2**20:>11.1f}")
        print(f"{'ratio, remat ' + remat:22} {qlora['frozen'] / lora['frozen']:>15.3f} {qlora['args'] / lora['args']:>10.3f} "
              f"{qlora['temp'] / lora['temp']:>12.3f} {qlora['total'] / lora['total']:>11.3f}")
    t_lora, t_q = (step_time(a.time_d, a.time_layers, a.time_seq, 2, q, a.reps) for q in (False, True))
    print(f"step time, d={a.time_d} layers={a.time_layers} seq {a.time_seq} batch 2, bf16 compute, median of {a.reps}: "
          f"LoRA {t_lora:.3f}s  QLoRA {t_q:.3f}s  QLoRA/LoRA {t_q / t_lora:.2f}")


if __name__ == "__main__":
    main()
