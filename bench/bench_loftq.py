"""LoftQ against QLoRA's start on real weights: ‖W − (Q + s·A B)‖_F per layer for the q/k/v/o/gate/up/down
projections of SmolLM2-135M (from its GGUF, ``make assets``), NF4 blocks of 64, r=16, alpha=32, LoftQ with T
alternations; the ratio LoftQ / QLoRA (QLoRA starts at B = 0, so its error is ‖W − Q‖).

    python bench/bench_loftq.py [--iters 1,5] [--r 16] [--layers 0,14,29]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.variants.loftq import loftq_factors
from lorax_variants.quant import quantize_array

GGUF = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "assets" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", default="1,5")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--layers", default="0,14,29")
    a = ap.parse_args()
    if not GGUF.is_file():
        sys.exit(f"{GGUF} is missing: run make assets")
    _, params = hf.from_pretrained(GGUF)
    qspec = lv.QuantSpec(targets=".*", kind="nf4", block_size=64, double_quant=False)
    iters = [int(x) for x in a.iters.split(",")]
    scale = a.alpha / a.r
    print(f"SmolLM2-135M, NF4 (blocks of 64), r={a.r}, alpha={a.alpha:g}: ‖W − (Q + sAB)‖_F / ‖W‖_F")
    print(f"{'weight':24s} {'QLoRA':>8s} " + " ".join(f"{'LoftQ T=' + str(t):>10s}" for t in iters) + "   ratio")
    ratios = []
    for group, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            for layer in (int(x) for x in a.layers.split(",")):
                w = jnp.asarray(params["layers"][group][name][layer], jnp.float32)
                norm = float(jnp.linalg.norm(w))
                q0 = quantize_array(w, qspec)
                plain = float(jnp.linalg.norm(w - lv.dequantize(q0, jnp.float32))) / norm
                errs = []
                for t in iters:
                    q, A, B = loftq_factors(w, a.r, scale, qspec, t)
                    errs.append(float(jnp.linalg.norm(w - lv.dequantize(q, jnp.float32) - scale * A @ B)) / norm)
                ratios.append(errs[-1] / plain)
                print(f"{name + ' L' + str(layer):24s} {plain:8.4f} " + " ".join(f"{e:10.4f}" for e in errs)
                      + f"   {errs[-1] / plain:.3f}", flush=True)
    print(f"LoftQ (T={iters[-1]}) / QLoRA error: median {np.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    main()
