"""The performance suite: one run, one table (``make bench``).

    python bench/suite.py [--quick] [--only peft,flops,memory,fsdp,compile,merged,long]
                          [--d 512 --layers 8 --seq 256 --batch 8 --r 16 --rounds 5 --dtype float32]

Reference model: a Llama built with transformers (random init), d=512, 8 layers, seq 256,
batch 8, LoRA-family adapters of rank 16 on all seven projections, AdamW, fp32. Every figure is
a ratio taken inside this one process (these machines are noisy):

1. peft    train step (fwd + bwd + AdamW) per variant against PEFT + PyTorch on the same model and
           batch; the two sides alternate step by step, medians over ``--rounds``. Also MFU: analytic
           FLOPs / step time / the fp32 matmul peak measured here (figure 3).
2. flops   XLA cost analysis of the step (layers unrolled: cost analysis counts a scan body once)
           against the analytic count: frozen weights 2NT forward + 2NT input gradient, attention
           12·B·H·S²·D per layer, adapters 6·T·r·(in + out) per module, full fine-tuning 2NT more.
4. memory  compiled memory analysis per variant (arguments, temporaries); QLoRA (NF4) against bf16
           LoRA on a larger model (abstract shapes, nothing allocated); ``fsdp``: bytes per device
           of the frozen and trainable trees over 1, 2, 4, 8 simulated devices (a subprocess).
5. compile compile time against depth, lax.scan against unrolled; ``merged``: the merged() path
           (forms W + s·A B inside the step) against the factored path, step time.
6. long    bench/bench_long_context.py: the longest sequence whose QLoRA / bf16 LoRA step of a
           Llama-3.1-8B-shaped model fits 80 GiB (compiled memory analysis, here and for a TPU v5p when
           ``make libtpu`` has run), and the new attention/loss against the old at 256-1024 tokens.

``--quick`` shrinks everything (a smoke run for the test suite); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lorax_variants.runtime import keep_host_memory  # noqa: E402

KEPT = keep_host_memory()  # both sides share this process, so PEFT+torch gets the same allocator

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = r"layers/(attn|mlp)/(" + "|".join(PROJ) + ")"
VARIANTS = ["lora", "dora", "vera", "adalora", "qlora", "full"]
ROWS: list[tuple[str, str, str, str, str]] = []  # figure, case, value, target, verdict


def row(figure: str, case: str, value: str, target: str = "", ok: bool | None = None) -> None:
    ROWS.append((figure, case, value, target, "" if ok is None else ("yes" if ok else "NO")))
    print(f"  {figure:8} {case:34} {value:>24}  {target:12} {ROWS[-1][4]}", flush=True)


def alternate(steps: dict[str, Callable[[], Any]], rounds: int, warm: int = 2, pause: float = 0.3) -> dict[str, float]:
    """Median seconds per call of each step, the steps taking turns round by round.

    A short pause before each timed call lets the other side's worker threads go idle (OpenMP
    spins ~200 ms after a parallel region by default, and would steal a core from the next step).
    """
    for _ in range(warm):
        for f in steps.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, f in steps.items():
            time.sleep(pause)
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak(dtype: str, n: int = 2048) -> float:
    """Best FLOP/s of a few large matmuls (the model's own shapes and a square one) in ``dtype``."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for m, k, o in [(n, n, n), (2048, 512, 1344), (2048, 1344, 512)]:
        a, b = jnp.ones((m, k), dtype), jnp.ones((k, o), dtype)
        f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
        f(a, b).block_until_ready()
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            f(a, b).block_until_ready()
            ts.append(time.perf_counter() - t)
        best = max(best, 2 * m * k * o / statistics.median(ts))
    return best


# ----------------------------------------------------------------------------- the model

def llama_config(a):
    import transformers as T

    return T.LlamaConfig(vocab_size=a.vocab, hidden_size=a.d, num_hidden_layers=a.layers,
                         num_attention_heads=a.d // 64, num_key_value_heads=a.d // 64,
                         intermediate_size=int(a.d * 8 / 3) // 64 * 64, max_position_embeddings=4 * a.seq)


def save_llama(a, where: Path) -> Path:
    import torch
    import transformers as T

    torch.manual_seed(0)
    T.LlamaForCausalLM(llama_config(a)).save_pretrained(where)
    return where


def rank_of(variant: str, r: int) -> int:
    """VeRA's shared projections are used at 16x the LoRA rank (as the VeRA paper and PEFT users do)."""
    return 16 * r if variant == "vera" else r


def analytic_flops(a, variant: str, r: int) -> float:
    """FLOPs of one train step by the formulas in the module docstring (adapters of rank r)."""
    c = llama_config(a)
    d, f, L, T = c.hidden_size, c.intermediate_size, c.num_hidden_layers, a.batch * a.seq
    shapes = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]
    n = L * sum(i * o for i, o in shapes) + d * c.vocab_size
    attn = 12 * a.batch * c.num_attention_heads * a.seq**2 * (d // c.num_attention_heads) * L
    # layer 0's q/k/v read the (frozen) embedding: no input gradient needed there
    total = 4.0 * n * T + attn - 2.0 * T * 3 * d * d
    if variant == "full":
        return total + 2.0 * n * T
    # adapter: forward 2·T·r·(in+out); backward dx through it 2·T·r·(in+out) (none for layer 0's q/k/v),
    # dA and dB 2·T·r·(in+out) more, except VeRA whose shared A, B are frozen (its λs are elementwise)
    per = L * sum(i + o for i, o in shapes)
    return total + T * r * ((4.0 if variant == "vera" else 6.0) * per - 2.0 * 3 * d)


def jax_step(model_dir: Path, variant: str, r: int, a, *, scan: bool = True, merged: bool = False):
    """(run one step, the compiled step, trainable tree, frozen tree) for one variant."""
    import jax
    import jax.numpy as jnp
    import optax

    import lorax_variants as lv
    from lorax_variants.hf import from_pretrained
    from train.step import task_loss

    model, params = from_pretrained(model_dir, jnp.dtype(a.dtype), scan=scan)
    if variant == "full":
        trainable, frozen = params, jax.tree.map(lambda _: None, params)
    else:
        if variant == "qlora":
            params = lv.quantize(params, lv.QuantSpec(targets=TARGETS, stacked=model.stacked, double_quant=False))
        spec = lv.AdapterSpec(targets=TARGETS, stacked=model.stacked, variant="lora" if variant == "qlora" else variant,
                              r=r, alpha=2 * r, dtype="float32")
        trainable, frozen = lv.split(lv.adapt(params, spec, jax.random.key(0)))
    tx = optax.adamw(1e-4)
    ids = jax.random.randint(jax.random.key(1), (a.batch, a.seq), 0, a.vocab)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
    apply = lv.merged(model.apply) if merged else model.apply

    def loss(tr, fr, b):
        total, count, _ = task_loss("causal_lm", apply(lv.combine(tr, fr), b["input_ids"]), b)
        return jnp.sum(total) / jnp.sum(count)

    def step(tr, fr, st, b):
        g = jax.grad(loss)(tr, fr, b)
        up, st = tx.update(g, st, tr)
        return optax.apply_updates(tr, up), st

    state = [trainable, tx.init(trainable)]
    compiled = jax.jit(step, donate_argnums=(0, 2)).lower(state[0], frozen, state[1], batch).compile()

    def run():
        state[0], state[1] = compiled(state[0], frozen, state[1], batch)
        jax.block_until_ready(state[0])

    return run, compiled, trainable, frozen


def torch_step(model_dir: Path, variant: str, r: int, a) -> Callable[[], None]:
    import peft
    import torch
    import transformers as T

    torch.manual_seed(0)
    kw: dict[str, Any] = {"dtype": getattr(torch, a.dtype)}
    if variant == "qlora":
        kw |= {"device_map": "cpu", "quantization_config": T.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kw["dtype"])}
    model = T.AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if variant != "full":
        cfg = {"lora": lambda: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJ),
               "qlora": lambda: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJ),
               "dora": lambda: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJ, use_dora=True),
               "vera": lambda: peft.VeraConfig(r=r, target_modules=PROJ),
               "adalora": lambda: peft.AdaLoraConfig(init_r=r, target_r=r // 2, target_modules=PROJ, total_step=1000)}
        model = peft.get_peft_model(model, cfg[variant]())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))

    def run():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return run


# ----------------------------------------------------------------------------- figures

def fig_peft(a, model_dir: Path) -> None:
    import torch

    peak = matmul_peak(a.dtype)
    row("3 peak", f"{a.dtype} matmul, {torch.get_num_threads()} threads", f"{peak / 1e9:.0f} GFLOP/s")
    for v in a.variants.split(","):
        r = rank_of(v, a.r)
        ours, theirs = jax_step(model_dir, v, r, a)[0], torch_step(model_dir, v, r, a)
        t = alternate({"ours": ours, "peft": theirs}, a.rounds)
        ratio, fl = t["peft"] / t["ours"], analytic_flops(a, v, r)
        row("1 vs PEFT", f"{v}: PEFT {t['peft'] * 1e3:.0f} / ours {t['ours'] * 1e3:.0f} ms", f"{ratio:.2f}x",
            ">= 1.5x" if v == "lora" else "> 1x", ratio >= 1.5 if v == "lora" else ratio > 1)
        row("3 MFU", f"{v}: {fl / 1e9:.0f} GFLOP/step analytic", f"ours {fl / t['ours'] / peak:.0%}, "
            f"PEFT {fl / t['peft'] / peak:.0%}", ">= 50%", fl / t["ours"] / peak >= 0.5)
        del ours, theirs


def fig_flops(a) -> None:
    """XLA's count for the unrolled step (2 layers, to keep compiles short) against the formulas."""
    b = argparse.Namespace(**{**vars(a), "layers": min(a.layers, 2)})
    small = save_llama(b, Path(tempfile.mkdtemp(prefix="suite-flops-")) / "llama")
    xla = {}
    for case, v, r in [("full", "full", 0), ("lora", "lora", b.r), ("dora", "dora", b.r), ("vera", "vera", b.r),
                       (f"vera r={rank_of('vera', b.r)}", "vera", rank_of("vera", b.r)), ("adalora", "adalora", b.r)]:
        xla[case] = float(jax_step(small, v, r, b, scan=False)[1].cost_analysis()["flops"])
        ratio = xla[case] / analytic_flops(b, v, r)
        row("2 FLOPs", f"{case}: XLA / analytic", f"{ratio:.3f}", "<= 1.10" if v == "lora" else "",
            ratio <= 1.10 if v == "lora" else None)
    row("2 FLOPs", "DoRA / LoRA (XLA)", f"{xla['dora'] / xla['lora']:.3f}", "<= 1.3", xla["dora"] / xla["lora"] <= 1.3)
    row("2 FLOPs", f"VeRA / LoRA at rank {b.r} (XLA)", f"{xla['vera'] / xla['lora']:.3f}", "<= 1.1",
        xla["vera"] / xla["lora"] <= 1.1)


def fig_memory(a, model_dir: Path) -> None:
    import lorax_variants as lv

    for v in a.variants.split(","):
        _, compiled, trainable, frozen = jax_step(model_dir, v, rank_of(v, a.r), a)
        m = compiled.memory_analysis()
        row("4 memory", f"{v}: frozen / trainable", f"{lv.tree_bytes(frozen) / 2**20:.0f} / "
            f"{lv.tree_bytes(trainable) / 2**20:.1f} MiB")
        row("4 memory", f"{v}: step args / temporaries", f"{m.argument_size_in_bytes / 2**20:.0f} / "
            f"{m.temp_size_in_bytes / 2**20:.0f} MiB")
    import bench_qlora

    d, layers = (256, 2) if a.quick else (2048, 8)
    bf16, nf4 = (bench_qlora.memory(d, layers, a.seq, a.batch, q, "none") for q in (False, True))
    row("4 memory", f"QLoRA/bf16 LoRA d={d} L={layers}: frozen", f"{nf4['frozen'] / bf16['frozen']:.3f}", "< 0.3",
        None if a.quick else nf4["frozen"] / bf16["frozen"] < 0.3)
    row("4 memory", f"QLoRA/bf16 LoRA d={d} L={layers}: step", f"{nf4['total'] / bf16['total']:.3f}",
        f"({nf4['total'] / 2**30:.2f} GiB)")


FSDP_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
import lorax_variants as lv
from lorax_variants import sharding
from lorax_variants.hf import from_pretrained
model, params = from_pretrained(sys.argv[2], scan=True)
targets = sys.argv[3]
tree = lv.adapt(params, lv.AdapterSpec(targets=targets, stacked=model.stacked, r=int(sys.argv[4])), jax.random.key(0))
out = {}
for n in (1, 2, 4, 8):
    mesh = sharding.make_mesh(fsdp=n, devices=jax.devices()[:n])
    placed = jax.device_put(tree, sharding.tree_shardings(tree, mesh))
    tr, fr = lv.split(placed)
    dev = jax.devices()[0]
    per = lambda t: sum(s.data.nbytes for x in jax.tree.leaves(t) for s in x.addressable_shards if s.device == dev)
    out[n] = [per(fr), per(tr)]
print(json.dumps(out))
"""


def fig_fsdp(a, model_dir: Path) -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", FSDP_CHILD, str(ROOT), str(model_dir), TARGETS, str(a.r)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    one = got["1"][0]
    for n, (fr, tr) in got.items():
        row("4 FSDP", f"{n} device(s): frozen / trainable per device", f"{fr / 2**20:.1f} / {tr / 2**20:.2f} MiB",
            "frozen x n ~ 1", None if n == "1" else abs(fr * int(n) / one - 1) < 0.05)


def fig_compile(a) -> None:
    import bench_zoo

    depths = [1, 2] if a.quick else [2, 4, 8, 16]
    for scan in (True, False):
        secs = [bench_zoo.compile_seconds(a.d, L, a.seq, a.batch, scan) for L in depths]
        row("5 compile", f"{'scan' if scan else 'unrolled'}, depth {depths[0]}..{depths[-1]}",
            " ".join(f"{s:.1f}" for s in secs) + " s", "flat" if scan else "", None)
        if scan:
            row("5 compile", f"scan: depth {depths[-1]} / depth {depths[0]}", f"{secs[-1] / secs[0]:.2f}", "<= 1.5",
                secs[-1] / secs[0] <= 1.5)


def fig_merged(a, model_dir: Path) -> None:
    factored, merged = (jax_step(model_dir, "lora", a.r, a, merged=m)[0] for m in (False, True))
    t = alternate({"factored": factored, "merged": merged}, a.rounds)
    row("5 merged", f"merged {t['merged'] * 1e3:.0f} / factored {t['factored'] * 1e3:.0f} ms",
        f"{t['merged'] / t['factored']:.2f}x", "> 1 (factored faster)", t["merged"] > t["factored"])


def fig_long(a) -> None:
    """bench_long_context.py in a subprocess: on this backend, and compiled for a TPU v5p when libtpu is in
    .cache (make libtpu). Longest sequence of the 8B-shaped QLoRA/LoRA step in 80 GiB; speed of the new
    attention/loss against the old at 256-1024 tokens."""
    script = str(ROOT / "bench" / "bench_long_context.py")
    runs = [("host", ["--quick", "--no-speed"] if a.quick else [])]
    if (ROOT / ".cache" / "libtpu" / "libtpu").is_dir() and not a.quick:
        runs.append(("TPU v5p", ["--tpu", "v5p", "--no-speed"]))
    for where, extra in runs:
        out = Path(tempfile.mkdtemp(prefix="long-")) / "long.json"
        proc = subprocess.run([sys.executable, script, "--json", str(out), *extra], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=7200)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        got = json.loads(out.read_text())
        for key, tokens in got["longest"].items():
            row("6 long", f"{where}: {key} longest sequence in 80 GiB", f"{tokens:,}", "> 342,733", tokens > 342_733)
        if a.quick:
            r = got["rows"]
            row("6 long", f"{where}: quick model, 4x the tokens", f"{r[1]['device_gib'] / r[0]['device_gib']:.2f}x", "", None)
        for seq, before, after in got["speed"]:
            row("6 long", f"{where}: step at {seq} tokens, blockwise/chunked over dense", f"{after / before:.2f}x",
                "<= 1.05", after / before <= 1.05)
    if (ROOT / ".cache" / "libtpu" / "libtpu").is_dir() and not a.quick:  # the app's step on a slice (train --plan)
        out = Path(tempfile.mkdtemp(prefix="slice-")) / "slice.json"
        proc = subprocess.run([sys.executable, script, "--slice", "v5p-8", "--lengths", "1048576", "--no-search",
                               "--json", str(out)], capture_output=True, text=True, timeout=3600,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        for p in json.loads(out.read_text())["plans"]:
            row("6 long", f"v5p-8, context 4, remat {p['remat']}: 1,048,576 tokens per chip",
                "refused by XLA" if p["device_total"] is None else f"{p['device_total'] / 2**30:.1f} GiB", "<= 95 GiB",
                bool(p["fits"]))


FIGURES = ["peft", "flops", "memory", "fsdp", "compile", "merged", "long"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--only", default=",".join(FIGURES), help="comma-separated subset of " + ",".join(FIGURES))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, figures meaningless")
    ap.add_argument("--json", type=Path, help="also write the table here")
    a = ap.parse_args()
    if a.quick:
        a.d, a.layers, a.seq, a.batch, a.vocab, a.r, a.rounds = 128, 2, 32, 2, 512, 4, 1
    only = a.only.split(",")
    unknown = sorted(set(only) - set(FIGURES))
    if unknown:
        ap.error(f"--only: unknown figure(s) {unknown}; choose from {FIGURES}")
    import jax

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"lorax_variants performance suite, {when}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, JAX {jax.__version__} on {jax.devices()[0].device_kind}; Llama d={a.d} "
          f"L={a.layers} seq={a.seq} batch={a.batch} vocab={a.vocab} r={a.r} {a.dtype}; keep_host_memory {KEPT}",
          flush=True)
    model_dir = save_llama(a, Path(tempfile.mkdtemp(prefix="suite-")) / "llama")
    for name in only:
        t0 = time.perf_counter()
        {"peft": lambda: fig_peft(a, model_dir), "flops": lambda: fig_flops(a),
         "memory": lambda: fig_memory(a, model_dir), "fsdp": lambda: fig_fsdp(a, model_dir),
         "compile": lambda: fig_compile(a), "merged": lambda: fig_merged(a, model_dir), "long": lambda: fig_long(a)}[name]()
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    width = max(len(r[1]) for r in ROWS)
    print("\n| figure | case | value | target | met |\n|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r[0]} | {r[1]:{width}} | {r[2]} | {r[3]} | {r[4]} |")
    if a.json:
        a.json.write_text(json.dumps({"when": when, "args": {k: str(v) for k, v in vars(a).items()}, "rows": ROWS}))


if __name__ == "__main__":
    main()
