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
Every format is a codec (``lorax_variants.codec``) declared in its variant's module (LoRA/DoRA, VeRA,
AdaLoRA, HiRA, MiSS, SHiRA): its key table and config fields, or its ``write`` hook, and the same table
``load_peft`` reads; this module names no variant (formats whose PEFT layer wraps ``nn.Linear`` only are
refused on GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lorax_variants.codec import PREFIX, PeftCodec, Site, codec_of, layers, peft_alpha, peft_types
from lorax_variants.hf import names
from lorax_variants.hf.peft_experts import EXPERT_FORMS, export_experts, is_expert_path, per_expert
from lorax_variants.hf.safetensors_io import atomic_dir, write_safetensors
from lorax_variants.nodes.base import Node
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.ops import adapter_names_in, as_lora, one_adapter
from lorax_variants.recipes import INITS, RECIPES
from lorax_variants.shared import resolve_shared
from lorax_variants.tree import leaves_with_paths

__all__ = ["save_peft", "module_names"]


def module_names(model: Any) -> dict[str, tuple[str, str]]:
    """Our weight path -> (HF module name template with ``{i}``, kind), for adaptable weights."""
    out = {}
    for path, (template, kind) in names.table(model, names.default_prefix(model)).items():
        if template.endswith(".weight"):
            out[path] = (template[: -len(".weight")], kind)
    return out


def _np(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


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
               initial: dict[str, Node] | None, experts_form: str = "fused") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    experts = {p: n for p, n in nodes if is_expert_path(p)}
    if experts and experts_form == "fused":  # expert banks: PEFT's target_parameters form (LoRA only)
        expert_tensors, expert_config = export_experts(model, experts)
        nodes = [(p, n) for p, n in nodes if not is_expert_path(p)]
        if not nodes:
            first = next(iter(experts.values()))
            config = _config("LORA", [], base, False, r=first.lora_a.shape[-1],
                             lora_alpha=peft_alpha(first.scale, first.lora_a.shape[-1]), use_rslora=False,
                             use_dora=False, lora_dropout=0.0, bias="none", init_lora_weights=True)
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
    codecs = {codec_of(n) for _, n in nodes}
    if None in codecs or len(codecs) > 1:
        kinds = sorted({type(n).__name__ for _, n in nodes if codec_of(n) is None} or {type(n).__name__ for _, n in nodes})
        raise ValueError(f"save_peft writes the PEFT formats {', '.join(peft_types())} (and what reduces to LoRA), one "
                         f"format per adapter; {' and '.join(kinds)}{' in one adapter' if len(kinds) > 1 else ''} has "
                         "no PEFT writer here: export the merged model (save_merged / --format merged)")
    return _codec_dict(model, nodes, codecs.pop(), base, model.config.model_type == "gpt2", initial or {})


def _codec_dict(model: Any, nodes: list[tuple[str, Node]], codec: PeftCodec, base: str | None,
                conv1d: bool, initial: dict[str, Node]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An adapter in its codec's format: the codec's ``write`` hook, or its key table per module and its
    config fields."""
    if conv1d and not codec.conv1d:
        raise ValueError(f"save_peft: PEFT's {codec.peft_type} layers wrap nn.Linear only, not GPT-2's Conv1D "
                         f"({nodes[0][0]}): export the merged model (save_merged / --format merged)")
    sites = []
    for path, n in nodes:
        if is_expert_path(path):  # per-expert modules (the fused form never comes here); LoRA nodes only
            flat, modules = per_expert(path, n, module_names(model)[path][0])
            sites.append(Site(path, modules, flat, 1))
            continue
        lead = len(n.shape) - 2
        sites.append(Site(path, tuple(_module_list(model, path, n.shape[0] if lead else 1)), n, lead,
                          _is_embedding(path), initial.get(path)))
    modules = [m for s in sites for m in s.modules]
    if codec.write is not None:
        config, tensors = codec.write(sites, conv1d)
    else:
        tensors, config, first = {}, None, ""
        for s in sites:
            own = codec.config(s.node)
            if config is None:
                config, first = own, s.path
            elif own != config:
                diff = sorted(k for k in own.keys() | config.keys() if own.get(k) != config.get(k))
                raise ValueError(f"save_peft: {s.path} and {first} differ in {diff}, which a {codec.peft_type} adapter "
                                 "holds once for all its modules")
            fields = {f: layers(getattr(s.node, f), s.lead) for f in codec.fields}
            for i, m in enumerate(s.modules):
                for key in codec.keys:
                    t = key.encode(*[fields[f][i] for f in key.fields])
                    tensors[f"{PREFIX}{m}.{key.suffix}"] = np.ascontiguousarray(np.asarray(t).astype(key.dtype))
    targets: Any = "(" + "|".join(re.escape(m) for m in modules) + ")"
    if any(is_expert_path(s.path) for s in sites):
        # per-expert (vLLM's layout): the modules' names, as vLLM reads target_modules and as PEFT's conversion of
        # per-expert adapters for transformers 5's fused experts recognizes them; a module named here without
        # tensors in the file keeps PEFT's zero initial product
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    head = {"peft_type": codec.peft_type, "base_model_name_or_path": base, "task_type": None, "inference_mode": True,
            "target_modules": targets, "modules_to_save": None, "revision": None}
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
              experts: str = "fused", overwrite: bool = False) -> Path:
    """Write the adapters of ``tree`` (the adapted params) as a PEFT adapter directory.

    ``rank``: DyLoRA's rank to export. ``initial``: the adapted tree at initialization, for PiSSA and
    OLoRA (its A₀, B₀: PEFT's conversion to plain LoRA on the original base); without it, ``init``
    (an init PEFT re-runs on the base: ``"pissa"``, ``"olora"``) writes the adapter as PEFT saves one unconverted: PEFT recomputes the
    residual base W − s·A₀B₀ from the original base when it loads it. ``variant``: the training
    variant where the tree alone does not tell (one whose recipe ``moves_base``, Delta-LoRA, is refused: it
    changed W).
    ``modules_to_save``: paths of plain leaves that were trained too (a classification head, biases,
    norms); ``base``: the params the adapters were made over, so that every plain leaf that differs
    from it is written too (what ``load_peft`` read besides adapters). Biases are written as PEFT's
    bias tensors (``bias: all``; ``base_layer.bias`` inside adapted modules), a few changed rows of an
    embedding as ``trainable_token_indices``, anything else as ``modules_to_save`` (whole modules, each
    layer's for stacked leaves, torch layout). Multi-task trees write one adapter per task in
    ``out_dir/task_<k>``; trees of many adapters (``lv.adapters``) one per adapter in ``out_dir/<name>``.
    ``experts``: how adapters on mixture-of-experts banks are written: ``"fused"``, PEFT's ``target_parameters``
    on transformers' stacked expert parameters, or ``"per_expert"``, one LoRA module per layer, expert and
    projection (``...experts.<e>.gate_proj.lora_A.weight``, vLLM's MoE LoRA layout); ``load_peft`` reads both.
    """
    if experts not in EXPERT_FORMS:
        raise ValueError(f"save_peft: experts={experts!r}; expected one of {EXPERT_FORMS}")
    if variant is not None and variant in RECIPES and RECIPES[variant].moves_base:
        raise ValueError(f"{variant} changes the frozen base weights, which a PEFT adapter cannot carry: "
                         "export the merged model instead (save_merged / --format merged)")
    tree = resolve_shared(tree)
    nodes = _adapter_nodes(tree)
    if not nodes:
        raise ValueError("save_peft: the tree has no adapter nodes")
    names_of_many = adapter_names_in(tree)
    if names_of_many:  # many adapters trained together: one PEFT adapter each, by name

        def write_each(tmp: Path) -> None:
            for name in names_of_many:
                save_peft(tmp / name, model, one_adapter(tree, name), base_model=base_model, modules_to_save=modules_to_save,
                          base=base, experts=experts, overwrite=True)

        return atomic_dir(out_dir, overwrite, write_each)
    n_tasks = max(getattr(n, "n_tasks", 0) for _, n in nodes)
    if n_tasks:  # several adapters in one tree: one PEFT adapter each

        def write_all(tmp: Path) -> None:
            for k in range(n_tasks):
                save_peft(tmp / f"task_{k}", model, as_lora(tree, task=k), base_model=base_model,
                          modules_to_save=modules_to_save, base=base, experts=experts, overwrite=True)

        return atomic_dir(out_dir, overwrite, write_all)
    tree = as_lora(tree, rank=rank)  # every variant that reduces to LoRA, as LoRA
    nodes = _adapter_nodes(tree)
    init_nodes = dict(_adapter_nodes(initial)) if initial is not None else None
    config, tensors = _peft_dict(model, nodes, base=base_model, initial=init_nodes, experts_form=experts)
    reruns = sorted(n for n, r in INITS.items() if r.peft_reruns)
    if init is not None and (init not in INITS or INITS[init].moves_base and not INITS[init].peft_reruns):
        raise ValueError(f"save_peft: init={init!r}; expected one PEFT re-runs on the base ({', '.join(reruns)}), "
                         "an init that keeps the base, or None; for any other pass initial=<the tree at init>")
    if init in reruns and initial is None:
        config["init_lora_weights"] = init
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
