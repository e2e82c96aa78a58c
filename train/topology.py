"""``--plan TOPOLOGY``: the run's real train step compiled for a TPU slice without one (XLA's TPU compiler from
the pinned ``libtpu`` wheel, deviceless ahead-of-time compilation as MaxText's ``train_compile.py`` does), and
what one chip would hold: weights, adapters, optimizer state, temporaries (activations and the rest), bytes
XLA offloads to host memory, against the chip's HBM; the compiler's FLOP count of the step.

The mesh of the config (data x fsdp x context x tensor) is laid over the slice's chips and the whole step
(model, variant, quantization, batch, sequence length, remat, attention, loss chunks) is compiled as one
program for the slice, from abstract shapes: nothing is read but config.json, nothing is allocated.

Topologies: ``v5p-N`` (N TensorCores, N/2 chips, 95 GiB each), ``v5e-N`` and ``v6e-N`` (N chips, 16 and 32
GiB), or XLA's own ``v5p:2x2x1`` form. GPUs: not offered. XLA:GPU compiles only through JAX's CUDA plugin and
CUDA's compiler libraries (gigabytes of nvidia wheels), which this app does not pin and the CPU machines it is
tested on do not have; deviceless GPU compilation was not tried.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

from train.config import Config, ConfigError

__all__ = ["Chip", "TOPOLOGIES", "topology", "prepare_libtpu", "compile_plan", "format_compile_plan"]

GIB = 2**30
LIBTPU = Path(__file__).resolve().parents[1] / ".cache" / "libtpu"  # make libtpu


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # XLA's name: v5p, v5e, v6e
    hbm: int  # bytes per chip
    peak_flops: float  # dense bf16 FLOP/s per chip (Google's published figures)
    shapes: dict[int, str]  # chips -> XLA topology, the slices Cloud TPU sells
    cores_per_chip: int = 1  # the name counts TensorCores (v5p-8: 4 chips)


TOPOLOGIES = {
    "v5p": Chip("v5p", 95 * GIB, 459e12, {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
                                           128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}, cores_per_chip=2),
    "v5e": Chip("v5e", 16 * GIB, 197e12, {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
                                           128: "8x16", 256: "16x16"}),
    "v6e": Chip("v6e", 32 * GIB, 918e12, {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
                                           128: "8x16", 256: "16x16"}),
}


def _known() -> str:
    return ", ".join(f"{g}-{n * c.cores_per_chip}" for g, c in TOPOLOGIES.items() for n in c.shapes)


def topology(name: str) -> tuple[Chip, str, int]:
    """``(chip, XLA topology name, chips)`` of ``v5p-8`` / ``v5e-16`` / ``v5p:2x2x1``; unknown names are refused
    with the list of known ones."""
    m = re.fullmatch(r"(v5p|v5e|v6e)-(\d+)", name)
    if m:
        chip = TOPOLOGIES[m[1]]
        n = int(m[2])
        chips = n // chip.cores_per_chip
        if n % chip.cores_per_chip or chips not in chip.shapes:
            raise ConfigError(f"--plan: unknown topology {name!r}; known: {_known()} (or XLA's form, e.g. v5p:2x2x1)")
        return chip, f"{chip.generation}:{chip.shapes[chips]}", chips
    m = re.fullmatch(r"(v5p|v5e|v6e):(\d+(?:x\d+){1,2})", name)
    if m:
        chip = TOPOLOGIES[m[1]]
        dims = [int(x) for x in m[2].split("x")]
        if len(dims) != (3 if m[1] == "v5p" else 2):
            raise ConfigError(f"--plan: {name!r}: {m[1]} slices have {3 if m[1] == 'v5p' else 2} dimensions")
        chips = 1
        for d in dims:
            chips *= d
        return chip, name, chips
    gpu = re.fullmatch(r"(?i)(h100|h200|a100|b200|l4|gpu).*", name)
    raise ConfigError(f"--plan: unknown topology {name!r}; known: {_known()} (or XLA's form, e.g. v5p:2x2x1)"
                      + ("; GPUs are not offered: XLA:GPU compiles only with JAX's CUDA plugin and CUDA's libraries" if gpu else ""))


def prepare_libtpu() -> None:
    """Before jax is imported: the CPU stays the default backend (XLA:TPU only compiles), and the pinned libtpu
    (``make libtpu``'s ``.cache/libtpu``, else an installed ``libtpu``) is importable."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: not on a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to guard: compilers may run side by side
    if (LIBTPU / "libtpu").is_dir() and str(LIBTPU) not in sys.path:
        sys.path.insert(0, str(LIBTPU))


def _devices(chip: Chip, xla_name: str) -> list[Any]:
    import importlib.util

    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("--plan needs XLA's TPU compiler: run `make libtpu` (the pinned wheel into .cache/libtpu) "
                          "or pip install libtpu==0.0.42.1")
    dims = [int(x) for x in xla_name.split(":")[1].split("x")]
    dims += [1] * (3 - len(dims))
    kw = {}
    if dims[0] * dims[1] * dims[2] <= (4 if chip.generation == "v5p" else 8):  # one host holds the whole slice
        kw["chips_per_host_bounds"] = tuple(dims)
    return list(topologies.get_topology_desc(topology_name=xla_name, platform="tpu", **kw).devices)


def _batch(cfg: Config, micro: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The shapes and dtypes of one step's batch, as the data pipeline makes them, from the config alone."""
    import jax.numpy as jnp

    accum, t = cfg.train.grad_accum, cfg.data.seq_len
    if cfg.train.objective == "grpo":
        raise ConfigError("--plan: train.objective grpo is not planned (its step's batch comes from rollouts)")
    if cfg.model.task == "sequence_classification":
        return {"input_ids": ((accum, micro, t), jnp.int32), "attention_mask": ((accum, micro, t), jnp.int32),
                "loss_mask": ((accum, micro, t), jnp.int32), "labels": ((accum, micro), jnp.int32)}
    row = (accum, micro, 2, t) if cfg.train.objective in ("dpo", "ipo", "simpo") else (accum, micro, t)
    out = {k: (row, jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    if cfg.data.packing and len(row) == 3:
        out["segment_ids"] = (row, jnp.int32)
    return out


def compile_plan(cfg: Config, name: str) -> dict[str, Any]:
    """Compile the run's train step for topology ``name`` (see the module docstring); the figures per chip."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lorax_variants.hf.auto import model_config
    from train.build import build, micro_batch, model_dir
    from train.plan import _device_bytes
    from train.run import Prepared, _steps, _with_optimizer

    chip, xla_name, chips = topology(name)
    sizes = {a: getattr(cfg.mesh, a) for a in ("data", "fsdp", "context", "tensor")}
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if chips % fixed or (-1 not in sizes.values() and fixed != chips):
        raise ConfigError(f"mesh: data={sizes['data']} x fsdp={sizes['fsdp']} x context={sizes['context']} x "
                          f"tensor={sizes['tensor']} needs {fixed} chips{' (or a multiple)' if -1 in sizes.values() else ''}"
                          f"; {name} has {chips}")
    hf_config = model_config(model_dir(cfg))
    devices = _devices(chip, xla_name)
    built = build(cfg, abstract=True, hf_config=hf_config, devices=devices)
    micro = micro_batch(cfg, built.mesh)
    p = _with_optimizer(Prepared(cfg, None, None, None, None, built, None, None, None), built)
    fns = _steps(p)
    mesh = built.mesh
    spec = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=fns.batch_sharding(len(shape)))
             for k, (shape, dtype) in _batch(cfg, micro).items()}
    rep = NamedSharding(mesh, P())
    args = (spec(built.trainable, built.trainable_sh), spec(built.frozen, built.frozen_sh),
            spec(p.opt_abstract, p.opt_sh), batch, jax.ShapeDtypeStruct((), np.int32, sharding=rep),
            jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep))
    info = {"topology": name, "xla_topology": xla_name, "chip": chip.generation, "chips": len(devices),
            "device_kind": devices[0].device_kind, "hbm": chip.hbm, "mesh": dict(mesh.shape),
            "seq_len": cfg.data.seq_len, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "weights": _device_bytes(built.frozen, built.frozen_sh),
            "adapters": _device_bytes(built.trainable, built.trainable_sh),
            "optimizer_state": _device_bytes(p.opt_abstract, p.opt_sh)}
    try:
        compiled = fns.train.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - XLA:TPU refuses a program over the chip's memory at compile time
        text = str(e)
        if "memory" not in text.lower() and "RESOURCE_EXHAUSTED" not in text:
            raise
        info |= {"fits": False, "compiler_error": text.splitlines()[0][:500], "device_total": None}
        m = re.search(r"\(([\d.]+)([KMG])\) exceeds available HBM \(([\d.]+)([KMG])\)", text)
        if m:  # XLA's own figures: what the program needs, what the chip offers it
            unit = lambda v, u: int(float(v) * {"K": 2**10, "M": 2**20, "G": GIB}[u])  # noqa: E731
            info |= {"device_total": unit(m[1], m[2]), "available": unit(m[3], m[4])}
        return info | {"suggestions": _suggest(cfg, info)}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    info |= {"arguments": mem.argument_size_in_bytes, "outputs_not_aliased": mem.output_size_in_bytes - mem.alias_size_in_bytes,
             "temporaries": mem.temp_size_in_bytes,
             "host": getattr(mem, "host_temp_size_in_bytes", 0) + getattr(mem, "host_argument_size_in_bytes", 0),
             "device_total": total, "fits": total <= chip.hbm,
             "xla_flops": float(cost.get("flops", 0.0)) if cost else None, "peak_flops": chip.peak_flops,
             "model_flops": model_flops(built, cfg) / len(devices)}
    return info | {"suggestions": [] if info["fits"] else _suggest(cfg, info)}


def model_flops(built: Any, cfg: Config) -> float:
    """The step's useful FLOPs: 4·N·tokens for the N weights of matmuls (forward, and the backward to the inputs;
    frozen weights get no gradient, the adapters' are negligible; expert banks count their top-k share) plus
    causal attention's 6·T²·H·D per layer and row (forward 2·T²·H·D, backward twice that; windows ignored).
    Recomputation (remat) is not counted, as MFU does not count it."""
    import numpy as np

    import lorax_variants as lv

    c = built.model.config
    moe = getattr(c, "moe", None)
    n = 0
    paths = {}
    for path, x in lv.leaves_with_paths(lv.combine(built.trainable, built.frozen), nodes_are_leaves=True):
        shape = tuple(getattr(x, "shape", ()))
        paths[path] = shape
        if len(shape) < 2 or path.endswith("embed") or "norm" in path or "router" in path:
            continue
        size = float(np.prod(shape))
        if moe is not None and len(shape) == 4:
            size *= moe.top_k / moe.num_experts
        n += size
    if "lm_head" not in paths and "embed" in paths:  # a tied head multiplies by the embedding
        n += float(np.prod(paths["embed"]))
    rows = cfg.train.batch_size * (2 if cfg.train.objective in ("dpo", "ipo", "simpo") else 1)
    t = cfg.data.seq_len
    flops = 4.0 * n * rows * t
    heads, hd, layers = (getattr(c, k, None) for k in ("num_attention_heads", "head_dim", "num_hidden_layers"))
    if heads and hd and layers and getattr(built.model, "causal", False):
        flops += 6.0 * t * t * heads * hd * layers * rows
    return flops


def _suggest(cfg: Config, info: dict[str, Any]) -> list[str]:
    """What would shrink the step, in the order we would try it."""
    out = []
    if cfg.model.remat not in ("offload", "nested"):
        out.append("model.remat=nested (or offload: layer inputs in host memory)")
    elif cfg.model.remat == "nested":
        out.append("model.remat=offload (layer inputs in host memory)")
    if cfg.quant.kind == "none":
        out.append("quant.kind=nf4 (QLoRA: frozen weights in 4 bits)")
    if cfg.model.mlp_chunk is None and cfg.data.seq_len > 4096:
        out.append("model.mlp_chunk=2048")
    if cfg.model.task == "causal_lm" and cfg.data.seq_len >= 8192 and info["chips"] > info["mesh"]["context"]:
        out.append(f"mesh.context={info['chips']} (the sequence over the chips)")
    if info["mesh"]["fsdp"] < info["chips"] and info["mesh"]["context"] == 1:
        out.append(f"mesh.fsdp={info['chips']} (weights split over the chips)")
    if cfg.train.batch_size // cfg.train.grad_accum > 1:
        out.append(f"train.grad_accum={cfg.train.grad_accum * 2} (smaller micro-batches)")
    out.append("a shorter data.seq_len, or a larger slice")
    return out


def format_compile_plan(info: dict[str, Any]) -> str:
    g = lambda n: "?" if n is None else f"{n / GIB:,.2f} GiB"  # noqa: E731
    head = (f"{info['topology']} ({info['chips']} x {info['device_kind']}, {g(info['hbm'])} HBM each; compiled for "
            f"{info['xla_topology']} without one), mesh {info['mesh']}, batch {info['batch_size']} x "
            f"{info['seq_len']:,} tokens")
    lines = [head, "per chip:",
             f"  weights (frozen)       {g(info['weights'])}",
             f"  adapters               {g(info['adapters'])}",
             f"  optimizer state        {g(info['optimizer_state'])}"]
    if "temporaries" in info:
        lines += [f"  temporaries            {g(info['temporaries'])}  (activations, gradients, gathered weights, ...)",
                  f"  outputs not in place   {g(info['outputs_not_aliased'])}",
                  f"  device total           {g(info['device_total'])} of {g(info['hbm'])}",
                  f"  host (offloaded)       {g(info['host'])}"]
        lines.append(f"step FLOPs per chip: model {info['model_flops']:.3e} (4·N·tokens + causal attention; at the "
                     f"chip's peak {info['peak_flops'] / 1e12:.0f} TFLOP/s: {info['model_flops'] / info['peak_flops']:.2f} s, "
                     f"the step's time at 100% MFU); XLA's count {info['xla_flops']:.3e} (each loop body once: a "
                     "scanned stack of layers counts as one layer)")
    else:
        lines.append(f"  XLA:TPU refused to compile it: {info['compiler_error']}")
    if info["fits"]:
        lines.append(f"fits: {g(info['hbm'] - info['device_total'])} to spare per chip")
    else:
        over = "" if info["device_total"] is None else \
            f" by {g(info['device_total'] - info.get('available', info['hbm']))}"
        lines.append(f"does not fit{over}; try: " + "; ".join(info["suggestions"]))
    return "\n".join(lines)
