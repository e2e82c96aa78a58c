"""GPU figures in one short run (under 10 minutes on one H100/H200), for whenever a GPU is at hand; never a test
dependency. Three parts, each printed as it finishes (a part that fails says why and the others still run):

1. **vs PEFT**: one train step (AdamW, r=16 on all 7 projections, bf16, batch 4 x 2048 tokens) of a ~0.9B
   Llama (the suite's shape at d 2048: 16 layers, 32 heads, ffn 5440, vocab 32000; random init, saved by
   transformers) for LoRA,
   DoRA and QLoRA (NF4), ours against PEFT on the same GPU, timed in turns in this process (``suite.alternate``):
   tokens/s, the ratio, and MFU from the suite's analytic FLOPs against the chip's dense bf16 peak.
   PEFT's side needs a CUDA torch (and bitsandbytes' CUDA build for QLoRA); without them it is skipped, named.
2. **cuDNN attention**: ``self_attention(impl="cudnn")`` against the blockwise kernel (``impl="flash"``), causal,
   GQA 32/8, bf16, 4096 tokens: outputs and q/k/v gradients, max |diff| / max |ref|, and both timed.
3. **Many adapters**: ``bench_multi_adapter.py`` at d 2048 (k = 1, 4, 16 in one step against k separate steps).

    python bench/bench_gpu.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import suite  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "B200": 2250e12}  # dense, per GPU
OUT: dict = {}


def _peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def part_peft(a) -> None:
    import torch

    cuda = torch.cuda.is_available()
    model_dir = suite.save_llama(a, Path(tempfile.mkdtemp(prefix="gpu-llama-")))
    peak = _peak()
    for v in ("lora", "dora", "qlora"):
        ours = suite.jax_step(model_dir, v, a.r, a)[0]
        steps = {"ours": ours}
        why = None
        if cuda:
            try:
                steps["peft"] = _torch_cuda_step(model_dir, v, a)
            except Exception as e:  # noqa: BLE001 - e.g. bitsandbytes without CUDA: said, and ours still timed
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        else:
            why = "torch has no CUDA here"
        t = suite.alternate(steps, a.rounds)
        flops = suite.analytic_flops(a, v, a.r)
        tokens = a.batch * a.seq
        line = {"variant": v, "ours_s": t["ours"], "ours_tokens_s": tokens / t["ours"],
                "ours_mfu": flops / t["ours"] / peak if peak else None}
        if "peft" in t:
            line |= {"peft_s": t["peft"], "peft_tokens_s": tokens / t["peft"], "ratio": t["peft"] / t["ours"],
                     "peft_mfu": flops / t["peft"] / peak if peak else None}
        else:
            line["peft_skipped"] = why
        OUT.setdefault("peft", []).append(line)
        print("vs PEFT", json.dumps(line), flush=True)
        del ours, steps


def _torch_cuda_step(model_dir: Path, variant: str, a):
    import peft
    import torch
    import transformers as T

    torch.manual_seed(0)
    kw = {"dtype": torch.bfloat16}
    if variant == "qlora":
        kw |= {"device_map": "cuda", "quantization_config": T.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)}
    model = T.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", **kw)
    if variant != "qlora":
        model = model.cuda()
    model = peft.get_peft_model(model, peft.LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=suite.PROJ,
                                                       use_dora=variant == "dora"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device="cuda")

    def run():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        torch.cuda.synchronize()

    return run


def part_cudnn(a) -> None:
    from lorax_variants.models.layers import self_attention

    t, h, hkv, d = (1024 if a.quick else 4096), 32, 8, 128
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, t, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (2, t, hkv, d), jnp.bfloat16)
    g = jax.random.normal(keys[3], (2, t, h * d), jnp.float32)

    def f(impl):
        def loss(q, k, v):
            o = self_attention(q, k, v, scale=d**-0.5, causal=True, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * g), o
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    res, times = {}, {}
    for impl in ("flash", "cudnn"):
        fn = f(impl)
        out = jax.block_until_ready(fn(q, k, v))
        t0 = time.perf_counter()
        for _ in range(a.rounds):
            jax.block_until_ready(fn(q, k, v))
        times[impl] = (time.perf_counter() - t0) / a.rounds
        res[impl] = out
    (_, o_f), g_f = res["flash"]
    (_, o_c), g_c = res["cudnn"]
    rel = lambda x, y: float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))  # noqa: E731
                             / jnp.max(jnp.abs(y.astype(jnp.float32))))
    line = {"tokens": t, "out": rel(o_c, o_f), "dq": rel(g_c[0], g_f[0]), "dk": rel(g_c[1], g_f[1]),
            "dv": rel(g_c[2], g_f[2]), "flash_s": times["flash"], "cudnn_s": times["cudnn"]}
    OUT["cudnn"] = line
    print("cuDNN vs blockwise", json.dumps(line), flush=True)


def part_many(a) -> None:
    args = ["--d", "512", "--layers", "2", "--seq", "128"] if a.quick else ["--d", "2048", "--layers", "4", "--seq", "512"]
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_multi_adapter.py")), *args,
                           "--batch", "32", "--ks", "1,4,16", "--rounds", str(a.rounds)],
                          capture_output=True, text=True, timeout=300)
    OUT["many"] = proc.stdout[-3000:]
    print(proc.stdout[-3000:] or proc.stderr[-2000:], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run; on a CPU too)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--parts", default="peft,cudnn,many")
    a = ap.parse_args()
    if jax.default_backend() != "gpu" and not a.quick:
        sys.exit(f"bench_gpu.py: no GPU (JAX backend {jax.default_backend()}); --quick runs it small anywhere")
    # the suite's model and step settings: a ~0.9B Llama, bf16
    sizes = dict(d=512, layers=2, seq=256, batch=2, vocab=8192) if a.quick else dict(d=2048, layers=16, seq=2048, batch=4,
                                                                                    vocab=32000)
    a.__dict__.update(sizes, r=16, dtype="bfloat16", variants="lora,dora,qlora")
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, Llama d={a.d} L={a.layers}, batch {a.batch} x "
          f"{a.seq}, bf16", flush=True)
    for name in a.parts.split(","):
        t0 = time.perf_counter()
        try:
            {"peft": part_peft, "cudnn": part_cudnn, "many": part_many}[name](a)
        except Exception:  # noqa: BLE001 - the other parts still run
            print(f"part {name} failed:\n{traceback.format_exc()[-2000:]}", flush=True)
        print(f"part {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(OUT, indent=2, default=str))


if __name__ == "__main__":
    main()
