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
  triplets with the final ``rank_pattern``. Every variant that reduces to LoRA is written as its
  ``as_lora()`` (DyLoRA at the chosen rank, SoRA with its gates folded into B and zero-gate ranks
  removed, LoRA-drop with the shared set in each layer that uses it); a multi-task tree as one adapter
  directory per task (``task_0``, ...). Delta-LoRA changes W: refused (export it merged).
- Variants that declare a PEFT codec in their module (``lorax_variants.codec``: HiRA, MiSS, SHiRA): their
  format from the codec's key table and config fields, the same table ``load_peft`` reads (formats whose
  PEFT layer wraps ``nn.Linear`` only are refused on GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lorax_variants.codec import PeftCodec, codec_of, peft_types
from lorax_variants.hf import names
from lorax_variants.hf.peft_experts import export_experts, is_expert_path
from lorax_variants.hf.safetensors_io import atomic_dir, write_safetensors
from lorax_variants.variants.adalora import AdaLoraNode
from lorax_variants.nodes.base import Node
from lorax_variants.variants.dora import DoraNode
from lorax_variants.variants.lora import LoraNode
from lorax_variants.variants.many import pick
from lorax_variants.variants.many import MultiAdapterNode
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.variants.vera import VeraNode
from lorax_variants.ops import as_lora
from lorax_variants.shared import resolve_shared, value_of
from lorax_variants.tree import leaves_with_paths

__all__ = ["save_peft", "module_names"]

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


def _lora_factors(n: Node, pissa_initial: Node | None) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Per layer ``(A [r, in], B [out, r], scale)`` of a LoRA or DoRA node, in torch layout."""
    lead = len(n.shape) - 2
    a_all, b_all = _np(n.lora_a), _np(n.lora_b)
    if pissa_initial is None:
        return [(a.T, bb.T, n.scale) for a, bb in zip(_layers(a_all, lead), _layers(b_all, lead))]
    a0, b0 = _np(pissa_initial.lora_a), _np(pissa_initial.lora_b)
    return [(np.concatenate([a, i], axis=1).T, np.concatenate([bb, -j], axis=0).T, n.scale)
            for a, bb, i, j in zip(_layers(a_all, lead), _layers(b_all, lead), _layers(a0, lead), _layers(b0, lead))]


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


def _peft_dict(model: Any, nodes: list[tuple[str, Node]], *, base: str | None,
               initial: dict[str, Node] | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    experts = {p: n for p, n in nodes if is_expert_path(p)}
    if experts:  # expert banks: PEFT's target_parameters form (LoRA only)
        expert_tensors, expert_config = export_experts(model, experts)
        nodes = [(p, n) for p, n in nodes if not is_expert_path(p)]
        if not nodes:
            first = next(iter(experts.values()))
            config = _config("LORA", [], base, False, r=first.lora_a.shape[-1], lora_alpha=_alpha(first.scale, first.lora_a.shape[-1]),
                             use_rslora=False, use_dora=False, lora_dropout=0.0, bias="none", init_lora_weights=True)
            config["target_modules"] = []
            return config | expert_config, expert_tensors
        config, tensors = _peft_dict(model, nodes, base=base, initial=initial)
        if config["peft_type"] != "LORA" or config.get("use_dora"):
            raise ValueError("PEFT holds expert-bank adapters as LoRA only: an adapter mixing them with "
                             f"{config['peft_type'].title()}{' (DoRA)' if config.get('use_dora') else ''} elsewhere "
                             "cannot be one PEFT adapter")
        config["target_parameters"] = expert_config["target_parameters"]
        config["rank_pattern"] = {**config["rank_pattern"], **expert_config["rank_pattern"]}
        config["alpha_pattern"] = {**config["alpha_pattern"], **expert_config["alpha_pattern"]}
        return config, tensors | expert_tensors
    kinds = {type(n) for _, n in nodes}
    gpt2 = model.config.model_type == "gpt2"
    codecs = {codec_of(n) for _, n in nodes}
    if len(codecs) == 1 and None not in codecs:
        return _codec_dict(model, nodes, codecs.pop(), base, gpt2)
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
                pattern[f"{m}.lora_E"] = [bool(k) for k in keep]  # as PEFT saves it (adapter name dropped)
                modules.append(m)
        return _config("ADALORA", modules, base, gpt2, r=r0, init_r=r0, target_r=r0, lora_alpha=_alpha(alpha, 1),
                       rank_pattern=pattern, total_step=1000, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85,
                       orth_reg_weight=0.5, lora_dropout=0.0, bias="none", use_rslora=False, use_dora=False,
                       init_lora_weights=True, alpha_pattern={}), tensors
    dora = kinds <= {DoraNode}
    if not kinds <= {LoraNode} and not dora:
        names = sorted(k.__name__ for k in kinds)
        raise ValueError(f"save_peft writes LoRA, DoRA, VeRA, AdaLoRA and {', '.join(peft_types())} adapters (and "
                         f"what reduces to LoRA), one format per adapter; {' and '.join(names)}{' in one adapter' if len(names) > 1 else ''} has no PEFT writer here: "
                         "export the merged model (save_merged / --format merged)")
    entries = []  # (module, r, alpha)
    for path, n in nodes:
        lead = len(n.shape) - 2
        mods = _module_list(model, path, n.shape[0] if lead else 1)
        embed = _is_embedding(path)
        key_a, key_b = ("lora_embedding_A", "lora_embedding_B") if embed else ("lora_A.weight", "lora_B.weight")
        factors = _lora_factors(n, (initial or {}).get(path))
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


def _codec_dict(model: Any, nodes: list[tuple[str, Node]], codec: PeftCodec, base: str | None,
                conv1d: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An adapter in a registered codec's format: its key table per module, its config fields."""
    if conv1d and not codec.conv1d:
        raise ValueError(f"save_peft: PEFT's {codec.peft_type} layers wrap nn.Linear only, not GPT-2's Conv1D "
                         f"({nodes[0][0]}): export the merged model (save_merged / --format merged)")
    tensors: dict[str, np.ndarray] = {}
    modules: list[str] = []
    config: dict[str, Any] | None = None
    first = ""
    for path, n in nodes:
        lead = len(n.shape) - 2
        mods = _module_list(model, path, n.shape[0] if lead else 1)
        own = codec.config(n)
        if config is None:
            config, first = own, path
        elif own != config:
            diff = sorted(k for k in own.keys() | config.keys() if own.get(k) != config.get(k))
            raise ValueError(f"save_peft: {path} and {first} differ in {diff}, which a {codec.peft_type} adapter holds "
                             "once for all its modules")
        fields = {f: _layers(np.asarray(jax.device_get(getattr(n, f))), lead) for f in codec.fields}
        for i, m in enumerate(mods):
            for key in codec.keys:
                t = key.encode(*[fields[f][i] for f in key.fields])
                tensors[f"{PREFIX}{m}.{key.suffix}"] = np.ascontiguousarray(np.asarray(t).astype(key.dtype))
            modules.append(m)
    head = {"peft_type": codec.peft_type, "base_model_name_or_path": base, "task_type": None, "inference_mode": True,
            "target_modules": "(" + "|".join(re.escape(m) for m in modules) + ")", "modules_to_save": None,
            "revision": None}
    if "fan_in_fan_out" in codec.reads:
        head["fan_in_fan_out"] = conv1d
    return head | (config or {}), tensors


def _is_embedding(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ("embed", "wte", "word_embeddings")


def _adapter_nodes(tree: Any) -> list[tuple[str, Node]]:
    return [(p, n) for p, n in leaves_with_paths(tree, nodes_are_leaves=True) if isinstance(n, Node)
            and not isinstance(n, QuantizedNode)]


def save_peft(out_dir: str | os.PathLike, model: Any, tree: Any, *, base_model: str | None = None,
              rank: int | None = None, initial: Any = None, variant: str | None = None,
              modules_to_save: list[str] | None = None, base: Any = None, init: str | None = None,
              overwrite: bool = False) -> Path:
    """Write the adapters of ``tree`` (the adapted params) as a PEFT adapter directory.

    ``rank``: DyLoRA's rank to export. ``initial``: the adapted tree at initialization, for PiSSA and
    OLoRA (its A₀, B₀: PEFT's conversion to plain LoRA on the original base); without it, ``init``
    (``"pissa"``/``"olora"``) writes the adapter as PEFT saves one unconverted: PEFT recomputes the
    residual base W − s·A₀B₀ from the original base when it loads it. ``variant``: the training
    variant where the tree alone does not tell (``"delta_lora"`` is refused: it changed W).
    ``modules_to_save``: paths of plain leaves that were trained too (a classification head, biases,
    norms); ``base``: the params the adapters were made over, so that every plain leaf that differs
    from it is written too (what ``load_peft`` read besides adapters). Biases are written as PEFT's
    bias tensors (``bias: all``; ``base_layer.bias`` inside adapted modules), a few changed rows of an
    embedding as ``trainable_token_indices``, anything else as ``modules_to_save`` (whole modules, each
    layer's for stacked leaves, torch layout). Multi-task trees write one adapter per task in
    ``out_dir/task_<k>``; trees of many adapters (``lv.adapters``) one per adapter in ``out_dir/<name>``.
    """
    if variant == "delta_lora":
        raise ValueError("Delta-LoRA changes the frozen base weights, which a PEFT adapter cannot carry: "
                         "export the merged model instead (save_merged / --format merged)")
    tree = resolve_shared(tree)
    nodes = _adapter_nodes(tree)
    if not nodes:
        raise ValueError("save_peft: the tree has no adapter nodes")
    many = next((n.names for _, n in nodes if isinstance(n, MultiAdapterNode)), None)
    if many:  # many adapters trained together: one PEFT adapter each, by name

        def write_each(tmp: Path) -> None:
            for name in many:
                save_peft(tmp / name, model, pick(tree, name), base_model=base_model, modules_to_save=modules_to_save,
                          base=base, overwrite=True)

        return atomic_dir(out_dir, overwrite, write_each)
    n_tasks = max(getattr(n, "n_tasks", 0) for _, n in nodes)
    if n_tasks:  # several adapters in one tree: one PEFT adapter each

        def write_all(tmp: Path) -> None:
            for k in range(n_tasks):
                save_peft(tmp / f"task_{k}", model, as_lora(tree, task=k), base_model=base_model,
                          modules_to_save=modules_to_save, base=base, overwrite=True)

        return atomic_dir(out_dir, overwrite, write_all)
    tree = as_lora(tree, rank=rank)  # every variant that reduces to LoRA, as LoRA
    nodes = _adapter_nodes(tree)
    init_nodes = dict(_adapter_nodes(initial)) if initial is not None else None
    config, tensors = _peft_dict(model, nodes, base=base_model, initial=init_nodes)
    if init in ("pissa", "olora") and initial is None:
        config["init_lora_weights"] = init
    elif init not in (None, "kaiming", "gaussian"):
        raise ValueError(f"save_peft: init={init!r}; expected 'pissa' or 'olora' (or None)")
    if getattr(model, "task", None) == "sequence_classification":
        config["task_type"] = "SEQ_CLS"
    changed = list(modules_to_save or []) + (_changed_leaves(tree, base) if base is not None else [])
    if changed:
        saved, extra = _plain_tensors(model, tree, list(dict.fromkeys(changed)), base)
        tensors |= {PREFIX + k: v for k, v in saved.items()}
        config |= extra

    def write(tmp: Path) -> None:
        write_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return atomic_dir(out_dir, overwrite, write)


def _changed_leaves(tree: Any, base: Any) -> list[str]:
    """Paths of the plain leaves of ``tree`` whose values differ from ``base``'s."""
    before = dict(leaves_with_paths(base, nodes_are_leaves=True))
    out = []
    for path, x in leaves_with_paths(tree, nodes_are_leaves=True):
        if path == "lm_head" and path not in before and not isinstance(x, Node):
            out.append(path)  # a head untied from the embedding: saved whole, as PEFT's modules_to_save does
            continue
        if isinstance(x, Node) or path not in before or isinstance(before[path], Node):
            continue
        if not np.array_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(before[path]))):
            out.append(path)
    return out


def _plain_tensors(model: Any, tree: Any, paths: list[str], base: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """HF tensors (torch layout) and config fields for the plain leaves at ``paths``."""
    leaves = dict(leaves_with_paths(tree, nodes_are_leaves=True))
    table = names.table(model, names.default_prefix(model), untied_head=names.untied_head(model, leaves))
    before = dict(leaves_with_paths(base, nodes_are_leaves=True)) if base is not None else {}
    adapted = {table[p][0].rsplit(".", 1)[0] for p, x in leaves.items() if isinstance(x, Node) and p in table}
    out: dict[str, np.ndarray] = {}
    extra: dict[str, Any] = {}
    whole: set[str] = set()
    for path in paths:
        if path not in table or path not in leaves:
            raise ValueError(f"modules_to_save: {path!r} is not a weight of {model.config.model_type}")
        if isinstance(leaves[path], Node):
            raise ValueError(f"modules_to_save: {path!r} is adapted; only plain trained leaves can be saved whole")
        template, kind = table[path]
        x = _np(leaves[path])
        layers = [(template.format(i=i), x[i]) for i in range(x.shape[0])] if "{i}" in template else [(template, x)]
        module = template.rsplit(".", 1)[0]
        if template.endswith(".bias"):
            for name, v in layers:
                mod = name.rsplit(".", 1)[0]
                out[f"{mod}.base_layer.bias" if module in adapted else name] = v
            extra["bias"] = "all"
            continue
        if module in adapted:
            raise ValueError(f"modules_to_save: {path!r} belongs to an adapted module; PEFT cannot save it whole")
        rows = _changed_rows(x, before.get(path)) if "{i}" not in template else None
        if rows is not None and kind == "plain" and path.rsplit("/", 1)[-1] in ("embed", "wte", "word_embeddings"):
            out[f"{module}.token_adapter.trainable_tokens_delta"] = x[rows]
            extra["trainable_token_indices"] = {module.rsplit(".", 1)[-1]: [int(i) for i in rows]}
            continue
        for name, v in layers:
            out[name] = v.T.copy() if kind == "linear" else v
        whole.add(module)
    # PEFT replaces whole modules: a weight's bias (and vice versa) must come along.
    for path, (template, kind) in table.items():
        module = template.rsplit(".", 1)[0]
        if module in whole and template.format(i=0) not in out and template not in out:
            x = _np(leaves[path])
            for name, v in ([(template.format(i=i), x[i]) for i in range(x.shape[0])] if "{i}" in template
                            else [(template, x)]):
                out[name] = v.T.copy() if kind == "linear" else v
    if whole:
        per_layer = {re.compile(re.escape(m).replace(r"\{i\}", r"\d+")) for m in whole}
        extra["modules_to_save"] = sorted({n.rsplit(".", 1)[0] for n in out
                                           if any(rx.fullmatch(n.rsplit(".", 1)[0]) for rx in per_layer)})
    return out, extra


def _changed_rows(x: np.ndarray, before: Any) -> np.ndarray | None:
    """Rows of an embedding that differ from ``before``, when they are a few (trainable tokens)."""
    if before is None or isinstance(before, Node):
        return None
    rows = np.flatnonzero(np.any(x != _np(before), axis=-1))
    return rows if 0 < len(rows) <= max(1, x.shape[0] // 4) else None
