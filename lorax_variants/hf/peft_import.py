"""``load_peft``: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) as our
adapted tree over a model's params, in the format of every variant that declares a PEFT codec
(``lorax_variants.codec``, in the variant's module): LoRA (rsLoRA, DoRA incl. on embeddings), AdaLoRA at any
stage of its rank schedule, VeRA with or without saved projections, HiRA, MiSS in all its forms, SHiRA with
its saved indices; read through the codec's key table and hooks (a layer without tensors keeps the fresh
adapter, equal to the base). This module names no variant.

Every tensor in the file is placed or the load fails naming it; every config field either holds a value
we represent or the load fails naming the field. What PEFT writes, and where it goes here:

- ``<module>.lora_A.weight [r, in]`` / ``lora_B.weight [out, r]`` (``lora_embedding_A/B`` on embeddings,
  ``lora_magnitude_vector`` with ``use_dora``): the factors of that layer of our stacked node. Modules of
  one weight path with smaller ranks are zero-padded to the path's largest; per-module scales (``alpha /
  r``, ``alpha / √r`` with ``use_rslora``, ``rank_pattern``/``alpha_pattern``) that differ from the
  node's go into B. Layers without tensors (``layers_to_transform``) get zero adapters (DoRA: m = ‖W‖).
- AdaLoRA ``lora_A/E/B`` truncated to the kept triplets, with ``rank_pattern`` masks (keys with or without
  the adapter name, as PEFT writes them after or before saving); before any allocation
  (``rank_pattern: null``) every triplet is kept. Scale ``alpha / (init_r + 1e-5)`` as PEFT's.
- VeRA ``vera_lambda_d/b`` and ``base_model.vera_A/B``; without ``save_projection`` the projections are
  regenerated exactly as PEFT does (kaiming-uniform from a ``torch.Generator`` seeded with
  ``projection_prng_key``: MT19937, reproduced here with numpy, no torch needed).
- Base changes: ``modules_to_save`` (``<module>.weight``; ``lm_head`` of a model with a tied head becomes a
  head of its own, ``lm_head``, as PEFT unties it on load), biases (``bias: all | lora_only``:
  ``<module>.bias``, ``<module>.base_layer.bias``), ``<module>.base_layer.weight`` (embeddings saved with
  their adapter), ``trainable_token_indices`` (``token_adapter.trainable_tokens_delta``: the new rows):
  written into the params before adapting.
- ``init_lora_weights``: PEFT re-runs ``pissa``/``olora`` on the base when it loads such an adapter
  (the base becomes W − s·A₀B₀), so we do the same; PEFT's conversion to plain LoRA
  (``path_initial_model_for_weight_conversion``) loads as LoRA. Inits whose residual cannot be recomputed
  from the base alone (``pissa_niter_*``, ``corda``, ``loftq``, ``lora_ga``) are refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.adapt import adapt
from lorax_variants.codec import PREFIX, Refusal, Site, codec_for, codec_of, fill_by_keys, peft_types
from lorax_variants.hf import names
from lorax_variants.hf.peft_experts import check_target_parameters, from_per_expert, import_experts, is_expert_path
from lorax_variants.hf.safetensors_io import SafetensorsFile
from lorax_variants.nodes.base import Node
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.spec import AdapterSpec
from lorax_variants.tree import leaves_with_paths, map_with_paths

__all__ = ["load_peft", "conform"]

# Fields that do not change what the saved tensors mean (or that other fields and the tensors settle).
BENIGN = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
          "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
          "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
          "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices",
          "loftq_config", "eva_config", "corda_config", "lora_ga_config", "use_dora", "runtime_config",
          "ensure_weight_tying", "qalora_group_size", "projection_prng_key", "save_projection", "vera_dropout",
          "d_initial", "init_weights", "target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
          "orth_reg_weight", "total_step", "target_parameters"}
UNSUPPORTED = {  # field -> what it means, refused when set
    "layer_replication": "layers duplicated by PEFT (layer_replication)",
    "lora_bias": "a trainable bias on lora_B (lora_bias)",
    "use_qalora": "QA-LoRA's pooled adapter input (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)", "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)", "kasa_config": "KaSA (kasa_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}


def _refuse(cfg_path: Path, field: str, why: str) -> None:
    raise ValueError(f"{cfg_path}: {field}: {why}; this adapter cannot be represented here")


def _check_config(cfg: dict[str, Any], cfg_path: Path) -> str | None:
    """Refuse any field we cannot represent; returns the residual init to redo (``pissa``/``olora``) or None."""
    ptype = cfg.get("peft_type")
    codec = codec_for(ptype)
    if codec is None:
        _refuse(cfg_path, "peft_type", f"{ptype!r} is not one of {', '.join(peft_types())}")
    for field, what in UNSUPPORTED.items():
        if cfg.get(field) not in (None, False, [], {}, ""):
            _refuse(cfg_path, field, f"{what} is not supported")
    unknown = sorted(k for k, v in cfg.items() if k not in BENIGN | codec.reads and k not in UNSUPPORTED
                     and v not in (None, False, [], {}, ""))
    if unknown:
        _refuse(cfg_path, unknown[0], f"unknown field (set to {cfg[unknown[0]]!r}) that may change the adapter")
    if codec.residual is None:
        return None
    try:
        return codec.residual(cfg)
    except Refusal as e:
        _refuse(cfg_path, e.field, e.why)
    return None


def _matcher(templates: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    """(compiled HF-name regex, our path) for templates with ``{i}`` for the layer (and ``{e}`` for the expert)."""
    return [(re.compile(re.escape(t).replace(r"\{i\}", r"(\d+)").replace(r"\{e\}", r"(\d+)")), p)
            for p, t in templates.items()]


def _locate(name: str, matchers: list[tuple[re.Pattern, str]], experts: int = 0) -> tuple[str, int | None] | None:
    """Our path and the stacked index of an HF name (an expert's module: layer · ``experts`` + expert)."""
    for rx, path in matchers:
        m = rx.fullmatch(name)
        if m:
            idx = [int(g) for g in m.groups()]
            if len(idx) == 2 and idx[1] >= experts:
                return None  # an expert this model does not have
            return path, (idx[0] * experts + idx[1] if len(idx) == 2 else idx[0] if idx else None)
    return None


def _read(d: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], Path]:
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{d}: no adapter_model.safetensors (only safetensors adapters are read)")
    st = SafetensorsFile(weights)
    def value(k: str) -> np.ndarray:  # floats as float32, integer tensors (indices) as they are
        v = np.asarray(st.get(k))
        return v if np.issubdtype(v.dtype, np.integer) else v.astype(np.float32)

    return cfg, {k: value(k) for k in st.keys()}, cfg_path


def load_peft(adapter_dir: str | os.PathLike, model: Any, params: Any, key: Any = 0, *, like: Any = None) -> Any:
    """A PEFT adapter directory -> our adapted tree over ``params`` (see the module docstring).

    Anything that does not fit ``model`` (a module it lacks, a shape that differs) or that we cannot
    represent (a config field, a tensor) is an error naming it; never a silently different model.

    ``like``: an adapted tree to take the place of (hot-swapping). The result has ``like``'s structure:
    the same adapted paths, ranks (smaller ones zero-padded) and scales (a different ``alpha / r`` goes
    into B), so a step or ``generate`` jitted for ``like`` runs it without compiling again."""
    d = Path(adapter_dir)
    cfg, tensors, cfg_path = _read(d)
    residual_init = _check_config(cfg, cfg_path)
    check_target_parameters(cfg, model, cfg_path)
    experts, expert_keys = import_experts(cfg, tensors, model, cfg_path)
    ptype = cfg["peft_type"]
    codec = codec_for(ptype)
    suffixes = codec.suffixes
    prefix = names.default_prefix(model)
    # our path -> (HF tensor name, kind); a tied model's head too: PEFT unties it for modules_to_save
    table = names.table(model, prefix, untied_head=names.untied_head(model, ["lm_head"]))
    weights = {p: t[: -len(".weight")] for p, (t, _) in table.items() if t.endswith(".weight")}
    module_of, tensor_of = _matcher(weights), _matcher({p: t for p, (t, _) in table.items()})
    kinds = {p: k for p, (_, k) in table.items()}
    n_experts = model.config.moe.num_experts if getattr(model.config, "moe", None) is not None else 0
    found: dict[str, dict[int, str]] = {}  # our path -> layer -> HF module
    base: dict[str, dict[int | None, np.ndarray]] = {}  # our path -> layer -> new value (torch layout)
    tokens: dict[str, tuple[str, np.ndarray]] = {}  # our path -> (module, rows)
    for k, v in tensors.items():
        if k in codec.shared or k in expert_keys:
            continue
        if not k.startswith(PREFIX):
            raise ValueError(f"{d}: tensor {k!r} is not under {PREFIX!r}; not a PEFT adapter tensor")
        name = k[len(PREFIX):]
        for suffix, field, why in codec.refused:
            if name.endswith(suffix):
                _refuse(cfg_path, field, f"tensor {k!r} is {why}")
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is not None:
            hit = _locate(name[: -len(suffix)], module_of, n_experts)
            if hit is None:
                raise ValueError(f"{cfg_path}: adapter tensor {k!r} names module {name[: -len(suffix)]!r}, which "
                                 f"{model.config.model_type} does not have (an adapter for a different base model?)")
            found.setdefault(hit[0], {})[hit[1] or 0] = name[: -len(suffix)]
            continue
        if name.endswith(".token_adapter.trainable_tokens_delta"):
            module = name[: -len(".token_adapter.trainable_tokens_delta")]
            hit = _locate(module, module_of)
            if hit is None or kinds[hit[0]] != "plain" or v.ndim != 2:
                raise ValueError(f"{cfg_path}: trainable tokens {k!r} for {module!r}, not an embedding of this model")
            tokens[hit[0]] = (module, v)
            continue
        plain = re.sub(r"\.(base_layer|modules_to_save(\.[^.]+)?)\.(weight|bias)$", r".\3", name)
        hit = _locate(plain, tensor_of)
        if hit is None:
            raise ValueError(f"{cfg_path}: tensor {k!r} is neither an adapter tensor nor a weight of "
                             f"{model.config.model_type} ({plain!r}); cannot place it")
        base.setdefault(hit[0], {})[hit[1]] = v
    if not found and not experts:
        raise ValueError(f"{d}: no {ptype} adapter tensors found")
    per_expert_paths = [p for p in found if is_expert_path(p)]
    if per_expert_paths and (ptype != "LORA" or cfg.get("use_dora")):
        _refuse(cfg_path, "use_dora" if cfg.get("use_dora") else "peft_type",
                f"per-expert {ptype}{' (DoRA)' if cfg.get('use_dora') else ''} adapters on {per_expert_paths[0]}: "
                "expert banks take LoRA only")
    params = _with_base_changes(params, base, tokens, kinds, cfg, d)
    shapes = dict(leaves_with_paths(params, nodes_are_leaves=True))
    try:
        if codec.read is not None:
            kw, ctx = codec.read(cfg, found, tensors, {p: (a.shape[-1], s) for p, (a, _, s) in experts.items()},
                                 residual_init)
        else:
            kw, ctx = codec.spec(cfg), None
    except Refusal as e:
        _refuse(cfg_path, e.field, e.why)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    spec = AdapterSpec(targets=tuple(re.escape(p) for p in [*found, *experts]), stacked=model.stacked, **kw)
    adapted = adapt(params, spec, jax.random.key(key) if isinstance(key, int) else key)

    def fill(path: str, n: Any) -> Any:
        if path in experts:
            a, b, _ = experts[path]
            return n.replace(lora_a=jnp.asarray(a, n.lora_a.dtype), lora_b=jnp.asarray(b, n.lora_b.dtype))
        if path not in found:
            return n
        if is_expert_path(path):  # per-expert modules: the bank's [L, E] axes as one
            L, E = shapes[path].shape[:2]
            modules = tuple(found[path].get(i) for i in range(L * E))
            return from_per_expert(n, lambda flat: codec.fill(flat, Site(path, modules, flat, 1), tensors, cfg, ctx))
        lead = len(shapes[path].shape) - 2
        count = shapes[path].shape[0] if lead else 1
        site = Site(path, tuple(found[path].get(i) for i in range(count)), n, lead)
        if residual_init is not None and None in site.modules:
            _refuse(cfg_path, "layers_to_transform", f"{residual_init} on only some layers of {path}")
        try:
            return codec.fill(n, site, tensors, cfg, ctx) if codec.fill is not None else \
                fill_by_keys(n, codec, site, tensors)
        except ValueError as e:
            raise ValueError(f"{d}: {e}") from None

    out = map_with_paths(fill, adapted, nodes_are_leaves=True)
    if codec.finish is not None:
        try:
            out = codec.finish(out, cfg, tensors)
        except ValueError as e:
            raise ValueError(f"{d}: {e}") from None
    return out if like is None else conform(out, like)


def conform(tree: Any, like: Any) -> Any:
    """``tree``'s LoRA/DoRA adapters in ``like``'s structure: ``like``'s rank per node (zero-padded) and
    its scale (the ratio folded into B), over ``tree``'s frozen weights; the function is unchanged."""
    mine = dict(leaves_with_paths(tree, nodes_are_leaves=True))
    theirs = dict(leaves_with_paths(like, nodes_are_leaves=True))
    lora = codec_for("LORA")  # the nodes written in PEFT's LoRA format (LoRA and DoRA)
    adapted = lambda t: {p for p, n in t.items() if isinstance(n, Node) and not isinstance(n, QuantizedNode)}  # noqa: E731
    if adapted(mine) != adapted(theirs):
        raise ValueError(f"hot-swap: the adapter adapts {sorted(adapted(mine))}, the tree it replaces "
                         f"{sorted(adapted(theirs))}")

    def one(path: str, n: Any) -> Any:
        if path not in theirs or not isinstance(n, Node) or isinstance(n, QuantizedNode):
            return n
        t = theirs[path]
        if type(n) is not type(t) or codec_of(n) is not lora:
            raise ValueError(f"hot-swap: {path} is a {type(n).__name__} here and a {type(t).__name__} in the tree "
                             "it replaces (only LoRA and DoRA adapters are conformed)")
        r, r_to = n.lora_a.shape[-1], t.lora_a.shape[-1]
        if r > r_to:
            raise ValueError(f"hot-swap: {path} has rank {r}, more than the {r_to} of the tree it replaces")
        pad = [(0, 0)] * (n.lora_a.ndim - 1) + [(0, r_to - r)]
        a = jnp.pad(n.lora_a, pad).astype(t.lora_a.dtype)
        b = jnp.pad(n.lora_b * (n.scale / t.scale), pad[:-2] + [(0, r_to - r), (0, 0)]).astype(t.lora_b.dtype)
        out = n.replace(lora_a=a, lora_b=b, scale=t.scale, dropout=t.dropout, freeze=t.freeze)
        return out.replace(magnitude=n.magnitude.astype(t.magnitude.dtype)) if hasattr(n, "magnitude") else out

    return map_with_paths(one, tree, nodes_are_leaves=True)


def _with_base_changes(params: Any, base: dict[str, dict[int | None, np.ndarray]],
                       tokens: dict[str, tuple[str, np.ndarray]], kinds: dict[str, str], cfg: dict[str, Any],
                       d: Path) -> Any:
    """``params`` with the saved whole modules, biases and token rows written in (our layout)."""
    if "lm_head" in base and "lm_head" not in dict(leaves_with_paths(params, nodes_are_leaves=True)):
        # modules_to_save=["lm_head"] over a tied head: PEFT's saved copy is a head of its own (untied on
        # load, as PEFT does); ZooModel.head reads it instead of the embedding
        if cfg.get("ensure_weight_tying") and "embed" in base:
            raise ValueError(f"{d}: ensure_weight_tying: the adapter saves both the embedding and the head of a model "
                             "that ties them; only one of them (or ensure_weight_tying=false) can be loaded")
        (v,) = base["lm_head"].values()
        if v.shape != tuple(params["embed"].shape):
            raise ValueError(f"{d}: saved lm_head has shape {v.shape}; this model's embedding is "
                             f"{tuple(params['embed'].shape)}")
        params = {**params, "lm_head": jnp.asarray(v.T, params["embed"].dtype)}
        base = {k: v for k, v in base.items() if k != "lm_head"}

    def change(path: str, leaf: Any) -> Any:
        if path not in base and path not in tokens:
            return leaf
        if isinstance(leaf, Node):
            raise ValueError(f"{d}: the adapter replaces {path}, which is already a {type(leaf).__name__} here "
                             "(load the adapter over the unquantized params)")
        x = np.array(jax.device_get(leaf), np.float32)
        for layer, v in base.get(path, {}).items():
            v = v.T if kinds[path] == "linear" else v
            target = x if layer is None else x[layer]
            if v.shape != target.shape:
                raise ValueError(f"{d}: saved {path} (layer {layer}) has shape {v.shape}; this model's is {target.shape}")
            target[...] = v
        if path in tokens:
            module, rows = tokens[path]
            idx = _token_indices(cfg, module, d)
            if rows.shape != (len(idx), x.shape[-1]) or max(idx) >= x.shape[0] or min(idx) < 0:
                raise ValueError(f"{d}: trainable_token_indices {idx[:8]} and their rows {rows.shape} do not fit "
                                 f"{path} {x.shape}")
            x[np.asarray(idx)] = rows
        return jnp.asarray(x, leaf.dtype)

    return map_with_paths(change, params, nodes_are_leaves=True)


def _token_indices(cfg: dict[str, Any], module: str, d: Path) -> list[int]:
    idx = cfg.get("trainable_token_indices")
    if isinstance(idx, dict):
        hits = [v for k, v in idx.items() if module == k or module.endswith("." + k)]
        idx = hits[0] if hits else None
    if not isinstance(idx, list) or not idx:
        raise ValueError(f"{d}: a trainable-tokens tensor for {module!r} but no trainable_token_indices for it")
    return [int(i) for i in idx]
