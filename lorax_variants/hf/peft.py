"""Adapters to and from PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Our nodes hold ``lora_a [..., in, r]`` and ``lora_b [..., r, out]`` over stacked layers; PEFT keeps
one module per layer with ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]`` (also for GPT-2's
Conv1D, with ``fan_in_fan_out``), under ``base_model.model.<module>``. What each variant becomes:

- LoRA, rsLoRA, LoRA-FA, QLoRA's adapters: LoRA (``lora_alpha = s·r`` per module, so PEFT's
  ``alpha / r`` is exactly our scale; per-module ranks and alphas via ``rank_pattern``/``alpha_pattern``).
- PiSSA: as PEFT's conversion for the original base (``path_initial_model_for_weight_conversion``):
  rank 2r with ``A = [A'; A₀]``, ``B = [B', −B₀]``, so ``ΔW = s(B'A' − B₀A₀)`` on the untouched base.
- DoRA: LoRA + ``lora_magnitude_vector``, ``use_dora``. VeRA: ``vera_lambda_d/b`` and the shared
  ``base_model.vera_A/B`` (``save_projection``). AdaLoRA: ``lora_A/E/B`` truncated to the kept
  triplets with the final ``rank_pattern``. DyLoRA: LoRA of the chosen rank. SoRA: gates folded into
  B, zero-gate ranks removed. LoRA-drop: the shared set written into each layer that uses it.
  Multi-task: one adapter directory per task (``task_0``, ...). Delta-LoRA changes W: refused
  (export it merged).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.hf import names
from lorax_variants.hf.safetensors_io import SafetensorsFile, atomic_dir, write_safetensors
from lorax_variants.nodes.adalora import AdaLoraNode
from lorax_variants.nodes.base import Node
from lorax_variants.nodes.dora import DoraNode
from lorax_variants.nodes.dylora import DyLoraNode
from lorax_variants.nodes.lora import LoraNode
from lorax_variants.nodes.lora_drop import LoraDropNode
from lorax_variants.nodes.multitask import MultiTaskNode
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.nodes.sora import SoraNode
from lorax_variants.nodes.vera import VeraNode
from lorax_variants.shared import Shared, resolve_shared, value_of
from lorax_variants.tree import leaves_with_paths, map_with_paths

__all__ = ["save_peft", "load_peft", "module_names"]

PREFIX = "base_model.model."


def module_names(model: Any) -> dict[str, tuple[str, str]]:
    """Our weight path -> (HF module name template with ``{i}``, kind), for adaptable weights."""
    out = {}
    for path, (template, kind) in names.table(model, names.default_prefix(model)).items():
        if template.endswith(".weight"):
            out[path] = (template[: -len(".weight")], kind)
    return out


def _layers(x: np.ndarray, lead: int) -> list[np.ndarray]:
    return [x] if lead == 0 else [x[i] for i in range(x.shape[0])]


def _np(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def _lora_factors(n: Node, path: str, rank: int | None, pissa_initial: Node | None) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Per layer ``(A [r, in], B [out, r], scale)`` of a LoRA-like node, in torch layout."""
    lead = len(n.shape) - 2
    if isinstance(n, DyLoraNode):
        b = rank if rank is not None else n.lora_a.shape[-1]
        if not n.r_min <= b <= n.lora_a.shape[-1]:
            raise ValueError(f"{path}: DyLoRA rank {b} is outside [{n.r_min}, {n.lora_a.shape[-1]}]")
        a_all, b_all, scale = _np(n.lora_a)[..., :b], _np(n.lora_b)[..., :b, :], n.alpha / b
        return [(a.T, bb.T, scale) for a, bb in zip(_layers(a_all, lead), _layers(b_all, lead))]
    if isinstance(n, SoraNode):
        gate, a_all, b_all = _np(n.gate), _np(n.lora_a), _np(n.lora_b)
        out = []
        for g, a, bb in zip(_layers(gate, lead), _layers(a_all, lead), _layers(b_all, lead)):
            keep = g != 0
            out.append((a[:, keep].T, (g[keep, None] * bb[keep]).T, n.scale))
        return out
    if isinstance(n, LoraDropNode):
        n = n.as_lora()  # every layer with the set it uses
    if isinstance(n, (LoraNode, DoraNode)):
        a_all, b_all = _np(n.lora_a), _np(n.lora_b)
        if pissa_initial is None:
            return [(a.T, bb.T, n.scale) for a, bb in zip(_layers(a_all, lead), _layers(b_all, lead))]
        a0, b0 = _np(pissa_initial.lora_a), _np(pissa_initial.lora_b)
        return [(np.concatenate([a, i], axis=1).T, np.concatenate([bb, -j], axis=0).T, n.scale)
                for a, bb, i, j in zip(_layers(a_all, lead), _layers(b_all, lead), _layers(a0, lead), _layers(b0, lead))]
    raise TypeError(type(n).__name__)


def _alpha(scale: float, r: int) -> float:
    alpha = scale * r
    return float(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 * max(1.0, abs(alpha)) else float(alpha)


def _config(peft_type: str, modules: list[str], base: str | None, fan_in_fan_out: bool, **extra: Any) -> dict[str, Any]:
    return {
        "peft_type": peft_type, "base_model_name_or_path": base, "task_type": None, "inference_mode": True,
        "target_modules": "(" + "|".join(re.escape(m) for m in modules) + ")", "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "revision": None, **extra,
    }


def _module_list(model: Any, path: str, count: int) -> list[str]:
    table = module_names(model)
    if path not in table:
        raise ValueError(f"{path}: no HF module corresponds to this adapted weight in {model.config.model_type}")
    template = table[path][0]
    return [template.format(i=i) for i in range(count)] if "{i}" in template else [template]


def _peft_dict(model: Any, nodes: list[tuple[str, Node]], *, rank: int | None, base: str | None,
               initial: dict[str, Node] | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    kinds = {type(n) for _, n in nodes}
    gpt2 = model.config.model_type == "gpt2"
    tensors: dict[str, np.ndarray] = {}
    if kinds <= {VeraNode}:
        first = nodes[0][1]
        va, vb = _np(value_of(first.vera_a)), _np(value_of(first.vera_b))
        r = va.shape[1]
        modules = []
        for path, n in nodes:
            lead = len(n.shape) - 2
            mods = _module_list(model, path, n.shape[0] if lead else 1)
            for m, d, b in zip(mods, _layers(_np(n.lambda_d), lead), _layers(_np(n.lambda_b), lead)):
                tensors[f"{PREFIX}{m}.vera_lambda_d"], tensors[f"{PREFIX}{m}.vera_lambda_b"] = d, b
                modules.append(m)
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = va.T.copy(), vb.T.copy()
        return _config("VERA", modules, base, gpt2, r=r, save_projection=True, projection_prng_key=0,
                       vera_dropout=0.0, d_initial=0.1, bias="none"), tensors
    if kinds <= {AdaLoraNode}:
        modules, pattern, r0, alpha = [], {}, None, None
        for path, n in nodes:
            lead = len(n.shape) - 2
            mods = _module_list(model, path, n.shape[0] if lead else 1)
            r0 = n.lora_a.shape[-1]
            alpha = n.scale * (r0 + 1e-5)
            for m, a, e, b, keep in zip(mods, _layers(_np(n.lora_a), lead), _layers(_np(n.lora_e), lead),
                                        _layers(_np(n.lora_b), lead), _layers(np.asarray(n.rank_mask, bool), lead)):
                tensors[f"{PREFIX}{m}.lora_A"] = a.T[keep]
                tensors[f"{PREFIX}{m}.lora_E"] = (e * keep)[keep][:, None]
                tensors[f"{PREFIX}{m}.lora_B"] = b.T[:, keep]
                pattern[f"{m}.lora_E.default"] = [bool(k) for k in keep]
                modules.append(m)
        return _config("ADALORA", modules, base, gpt2, r=r0, init_r=r0, target_r=r0, lora_alpha=_alpha(alpha, 1),
                       rank_pattern=pattern, total_step=1000, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85,
                       orth_reg_weight=0.5, lora_dropout=0.0, bias="none", use_rslora=False, use_dora=False,
                       init_lora_weights=True, alpha_pattern={}), tensors
    dora = kinds <= {DoraNode}
    if not kinds <= {LoraNode, DyLoraNode, SoraNode, LoraDropNode} and not dora:
        raise ValueError(f"PEFT has no format for a mix of {sorted(k.__name__ for k in kinds)} in one adapter")
    entries = []  # (module, r, alpha)
    for path, n in nodes:
        lead = len(n.shape) - 2
        mods = _module_list(model, path, n.shape[0] if lead else 1)
        embed = _is_embedding(path)
        key_a, key_b = ("lora_embedding_A", "lora_embedding_B") if embed else ("lora_A.weight", "lora_B.weight")
        factors = _lora_factors(n, path, rank, (initial or {}).get(path))
        for i, (m, (a, b, scale)) in enumerate(zip(mods, factors)):
            tensors[f"{PREFIX}{m}.{key_a}"], tensors[f"{PREFIX}{m}.{key_b}"] = a, b
            if dora:
                tensors[f"{PREFIX}{m}.lora_magnitude_vector"] = _layers(_np(n.magnitude), lead)[i]
            entries.append((m, a.shape[0], _alpha(scale, a.shape[0])))
    r = Counter(e[1] for e in entries).most_common(1)[0][0]
    alpha = Counter(e[2] for e in entries).most_common(1)[0][0]
    rank_pattern = {re.escape(m): rr for m, rr, _ in entries if rr != r}
    alpha_pattern = {re.escape(m): aa for m, _, aa in entries if aa != alpha}
    return _config("LORA", [e[0] for e in entries], base, gpt2, r=r, lora_alpha=alpha, rank_pattern=rank_pattern,
                   alpha_pattern=alpha_pattern, use_rslora=False, use_dora=dora, lora_dropout=0.0, bias="none",
                   init_lora_weights=True), tensors


def _is_embedding(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ("embed", "wte", "word_embeddings")


def _adapter_nodes(tree: Any) -> list[tuple[str, Node]]:
    return [(p, n) for p, n in leaves_with_paths(tree, nodes_are_leaves=True) if isinstance(n, Node)
            and not isinstance(n, QuantizedNode)]


def save_peft(out_dir: str | os.PathLike, model: Any, tree: Any, *, base_model: str | None = None,
              rank: int | None = None, initial: Any = None, variant: str | None = None,
              modules_to_save: list[str] | None = None, overwrite: bool = False) -> Path:
    """Write the adapters of ``tree`` (the adapted params) as a PEFT adapter directory.

    ``rank``: DyLoRA's rank to export. ``initial``: the adapted tree at initialization, needed for
    PiSSA (its A₀, B₀: PEFT's conversion for the original base). ``variant``: the training
    variant where the tree alone does not tell (``"delta_lora"`` is refused: it changed W).
    ``modules_to_save``: paths of plain leaves that were trained too (a classification head, a
    bias), written as PEFT's ``modules_to_save`` (whole modules, torch layout). Multi-task trees
    write one adapter per task in ``out_dir/task_<k>``.
    """
    if variant == "delta_lora":
        raise ValueError("Delta-LoRA changes the frozen base weights, which a PEFT adapter cannot carry: "
                         "export the merged model instead (save_merged / --format merged)")
    tree = resolve_shared(tree)
    nodes = _adapter_nodes(tree)
    if not nodes:
        raise ValueError("save_peft: the tree has no adapter nodes")
    kinds = {type(n) for _, n in nodes}
    if MultiTaskNode in kinds:
        from lorax_variants.nodes.multitask import select

        n_tasks = nodes[0][1].lora_a.shape[len(nodes[0][1].shape) - 2]

        def write_all(tmp: Path) -> None:
            for k in range(n_tasks):
                save_peft(tmp / f"task_{k}", model, select(tree, k), base_model=base_model,
                          modules_to_save=modules_to_save, overwrite=True)

        return atomic_dir(out_dir, overwrite, write_all)
    init_nodes = dict(_adapter_nodes(initial)) if initial is not None else None
    config, tensors = _peft_dict(model, nodes, rank=rank, base=base_model, initial=init_nodes)
    if getattr(model, "task", None) == "sequence_classification":
        config["task_type"] = "SEQ_CLS"
    if modules_to_save:
        saved = _modules_to_save(model, tree, modules_to_save)
        tensors |= {PREFIX + k: v for k, v in saved.items()}
        config["modules_to_save"] = sorted({k.rsplit(".", 1)[0] for k in saved})

    def write(tmp: Path) -> None:
        write_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return atomic_dir(out_dir, overwrite, write)


def _modules_to_save(model: Any, tree: Any, paths: list[str]) -> dict[str, np.ndarray]:
    """HF tensors (torch layout) of the plain leaves at ``paths``; every tensor of each module."""
    table = names.table(model, names.default_prefix(model))
    leaves = dict(leaves_with_paths(tree, nodes_are_leaves=True))
    out = {}
    for path in paths:
        if path not in table or path not in leaves:
            raise ValueError(f"modules_to_save: {path!r} is not a weight of {model.config.model_type}")
        if isinstance(leaves[path], Node):
            raise ValueError(f"modules_to_save: {path!r} is adapted; only plain trained leaves can be saved whole")
        template, kind = table[path]
        if "{i}" in template:
            raise ValueError(f"modules_to_save: {path!r} is a stacked per-layer weight; PEFT saves whole modules")
        x = _np(leaves[path])
        out[template] = x.T.copy() if kind == "linear" else x
    # PEFT replaces whole modules: a weight's bias (and vice versa) must come along.
    modules = {k.rsplit(".", 1)[0] for k in out}
    for path, (template, kind) in table.items():
        if "{i}" not in template and template.rsplit(".", 1)[0] in modules and template not in out:
            x = _np(leaves[path])
            out[template] = x.T.copy() if kind == "linear" else x
    return out


def load_peft(adapter_dir: str | os.PathLike, model: Any, params: Any, key: Any = 0) -> Any:
    """A PEFT adapter directory (LoRA, DoRA, VeRA, AdaLoRA) -> our adapted tree over ``params``.

    Each module's factors are placed in its layer of the stacked node; per-module ranks below the
    largest are zero-padded (LoRA, DoRA) or masked (AdaLoRA). Anything that does not fit ``model``
    (a module it lacks, a shape that differs) is an error naming the tensor.
    """
    from lorax_variants.adapt import adapt
    from lorax_variants.spec import AdapterSpec

    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: no adapter_config.json (not a PEFT adapter directory)")
    cfg = json.loads(cfg_path.read_text())
    ptype = cfg.get("peft_type")
    if ptype not in ("LORA", "VERA", "ADALORA"):
        raise ValueError(f"{cfg_path}: peft_type {ptype!r} cannot be imported; supported: LORA (incl. DoRA), VERA, ADALORA")
    st = SafetensorsFile(d / "adapter_model.safetensors")
    tensors = {k: st.get(k) for k in st.keys()}
    table = module_names(model)
    suffix = {"LORA": ("lora_A.weight", "lora_embedding_A"), "VERA": ("vera_lambda_d",), "ADALORA": ("lora_A",)}[ptype]
    found: dict[str, dict[int, str]] = {}  # our path -> layer -> module
    for k in tensors:
        if not k.startswith(PREFIX) or not k.endswith(suffix):
            continue
        module = k[len(PREFIX):].rsplit(".", 2 if k.endswith(".weight") else 1)[0]
        for path, (template, _) in table.items():
            m = re.fullmatch(re.escape(template).replace(r"\{i\}", r"(\d+)"), module)
            if m:
                found.setdefault(path, {})[int(m.group(1)) if m.groups() else 0] = module
                break
        else:
            raise ValueError(f"{cfg_path}: adapter tensor {k!r} names module {module!r}, which "
                             f"{model.config.model_type} does not have (an adapter for a different base model?)")
    if not found:
        raise ValueError(f"{d}: no adapter tensors found")
    ranks = {}
    for path, mods in found.items():
        if ptype == "VERA":
            ranks[path] = tensors["base_model.vera_A"].shape[0]
        else:
            ranks[path] = max(tensors[f"{PREFIX}{m}.{suffix[0]}"].shape[0] if ptype == "LORA" else
                              len(cfg["rank_pattern"].get(f"{m}.lora_E.default", [0] * cfg["init_r"])) for m in mods.values())
    variant = {"VERA": "vera", "ADALORA": "adalora"}.get(ptype, "dora" if cfg.get("use_dora") else "lora")
    r = max(ranks.values())
    targets = tuple(re.escape(p) for p in found)
    alpha = float(cfg.get("lora_alpha", 8))
    spec = AdapterSpec(targets=targets, variant=variant, r=r, alpha=alpha, stacked=model.stacked,
                       d_initial=float(cfg.get("d_initial", 0.1)))
    adapted = adapt(params, spec, jax.random.key(key) if isinstance(key, int) else key)
    shapes = dict(leaves_with_paths(params, nodes_are_leaves=True))

    def fill(path: str, n: Any) -> Any:
        if path not in found:
            return n
        w = shapes[path]
        lead = len(w.shape) - 2
        count = w.shape[0] if lead else 1
        missing = [i for i in range(count) if i not in found[path]]
        if missing:
            raise ValueError(f"{d}: {path} has adapters for layers {sorted(found[path])} but not {missing}; "
                             "partial layer sets are not supported")
        return _fill_node(n, path, [found[path][i] for i in range(count)], tensors, cfg, lead, d)

    return map_with_paths(fill, adapted, nodes_are_leaves=True)


def _fill_node(n: Node, path: str, mods: list[str], tensors: dict[str, np.ndarray], cfg: dict[str, Any], lead: int,
               d: Path) -> Node:
    def get(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{d}: adapter tensor {name!r} is missing")
        t = np.asarray(tensors[name], np.float32)
        if shape is not None and t.shape != shape:
            raise ValueError(f"{d}: adapter tensor {name!r} has shape {t.shape}; {path} of this model needs {shape}")
        return t

    def stack(xs: list[np.ndarray]) -> jax.Array:
        return jnp.asarray(np.stack(xs) if lead else xs[0])

    d_in, d_out = n.shape[-2:]
    if isinstance(n, VeraNode):
        va, vb = get("base_model.vera_A"), get("base_model.vera_B")
        lam_d = stack([get(f"{PREFIX}{m}.vera_lambda_d", (va.shape[0],)) for m in mods])
        lam_b = stack([get(f"{PREFIX}{m}.vera_lambda_b", (d_out,)) for m in mods])
        if va.shape[1] < d_in or vb.shape[0] < d_out:
            raise ValueError(f"{d}: vera_A {va.shape} / vera_B {vb.shape} are smaller than {path} [{d_in}, {d_out}]")
        own = n.vera_a.value is not None  # the owner holds the projections; the others refer to it
        shared_a = Shared(n.vera_a.name, jnp.asarray(va.T) if own else None)
        shared_b = Shared(n.vera_b.name, jnp.asarray(vb.T) if own else None)
        return n.replace(lambda_d=lam_d, lambda_b=lam_b, vera_a=shared_a, vera_b=shared_b)
    r = n.lora_a.shape[-1]
    if isinstance(n, AdaLoraNode):
        a_s, e_s, b_s, masks = [], [], [], []
        for m in mods:
            keep = np.asarray(cfg.get("rank_pattern", {}).get(f"{m}.lora_E.default", [True] * r), bool)
            k = int(keep.sum())
            a = np.zeros((r, d_in), np.float32)
            e = np.zeros((r,), np.float32)
            b = np.zeros((d_out, r), np.float32)
            a[keep] = get(f"{PREFIX}{m}.lora_A", (k, d_in))
            e[keep] = get(f"{PREFIX}{m}.lora_E", (k, 1))[:, 0]
            b[:, keep] = get(f"{PREFIX}{m}.lora_B", (d_out, k))
            a_s.append(a.T), e_s.append(e), b_s.append(b.T), masks.append(keep)
        return n.replace(lora_a=stack(a_s), lora_e=stack(e_s), lora_b=stack(b_s), rank_mask=stack(masks))
    a_s, b_s, mags = [], [], []
    for m in mods:
        emb = f"{PREFIX}{m}.lora_embedding_A" in tensors
        ka, kb = (f"{PREFIX}{m}.lora_embedding_A", f"{PREFIX}{m}.lora_embedding_B") if emb else \
            (f"{PREFIX}{m}.lora_A.weight", f"{PREFIX}{m}.lora_B.weight")
        a, b = get(ka), get(kb)
        k = a.shape[0]
        if a.shape != (k, d_in) or b.shape != (d_out, k):
            raise ValueError(f"{d}: adapter tensors {ka!r} {a.shape} / {kb!r} {b.shape} do not fit {path} "
                             f"[{d_in}, {d_out}] of this model (an adapter for a different base model?)")
        scale = _module_value(cfg, "alpha_pattern", m, float(cfg.get("lora_alpha", 8))) / (
            math.sqrt(k) if cfg.get("use_rslora") else k)
        a_full = np.zeros((d_in, r), np.float32)
        b_full = np.zeros((r, d_out), np.float32)
        a_full[:, :k] = a.T
        b_full[:k] = b.T * (scale / n.scale)  # the node's one scale; per-module differences go into B
        a_s.append(a_full), b_s.append(b_full)
        if isinstance(n, DoraNode):
            mags.append(get(f"{PREFIX}{m}.lora_magnitude_vector", (d_out,)))
    out = n.replace(lora_a=stack(a_s), lora_b=stack(b_s))
    if isinstance(n, DoraNode):
        out = out.replace(magnitude=stack(mags))
    return out


def _module_value(cfg: dict[str, Any], field: str, module: str, default: float) -> float:
    for key, v in (cfg.get(field) or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return float(v)
    return default
