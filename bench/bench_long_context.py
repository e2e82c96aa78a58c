"""Long context: device bytes of one train step of a Llama-3.1-8B-shaped model against sequence length, from
the compiled program's memory analysis (abstract shapes: nothing is allocated, any machine measures it), and
the longest sequence whose step fits in 80 GiB (binary search), for QLoRA r=32 on all 7 projections and for
bf16 LoRA, batch 1, bf16 compute. "before": dense attention, full-vocab logits, remat "full" (the program
before issue 20); "after": blockwise attention, chunked cross-entropy, two-level remat, chunked MLP.

Bytes = arguments (frozen weights, adapters) + outputs (adapter gradients) + temporaries, as XLA plans them
for this backend; host-offloaded bytes (``host_temp_size_in_bytes``) reported apart. Then the speed of the
new program against the old at 256-1024 tokens on a small model, both timed in this run.

With ``--tpu v5p`` the same programs are compiled for a TPU chip without one (XLA's TPU compiler from the
``libtpu`` wheel, deviceless ahead-of-time compilation as MaxText's ``train_compile.py`` does; ``make
libtpu`` fetches the pinned wheel into ``.cache/libtpu``): bf16 stays bf16 there (XLA:CPU widens bf16 dots
and their temporaries to f32, so the CPU figures overstate an accelerator's), and ``remat="offload"``
really moves the layer inputs to host memory.

With ``--slice v5p-8`` the training app's own step is compiled for a whole slice (``python -m train --plan``'s
function, ``train.topology.compile_plan``) with the sequence split over its chips (context parallelism), and the
longest sequence that fits a chip's HBM is searched with and without offload.

    python bench/bench_long_context.py [--quick] [--budget-gib 80] [--tpu v5p] [--json out.json]
    python bench/bench_long_context.py --slice v5p-8 [--lengths 262144,1048576] [--no-search] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time

LIBTPU = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "libtpu"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the train app (--slice)
if "--tpu" in sys.argv or "--slice" in sys.argv:  # before jax is imported: the CPU stays the default backend,
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # XLA:TPU only compiles
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: processes may share libtpu
    sys.path.insert(0, str(LIBTPU))

import jax
import jax.numpy as jnp
import numpy as np
import transformers

import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.models.loss import token_cross_entropy

GIB = 2**30
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 21,
                tie_word_embeddings=False)
TARGETS = r"layers/(attn|mlp)/\w+_proj"


def _plain_loss(model, params, ids):
    logp = jax.nn.log_softmax(model.apply(params, ids).astype(jnp.float32)[:, :-1])
    return -jnp.sum(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


DEVICE = None  # the TPU device compiled for (--tpu), None: this machine's default device
PROGRAMS = {"before": "dense attention, [T, vocab] logits, remat full",
            "after": "blockwise attention, chunked loss, remat nested, MLP chunks",
            "offload": "as after, layer inputs offloaded to host (remat offload)"}


@functools.lru_cache(maxsize=None)
def _step_cached(config: tuple, variant: str, program: str, seq: int) -> tuple[int, int]:
    return _step_compiled(dict(config), variant, program, seq)


def _step(config: dict, variant: str, program: str, seq: int) -> tuple[int, int]:
    """(device bytes, host bytes) of value_and_grad of the loss over the trainable leaves, compiled (once)."""
    return _step_cached(tuple(sorted(config.items())), variant, program, seq)


def _step_compiled(config: dict, variant: str, program: str, seq: int) -> tuple[int, int]:
    cfg = transformers.LlamaConfig(**config)
    after = program != "before"
    model = hf.from_config(cfg, remat={"before": "full", "after": "nested", "offload": "offload"}[program])
    model.attention_impl = "flash" if after else "dense"
    model.mlp_chunk = 2048 if after else None
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.bfloat16), jax.random.key(0))
    spec = lv.AdapterSpec(targets=TARGETS, stacked=model.stacked, r=32, alpha=64)

    def build(p):
        if variant == "qlora":
            p = lv.quantize(p, lv.QuantSpec(targets=TARGETS, stacked=model.stacked, kind="nf4", block_size=64))
        return lv.adapt(p, spec, jax.random.key(0))

    tree = jax.eval_shape(build, shapes)
    trainable, frozen = lv.split(tree)
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    if DEVICE is not None:
        place = jax.sharding.SingleDeviceSharding(DEVICE)
        on = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place)  # noqa: E731
        trainable, frozen, ids = jax.tree.map(on, (trainable, frozen, ids))

    def loss(tr, fr, ids):
        from train.step import cast_tree

        params = lv.resolve_shared(cast_tree(lv.combine(tr, fr), jnp.bfloat16))
        if not after:
            return _plain_loss(model, params, ids)
        h = model.hidden(params, ids)
        ce, _ = token_cross_entropy(model, params, h[:, :-1], ids[:, 1:], chunk=1024)
        return jnp.sum(ce)

    try:
        stats = jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen, ids).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 - XLA:TPU refuses a program over the chip's memory at compile time
        if DEVICE is not None and "memory" in str(e).lower():
            print(f"  {variant} {program} {seq:,}: XLA:TPU refuses it ({str(e).splitlines()[0][:400]})", flush=True)
            return 1 << 62, 0
        raise
    device = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    host = getattr(stats, "host_temp_size_in_bytes", 0) + getattr(stats, "host_argument_size_in_bytes", 0)
    return device, host


def _longest(config: dict, variant: str, program: str, budget: int, lo: int, hi: int, step: int) -> int:
    """The longest multiple of ``step`` whose step fits ``budget`` bytes (see ``_search``)."""
    # XLA:TPU aborts (a failed check, no exception) compiling arrays of 2^31 elements or more: [T, d] caps T.
    cap = ((2**31 - 1) // config["hidden_size"]) // step * step if DEVICE is not None else 1 << 40
    return _search(lambda n: _step(config, variant, program, n)[0], budget, lo, hi, step, cap, f"{variant} {program}")


def _search(size, budget: int, lo: int, hi: int, step: int, cap: int, what: str) -> int:
    """The longest multiple of ``step`` up to ``cap`` whose ``size(n)`` fits ``budget`` bytes: a bracketing search
    that guesses by interpolation (the bytes are close to linear in the length), every other guess a halving, so a
    curve that bends costs at most twice a binary search."""
    lo, hi = min(lo, cap), min(hi, cap)
    b_lo = size(lo)
    if b_lo > budget:
        return 0
    b_hi = size(hi)
    while b_hi <= budget:  # extend the bracket by linear extrapolation, at least doubling
        if hi >= cap:
            print(f"  {what}: fits at {hi:,} tokens, the longest XLA:TPU compiles (arrays < 2^31 elements)")
            return hi
        guess = hi + (budget - b_hi) * (hi - lo) // max(b_hi - b_lo, 1)
        lo, b_lo, hi = hi, b_hi, min(cap, max(2 * hi, guess // step * step + step))
        b_hi = size(hi)
    bisect = False
    while hi - lo > step:
        guess = (lo + hi) // 2 if bisect else lo + (budget - b_lo) * (hi - lo) // max(b_hi - b_lo, 1)
        mid = min(max(guess // step * step, lo + step), hi - step)
        bisect = not bisect
        b = size(mid)
        if b <= budget:
            lo, b_lo = mid, b
        else:
            hi, b_hi = mid, b
    return lo


def _speed(rounds: int) -> list[tuple[int, float, float]]:
    """Train-step time of the new program over the old on a small Llama at 256/512/1024 tokens."""
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4)
    out = []
    for seq in (256, 512, 1024):
        times = {}
        fns = {}
        for program in ("before", "after"):
            model = hf.from_config(cfg, remat="full")
            model.attention_impl = "auto" if program == "after" else "dense"
            params = model.init(jax.random.key(0))
            tree = lv.adapt(params, lv.AdapterSpec(targets=TARGETS, stacked=model.stacked, r=16), 0)
            tr, fr = lv.split(tree)
            ids = jnp.asarray(np.random.default_rng(0).integers(0, 32000, (4, seq)), jnp.int32)

            def loss(tr, fr, ids, model=model, program=program):
                params = lv.resolve_shared(lv.combine(tr, fr))
                if program == "before":
                    return _plain_loss(model, params, ids)
                h = model.hidden(params, ids)
                return jnp.sum(token_cross_entropy(model, params, h[:, :-1], ids[:, 1:])[0])

            fn = jax.jit(jax.grad(loss))
            jax.block_until_ready(fn(tr, fr, ids))
            fns[program] = (fn, tr, fr, ids)
            times[program] = []
        for _ in range(rounds):
            for program, (fn, tr, fr, ids) in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(tr, fr, ids))
                times[program].append(time.perf_counter() - t0)
        out.append((seq, statistics.median(times["before"]), statistics.median(times["after"])))
    return out


def _slice(a: argparse.Namespace) -> None:
    """``--slice v5p-8``: the training app's own step (``train --plan``'s ``compile_plan``) for Llama-3.1-8B's shape,
    QLoRA r=32 on all 7 projections, batch 1, bf16, the sequence over all the slice's chips (``mesh.context``):
    per-chip bytes at the table's lengths and the longest sequence that fits a chip's HBM, with and without
    offloading the layer inputs."""
    import tempfile

    from train.config import load
    from train.topology import compile_plan, topology

    chip, _, chips = topology(a.slice)
    d = pathlib.Path(tempfile.mkdtemp(prefix="llama8b-"))
    transformers.LlamaConfig(**LLAMA_8B, rope_theta=500000.0, rms_norm_eps=1e-5).save_pretrained(d)
    (d / "lm.jsonl").write_text('{"text": "unused: --plan reads no data"}\n')
    base = [f"model.path={d}", f"data.source={d / 'lm.jsonl'}", "quant.kind=nf4", "quant.block_size=64", "adapter.r=32",
            "adapter.alpha=64", r"adapter.targets=layers/(attn|mlp)/\w+_proj", "train.batch_size=1", "mesh.fsdp=1",
            f"mesh.context={chips}", "model.compute_dtype=bfloat16", "model.param_dtype=bfloat16", "model.mlp_chunk=2048",
            "model.loss_chunk=1024", "model.attention=flash"]
    figures = {}

    def plan(remat: str, seq: int) -> dict:
        if (remat, seq) not in figures:
            info = compile_plan(load(None, base + [f"model.remat={remat}", f"data.seq_len={seq}"]), a.slice)
            figures[remat, seq] = info
            dev = info["device_total"]
            print(f"{a.slice} {remat:7s} {seq:>9,} tokens: "
                  + (f"{dev / GIB:7.2f} GiB per chip" if dev is not None else "refused by XLA:TPU")
                  + (f", {info['host'] / GIB:.2f} on host" if info.get("host") else "")
                  + f" ({'fits' if info['fits'] else 'does not fit'} {chip.hbm / GIB:g} GiB)", flush=True)
        info = figures[remat, seq]
        return info["device_total"] if info["fits"] or info["device_total"] else 1 << 62

    lengths = tuple(int(x) for x in a.lengths.split(",")) if a.lengths else (262144, 1048576)
    for remat in ("nested", "offload"):
        for seq in lengths:
            plan(remat, seq)
    step = 8 * 4096  # a multiple of 2 chunks per chip and of the attention blocks
    cap = min(chips * (2**31 - 1) // LLAMA_8B["hidden_size"],  # each chip's [T/chips, d] and the gathered [T, kv heads x 128]
              (2**31 - 1) // (LLAMA_8B["num_key_value_heads"] * 128)) // step * step
    longest = {}
    if not a.no_search:
        for remat in ("nested", "offload"):
            longest[remat] = _search(lambda n, r=remat: plan(r, n), chip.hbm, lengths[0], lengths[-1], step, cap,
                                     f"{a.slice} {remat}")
            print(f"{a.slice}, remat {remat}: the longest sequence that fits is {longest[remat]:,} tokens", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"plans": [v | {"remat": k[0]} for k, v in figures.items()], "longest": longest}, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer model of the same width, no binary search")
    ap.add_argument("--budget-gib", type=float, default=80.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--tpu", help="compile for this TPU generation instead (v5p, v5e, v6e; needs make libtpu)")
    ap.add_argument("--no-speed", action="store_true", help="memory figures only")
    ap.add_argument("--no-search", action="store_true", help="the table only, no search for the longest sequence")
    ap.add_argument("--speed-only", action="store_true", help="only the speed of the new program against the old")
    ap.add_argument("--lengths", help="comma-separated sequence lengths of the table (default: 1k to 256k)")
    ap.add_argument("--variants", default="qlora,lora")
    ap.add_argument("--programs", help="comma-separated subset of " + ",".join(PROGRAMS))
    ap.add_argument("--slice", help="the app's step (train --plan) on this TPU slice (v5p-8, ...), the sequence over "
                    "its chips: per-chip bytes and the longest sequence that fits (needs make libtpu)")
    a = ap.parse_args()
    if a.slice:
        return _slice(a)
    global DEVICE
    if a.tpu:
        from jax.experimental import topologies

        if not (LIBTPU / "libtpu").is_dir():
            sys.exit(f"--tpu needs the libtpu wheel unpacked in {LIBTPU}: run make libtpu")
        DEVICE = topologies.get_topology_desc(topology_name=f"{a.tpu}:2x2x1" if a.tpu in ("v4", "v5p") else f"{a.tpu}:2x2",
                                              platform="tpu").devices[0]
    config = dict(LLAMA_8B, num_hidden_layers=2) if a.quick else LLAMA_8B
    budget = int(a.budget_gib * GIB)
    rows = []
    lengths = (1024, 4096) if a.quick else (1024, 8192, 16384, 32768, 131072, 262144)
    if a.lengths:
        lengths = tuple(int(x) for x in a.lengths.split(","))
    target = f"TPU {a.tpu} ({DEVICE.device_kind}), compiled without one" if DEVICE else f"backend {jax.default_backend()}"
    programs = tuple(a.programs.split(",")) if a.programs else ("before", "after", "offload") if DEVICE else ("before", "after")
    print(f"{target}; Llama-3.1-8B shape ({config['num_hidden_layers']} layers), batch 1, bf16")
    for variant in [] if a.speed_only else a.variants.split(","):
        for program in programs:
            for seq in lengths:
                if program == "before" and seq > (1024 if DEVICE else 32768):
                    continue  # XLA:TPU takes minutes over the [T, T] programs; the CPU run has them
                dev, host = _step(config, variant, program, seq)
                rows.append({"variant": variant, "program": program, "seq": seq, "device_gib": dev / GIB,
                             "host_gib": host / GIB})
                print(f"{variant:5s} {program:6s} {seq:>8,} tokens: {dev / GIB:7.2f} GiB on device, {host / GIB:.2f} on host",
                      flush=True)
    longest = {}
    if not a.quick and not a.no_search and not a.speed_only:
        for variant in a.variants.split(","):
            if "before" in programs:
                longest[variant, "before"] = _longest(config, variant, "before", budget, 1024, 65536, 1024)
            for program in programs:
                if program != "before":  # bracketed by the table's two longest lengths when it has them
                    lo, hi = (lengths[-2], lengths[-1]) if len(lengths) > 1 and lengths[-2] >= 16384 else (16384, 1 << 21)
                    longest[variant, program] = _longest(config, variant, program, budget, lo, hi, 4096)
            print(f"{variant}: longest sequence in {a.budget_gib:g} GiB: "
                  + ", ".join(f"{p} {longest[variant, p]:,}" for p in programs if (variant, p) in longest)
                  + " tokens (unsloth's published QLoRA on an 80 GB GPU: 342,733)", flush=True)
    speed = [] if a.no_speed else _speed(a.rounds)
    for seq, before, after in speed:
        print(f"speed at {seq:5d} tokens (d=512, 4 layers, batch 4, LoRA): before {before * 1e3:7.1f} ms, "
              f"after {after * 1e3:7.1f} ms, after/before {after / before:.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "longest": {f"{k[0]}/{k[1]}": v for k, v in longest.items()},
                       "speed": speed}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
