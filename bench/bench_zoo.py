"""Model zoo: compile time against depth (scan vs unrolled), and forward+backward against
transformers (PyTorch CPU) on the same Llama config, as ratios measured in one run.

    python bench/bench_zoo.py [--d 512 --seq 256 --batch 4 --layers 4 --reps 5]

Compile: a LoRA train step (grad over adapters on q/v, Adam) of a Llama with 2, 8 and 32
layers, lowered from abstract shapes (nothing allocated) and compiled; ratio to 2 layers.
Speed: full forward + backward of the loss (all weights trainable, as torch's
``loss.backward()``), median wall time; ratio JAX / torch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers as T

import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.models import lm_loss


def llama_config(d: int, layers: int) -> T.LlamaConfig:
    return T.LlamaConfig(vocab_size=8192, hidden_size=d, intermediate_size=int(2.75 * d), num_hidden_layers=layers,
                         num_attention_heads=d // 64, num_key_value_heads=max(1, d // 128), max_position_embeddings=4096)


def compile_seconds(d: int, layers: int, seq: int, batch: int, scan: bool) -> float:
    model = hf.from_config(llama_config(d, layers), scan=scan)
    spec = lv.AdapterSpec(targets=r"layers/attn/(q|v)_proj", stacked=model.stacked, r=8)
    abstract = jax.eval_shape(lambda k: lv.adapt(model.init(k), spec, k), jax.random.PRNGKey(0))
    trainable, frozen = lv.split(abstract)
    opt = optax.adam(1e-4)
    opt_state = jax.eval_shape(opt.init, trainable)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def step(t, f, s, ids):
        loss, g = jax.value_and_grad(lambda t: lm_loss(model.apply(lv.combine(t, f), ids), ids))(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    t0 = time.perf_counter()
    jax.jit(step).lower(trainable, frozen, opt_state, ids).compile()
    return time.perf_counter() - t0


def fwd_bwd_ratio(d: int, layers: int, seq: int, batch: int, reps: int) -> tuple[float, float]:
    config = llama_config(d, layers)
    torch.manual_seed(0)
    torch_model = T.LlamaForCausalLM(config).train()
    model = hf.from_config(config)
    params = hf.params_from_hf(model, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()},
                               leaf_fn=lambda _, a: jnp.asarray(a))
    ids_np = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq))
    ids = jnp.asarray(ids_np)
    grad = jax.jit(jax.value_and_grad(lambda p: lm_loss(model.apply(p, ids), ids)))
    jax.block_until_ready(grad(params))
    jt = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(params))
        jt.append(time.perf_counter() - t0)
    tids = torch.as_tensor(ids_np)
    tt = []
    for i in range(reps + 1):
        torch_model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        torch_model(input_ids=tids, labels=tids).loss.backward()
        if i:
            tt.append(time.perf_counter() - t0)
    return statistics.median(jt), statistics.median(tt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 8, 32])
    a = ap.parse_args()
    print(f"Llama d={a.d} seq={a.seq} batch={a.batch}; torch threads {torch.get_num_threads()}, jax {jax.devices()[0].platform}")
    print("compile time of a LoRA train step (s), ratio to the shallowest:")
    print(f"{'layers':>6} {'scan':>8} {'ratio':>6} {'unrolled':>9} {'ratio':>6}")
    base = {}
    for depth in a.depths:
        row = {}
        for scan in (True, False):
            row[scan] = compile_seconds(a.d, depth, a.seq, a.batch, scan)
            base.setdefault(scan, row[scan])
        print(f"{depth:>6} {row[True]:>8.2f} {row[True] / base[True]:>6.2f} {row[False]:>9.2f} {row[False] / base[False]:>6.2f}")
    jax_s, torch_s = fwd_bwd_ratio(a.d, a.layers, a.seq, a.batch, a.reps)
    print(f"forward+backward, {a.layers} layers, median of {a.reps}: jax {jax_s:.3f}s  torch {torch_s:.3f}s  "
          f"jax/torch {jax_s / torch_s:.2f}")


if __name__ == "__main__":
    main()
