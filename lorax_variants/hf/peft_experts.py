"""LoRA on mixture-of-experts banks in PEFT's form: ``target_parameters`` (PEFT's ``ParamWrapper``).

In memory transformers keeps each layer's experts as two stacked parameters, ``mlp.experts.gate_up_proj
[E, 2f, d]`` (gate rows first) and ``mlp.experts.down_proj [E, d, f]``; PEFT adapts them with one LoRA
per expert, saved as ``lora_A.weight [E·r, in]`` (rows expert-major) and ``lora_B.weight [out, r·E]``
(columns rank-major) under ``<layer>.mlp.experts``, the first parameter's wrapper nested innermost
(``experts.base_layer.lora_A`` when both are adapted), scale ``alpha / r`` (per parameter through
``rank_pattern``/``alpha_pattern`` keys such as ``experts.gate_up_proj``).

Our banks are ``layers/moe/{gate,up,down}_proj [L, E, in, out]`` with their own A, B. Export: gate and up
become one LoRA on the fused ``gate_up_proj`` of rank r_gate + r_up, ``A = [A_g, A_u]``,
``B = [[B_g, 0], [0, B_u]]`` (so ΔW = [ΔW_g, ΔW_u] exactly). Import: a fused LoRA becomes two LoRAs
that share A (a copy each) with B split at f. Only LoRA-type nodes have this form (DoRA and the other
variants on expert banks are refused by name).

The per-expert form (``save_peft(..., experts="per_expert")``) is what vLLM's MoE LoRA loader reads and what
PEFT makes of a model whose experts are separate ``nn.Linear`` modules: one plain LoRA module per layer,
expert and projection, ``model.layers.<i>.mlp.experts.<e>.{gate,up,down}_proj`` (Mixtral:
``block_sparse_moe.experts.<e>.{w1,w3,w2}``, its checkpoint names), ``lora_A.weight [r, in]`` and
``lora_B.weight [out, r]``, in ``target_modules``. Both forms are read back; experts without tensors in the
per-expert form (an adapter on some experts only) get zero adapters.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from lorax_variants.codec import peft_alpha

__all__ = ["EXPERT_PATHS", "EXPERT_FORMS", "is_expert_path", "export_experts", "import_experts", "check_target_parameters",
           "per_expert", "from_per_expert"]

EXPERT_FORMS = ("fused", "per_expert")

PREFIX = "base_model.model."
EXPERT_PATHS = ("layers/moe/gate_proj", "layers/moe/up_proj", "layers/moe/down_proj")
PARAMS = ("gate_up_proj", "down_proj")  # in transformers' definition order: the first is wrapped innermost


def is_expert_path(path: str) -> bool:
    """Whether ``path`` is an expert bank (``layers/moe/{gate,up,down}_proj``)."""
    return path in EXPERT_PATHS


def _module(model: Any, layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts"  # Qwen3-MoE and Mixtral alike, in memory


def _np(x: Any) -> np.ndarray:
    import jax

    return np.asarray(jax.device_get(x), np.float32)


def _lora_only(path: str, n: Any) -> None:
    if getattr(type(n), "variant", None) != "lora":  # plain LoRA nodes only (not DoRA, not others)
        raise ValueError(f"{path}: PEFT holds expert-bank adapters as LoRA only; a {type(n).__name__} there cannot be "
                         "exported as a PEFT adapter (export it merged)")


def per_expert(path: str, n: Any, template: str) -> tuple[Any, tuple[str, ...]]:
    """The per-expert form (vLLM's MoE LoRA layout): a bank's node with its [L, E] axes as one of L·E modules,
    ``template``'s ``{i}``/``{e}`` filled in (``model.layers.<i>.mlp.experts.<e>.gate_proj``; Mixtral's
    ``block_sparse_moe.experts.<e>.w1``), layer-major as ``from_per_expert`` reads them."""
    _lora_only(path, n)
    L, E = n.lora_a.shape[:2]
    return _flat(n), tuple(template.format(i=i, e=e) for i in range(L) for e in range(E))


def from_per_expert(n: Any, fill: Any) -> Any:
    """``fill(flat)`` on the bank's node with its [L, E] axes as one (see ``per_expert``), shaped back."""
    flat = fill(_flat(n))
    return n.replace(lora_a=flat.lora_a.reshape(n.lora_a.shape), lora_b=flat.lora_b.reshape(n.lora_b.shape))


def _flat(n: Any) -> Any:
    """A bank's LoRA node with its factors' [L, E] axes as one axis of L·E modules (layer-major)."""
    L, E = n.lora_a.shape[:2]
    return n.replace(lora_a=n.lora_a.reshape(L * E, *n.lora_a.shape[2:]), lora_b=n.lora_b.reshape(L * E, *n.lora_b.shape[2:]))


def export_experts(model: Any, nodes: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """PEFT tensors and config fields (``target_parameters``, rank/alpha patterns) for the expert-bank nodes."""
    for path, n in nodes.items():
        _lora_only(path, n)
    L, E = next(iter(nodes.values())).shape[:2]
    f = model.config.moe.intermediate_size
    fused: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}  # param -> (A [L, E, in, R], B [L, E, R, out], s)
    gate, up = nodes.get("layers/moe/gate_proj"), nodes.get("layers/moe/up_proj")
    if gate is not None or up is not None:
        parts = [(n, sl) for n, sl in ((gate, slice(0, f)), (up, slice(f, 2 * f))) if n is not None]
        scale = parts[0][0].scale
        a = np.concatenate([_np(n.lora_a) for n, _ in parts], axis=-1)
        b = np.zeros(a.shape[:2] + (a.shape[-1], 2 * f), np.float32)
        at = 0
        for n, sl in parts:
            r = n.lora_a.shape[-1]
            b[:, :, at:at + r, sl] = _np(n.lora_b) * (n.scale / scale)
            at += r
        fused["gate_up_proj"] = (a, b, scale)
    down = nodes.get("layers/moe/down_proj")
    if down is not None:
        fused["down_proj"] = (_np(down.lora_a), _np(down.lora_b), down.scale)
    present = [p for p in PARAMS if p in fused]
    tensors = {}
    for i in range(L):
        for k, param in enumerate(present):
            a, b, _ = fused[param]
            r = a.shape[-1]
            key = f"{PREFIX}{_module(model, i)}" + ".base_layer" * (len(present) - 1 - k)
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].transpose(0, 2, 1).reshape(E * r, -1))
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].transpose(2, 1, 0).reshape(-1, r * E))
    extra = {"target_parameters": [f"mlp.experts.{p}" for p in present],
             "rank_pattern": {f"experts.{p}": int(fused[p][0].shape[-1]) for p in present},
             "alpha_pattern": {f"experts.{p}": peft_alpha(fused[p][2], fused[p][0].shape[-1]) for p in present}}
    return tensors, extra


def check_target_parameters(cfg: dict[str, Any], model: Any, cfg_path: Any) -> None:
    """Refuse a PEFT config whose ``target_parameters`` name anything but our expert banks
    (``experts.gate_up_proj`` / ``experts.down_proj``), naming the config file and entry."""
    targets = cfg.get("target_parameters") or []
    if not targets:
        return
    bad = [t for t in targets if not re.fullmatch(r"(.*\.)?experts\.(gate_up_proj|down_proj)", t)]
    if bad or getattr(model.config, "moe", None) is None:
        raise ValueError(f"{cfg_path}: target_parameters {bad or targets} are not the expert banks of a mixture-of-"
                         f"experts model here; this adapter cannot be represented")
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: use_dora with target_parameters (DoRA on expert banks) cannot be represented")


def _pattern(cfg: dict[str, Any], field: str, key: str, default: Any) -> Any:
    for pat, v in (cfg.get(field) or {}).items():
        if re.fullmatch(rf"(.*\.)?({pat})", key):
            return v
    return default


def import_experts(cfg: dict[str, Any], tensors: dict[str, np.ndarray], model: Any,
                   cfg_path: Any) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, float]], set[str]]:
    """Our expert-bank LoRAs ``{path: (A [L, E, in, r], B [L, E, r, out], scale)}`` from PEFT's tensors, and
    the tensor names used. Layers without tensors get zero adapters."""
    moe = getattr(model.config, "moe", None)
    rx = re.compile(re.escape(PREFIX) + r"model\.layers\.(\d+)\.mlp\.experts((?:\.base_layer)*)\.lora_([AB])\.weight")
    hits: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    used = set()
    for k, v in tensors.items():
        m = rx.fullmatch(k)
        if m:
            hits.setdefault((int(m.group(1)), m.group(2).count(".base_layer")), {})[m.group(3)] = v
            used.add(k)
    if not hits:
        return {}, used
    if moe is None:
        raise ValueError(f"{cfg_path}: expert adapters ({sorted(used)[0]}) for a model without experts")
    L, E, f, d = model.config.num_hidden_layers, moe.num_experts, moe.intermediate_size, model.config.hidden_size
    out: dict[str, list] = {}
    for (i, _), ab in sorted(hits.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{cfg_path}: layer {i}'s expert adapter lacks lora_{'AB'[len(ab) - 1 if 'A' in ab else 0]}")
        a, b = ab["A"], ab["B"]
        shapes = {(d, 2 * f): "gate_up_proj", (f, d): "down_proj"}
        param = shapes.get((a.shape[1], b.shape[0]))
        if param is None or a.shape[0] % E or b.shape[1] != a.shape[0]:
            raise ValueError(f"{cfg_path}: expert adapter of layer {i} has lora_A {a.shape} / lora_B {b.shape}, which "
                             f"fit neither gate_up_proj [{E}, {2 * f}, {d}] nor down_proj [{E}, {d}, {f}] of this model")
        r = a.shape[0] // E
        key = f"model.layers.{i}.mlp.experts.{param}"
        alpha = float(_pattern(cfg, "alpha_pattern", key, cfg.get("lora_alpha", 8)))
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        a_ours = a.reshape(E, r, -1).transpose(0, 2, 1)  # [E, in, r]
        b_ours = b.reshape(b.shape[0], r, E).transpose(2, 1, 0)  # [E, r, out]
        parts = {"gate_proj": b_ours[..., :f], "up_proj": b_ours[..., f:]} if param == "gate_up_proj" else {
            "down_proj": b_ours}
        for name, bb in parts.items():
            out.setdefault(f"layers/moe/{name}", []).append((i, a_ours, bb, scale))
    result = {}
    for path, layers in out.items():
        r = max(x[1].shape[-1] for x in layers)
        scale = layers[0][3]
        d_in, d_out = layers[0][1].shape[1], layers[0][2].shape[-1]
        a_all, b_all = np.zeros((L, E, d_in, r), np.float32), np.zeros((L, E, r, d_out), np.float32)
        for i, a, b, s in layers:
            a_all[i, ..., : a.shape[-1]] = a
            b_all[i, :, : b.shape[1]] = b * (s / scale)
        result[path] = (a_all, b_all, scale)
    return result, used
