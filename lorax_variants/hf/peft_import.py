"""``load_peft``: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) as our
adapted tree over a model's params: LoRA (rsLoRA, DoRA incl. on embeddings), AdaLoRA at any stage of its
rank schedule, VeRA with or without saved projections, and the format of every variant that declares a PEFT
codec (``lorax_variants.codec``; HiRA, MiSS in all its forms, SHiRA with its saved indices), read through the
codec's key table (a layer without tensors keeps the fresh adapter, equal to the base).

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
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.codec import PeftCodec, codec_for, peft_types
from lorax_variants.hf import names
from lorax_variants.hf.peft_experts import check_target_parameters, import_experts
from lorax_variants.hf.safetensors_io import SafetensorsFile
from lorax_variants.variants.adalora import AdaLoraNode
from lorax_variants.nodes.base import Node
from lorax_variants.variants.dora import DoraNode
from lorax_variants.variants.lora import LoraNode
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.variants.vera import Vera, VeraNode
from lorax_variants.shared import Shared
from lorax_variants.tree import leaves_with_paths, map_with_paths
from lorax_variants.adapt import adapt
from lorax_variants.spec import AdapterSpec

__all__ = ["load_peft", "conform", "vera_projections"]

PREFIX = "base_model.model."
SUFFIXES = {  # adapter tensors, by PEFT type: suffix -> our name
    "LORA": {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_embedding_A": "a", ".lora_embedding_B": "b",
             ".lora_magnitude_vector": "m", ".lora_magnitude_vector.weight": "m"},
    "ADALORA": {".lora_A": "a", ".lora_B": "b", ".lora_E": "e"},
    "VERA": {".vera_lambda_d": "d", ".vera_lambda_b": "lb"},
}
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
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")  # the base stays W


def _refuse(cfg_path: Path, field: str, why: str) -> None:
    raise ValueError(f"{cfg_path}: {field}: {why}; this adapter cannot be represented here")


def _check_config(cfg: dict[str, Any], cfg_path: Path) -> str | None:
    """Refuse any field we cannot represent; returns the residual init to redo (``pissa``/``olora``) or None."""
    ptype = cfg.get("peft_type")
    codec = codec_for(ptype)
    if ptype not in SUFFIXES and codec is None:
        _refuse(cfg_path, "peft_type", f"{ptype!r} is not one of LORA (incl. DoRA), ADALORA, VERA, "
                f"{', '.join(peft_types())}")
    for field, what in UNSUPPORTED.items():
        if cfg.get(field) not in (None, False, [], {}, ""):
            _refuse(cfg_path, field, f"{what} is not supported")
    known = BENIGN | (codec.reads if codec is not None else frozenset())
    unknown = sorted(k for k, v in cfg.items() if k not in known and k not in UNSUPPORTED
                     and v not in (None, False, [], {}, ""))
    if unknown:
        _refuse(cfg_path, unknown[0], f"unknown field (set to {cfg[unknown[0]]!r}) that may change the adapter")
    if codec is not None:
        return None
    init = cfg.get("init_lora_weights", True)
    if init in PLAIN_INITS or init is None:
        return None
    if init in ("pissa", "olora"):
        if cfg.get("use_dora") and init == "olora":
            _refuse(cfg_path, "init_lora_weights", "OLoRA with DoRA")
        return init
    if isinstance(init, str) and (init.startswith(("pissa_niter_", "corda")) or init in ("loftq", "lora_ga")):
        _refuse(cfg_path, "init_lora_weights", f"{init!r} left a residual base that cannot be recomputed from the "
                "base model alone; save the adapter with PEFT's path_initial_model_for_weight_conversion (plain LoRA)")
    _refuse(cfg_path, "init_lora_weights", f"unknown initialization {init!r}")
    return None


def _matcher(templates: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    """(compiled HF-name regex, our path) for templates with ``{i}`` for the layer."""
    return [(re.compile(re.escape(t).replace(r"\{i\}", r"(\d+)")), p) for p, t in templates.items()]


def _locate(name: str, matchers: list[tuple[re.Pattern, str]]) -> tuple[str, int | None] | None:
    for rx, path in matchers:
        m = rx.fullmatch(name)
        if m:
            return path, int(m.group(1)) if m.groups() else None
    return None


def vera_projections(r: int, d_in: int, d_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's VeRA projections in our layout ``(A [d_in, r], B [r, d_out])``, bit for bit.

    PEFT draws ``vera_A [r, d_in]`` then ``vera_B [d_out, r]`` with ``kaiming_uniform`` (gain √2, fan-in
    of the torch tensor) from ``torch.Generator().manual_seed(seed)``: MT19937 with the 32-bit seeding,
    each float32 from the low 24 bits of one 32-bit draw, ``u·(hi − lo) + lo`` in float64, then float32."""
    bits = np.random.MT19937()
    bits._legacy_seeding(seed & 0xFFFFFFFF)

    def kaiming(rows: int, cols: int) -> np.ndarray:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)
        lo, hi = np.float64(np.float32(-bound)), np.float64(np.float32(bound))
        raw = bits.random_raw(rows * cols).astype(np.uint64)
        u = (raw & np.uint64((1 << 24) - 1)).astype(np.float64) * 2.0 ** -24
        return (u * (hi - lo) + lo).astype(np.float32).reshape(rows, cols)

    a = kaiming(r, d_in)
    b = kaiming(d_out, r)
    return a.T.copy(), b.T.copy()


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
    suffixes = SUFFIXES.get(ptype) or {f".{k.suffix}": k.suffix for k in codec.keys}
    prefix = names.default_prefix(model)
    # our path -> (HF tensor name, kind); a tied model's head too: PEFT unties it for modules_to_save
    table = names.table(model, prefix, untied_head=names.untied_head(model, ["lm_head"]))
    weights = {p: t[: -len(".weight")] for p, (t, _) in table.items() if t.endswith(".weight")}
    module_of, tensor_of = _matcher(weights), _matcher({p: t for p, (t, _) in table.items()})
    kinds = {p: k for p, (_, k) in table.items()}
    found: dict[str, dict[int, str]] = {}  # our path -> layer -> HF module
    base: dict[str, dict[int | None, np.ndarray]] = {}  # our path -> layer -> new value (torch layout)
    tokens: dict[str, tuple[str, np.ndarray]] = {}  # our path -> (module, rows)
    for k, v in tensors.items():
        if (ptype == "VERA" and k in ("base_model.vera_A", "base_model.vera_B")) or k in expert_keys:
            continue
        if not k.startswith(PREFIX):
            raise ValueError(f"{d}: tensor {k!r} is not under {PREFIX!r}; not a PEFT adapter tensor")
        name = k[len(PREFIX):]
        if ptype == "LORA" and name.endswith(".lora_B.bias"):
            _refuse(cfg_path, "lora_bias", f"tensor {k!r} is a bias on lora_B")
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is not None:
            hit = _locate(name[: -len(suffix)], module_of)
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
    params = _with_base_changes(params, base, tokens, kinds, cfg, d)
    shapes = dict(leaves_with_paths(params, nodes_are_leaves=True))
    per_module = _module_scales(cfg, found, tensors, ptype, cfg_path)
    spec = _codec_spec(codec, cfg, found, model, cfg_path) if codec is not None else \
        _spec(cfg, found, per_module, model, residual_init, cfg_path, {p: (a.shape[-1], s) for p, (a, _, s) in experts.items()})
    adapted = adapt(params, spec, jax.random.key(key) if isinstance(key, int) else key)

    def fill(path: str, n: Any) -> Any:
        if path in experts:
            a, b, _ = experts[path]
            return n.replace(lora_a=jnp.asarray(a, n.lora_a.dtype), lora_b=jnp.asarray(b, n.lora_b.dtype))
        if path not in found:
            return n
        lead = len(shapes[path].shape) - 2
        count = shapes[path].shape[0] if lead else 1
        mods = [found[path].get(i) for i in range(count)]
        if residual_init is not None and None in mods:
            _refuse(cfg_path, "layers_to_transform", f"{residual_init} on only some layers of {path}")
        if codec is not None:
            return _fill_codec(n, codec, path, mods, tensors, lead, d)
        return _fill_node(n, path, mods, tensors, cfg, per_module, lead, d)

    out = map_with_paths(fill, adapted, nodes_are_leaves=True)
    if ptype == "VERA":
        out = _vera_projections(out, cfg, tensors, cfg_path)
    return out if like is None else conform(out, like)


def conform(tree: Any, like: Any) -> Any:
    """``tree``'s LoRA/DoRA adapters in ``like``'s structure: ``like``'s rank per node (zero-padded) and
    its scale (the ratio folded into B), over ``tree``'s frozen weights; the function is unchanged."""
    mine = dict(leaves_with_paths(tree, nodes_are_leaves=True))
    theirs = dict(leaves_with_paths(like, nodes_are_leaves=True))
    lora = (LoraNode, DoraNode)
    adapted = lambda t: {p for p, n in t.items() if isinstance(n, Node) and not isinstance(n, QuantizedNode)}  # noqa: E731
    if adapted(mine) != adapted(theirs):
        raise ValueError(f"hot-swap: the adapter adapts {sorted(adapted(mine))}, the tree it replaces "
                         f"{sorted(adapted(theirs))}")

    def one(path: str, n: Any) -> Any:
        if path not in theirs or not isinstance(n, Node) or isinstance(n, QuantizedNode):
            return n
        t = theirs[path]
        if type(n) is not type(t) or not isinstance(n, lora):
            raise ValueError(f"hot-swap: {path} is a {type(n).__name__} here and a {type(t).__name__} in the tree "
                             "it replaces (only LoRA and DoRA adapters are conformed)")
        r, r_to = n.lora_a.shape[-1], t.lora_a.shape[-1]
        if r > r_to:
            raise ValueError(f"hot-swap: {path} has rank {r}, more than the {r_to} of the tree it replaces")
        pad = [(0, 0)] * (n.lora_a.ndim - 1) + [(0, r_to - r)]
        a = jnp.pad(n.lora_a, pad).astype(t.lora_a.dtype)
        b = jnp.pad(n.lora_b * (n.scale / t.scale), pad[:-2] + [(0, r_to - r), (0, 0)]).astype(t.lora_b.dtype)
        out = n.replace(lora_a=a, lora_b=b, scale=t.scale, dropout=t.dropout, freeze=t.freeze)
        return out.replace(magnitude=n.magnitude.astype(t.magnitude.dtype)) if isinstance(n, DoraNode) else out

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


def _pattern_value(cfg: dict[str, Any], field: str, module: str, default: Any) -> Any:
    """PEFT's pattern lookup: a key matches a module name ending in it (as a regex)."""
    for key, v in (cfg.get(field) or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return v
    return default


def _module_scales(cfg: dict[str, Any], found: dict[str, dict[int, str]], tensors: dict[str, np.ndarray], ptype: str,
                   cfg_path: Path) -> dict[str, tuple[int, float]]:
    """HF module -> (its rank in the file, its scale as PEFT computes it)."""
    out = {}
    for mods in found.values():
        for m in mods.values():
            if ptype not in SUFFIXES:  # a registered codec's format: one rank, no scale
                out[m] = (int(cfg.get("r", 0)), 1.0)
                continue
            if ptype == "VERA":
                out[m] = (int(cfg.get("r", 256)), 1.0)
                continue
            key = f"{PREFIX}{m}.lora_A" + (".weight" if ptype == "LORA" else "")
            if key not in tensors:
                key = f"{PREFIX}{m}.lora_embedding_A"
            if key not in tensors:
                raise ValueError(f"{cfg_path.parent}: adapter tensor {PREFIX}{m}.lora_A is missing")
            k = tensors[key].shape[0]
            alpha = float(_pattern_value(cfg, "alpha_pattern", m, cfg.get("lora_alpha", 8)))
            if ptype == "ADALORA":
                r0 = int(cfg.get("init_r", 12))
                out[m] = (r0, (alpha if alpha > 0 else float(r0)) / (r0 + 1e-5))
            else:
                out[m] = (k, alpha / (math.sqrt(k) if cfg.get("use_rslora") else k) if k else 0.0)
    return out


def _spec(cfg: dict[str, Any], found: dict[str, dict[int, str]], per_module: dict[str, tuple[int, float]], model: Any,
          residual_init: str | None, cfg_path: Path, experts: dict[str, tuple[int, float]]) -> Any:
    """One AdapterSpec: per path the largest rank of its modules and the first module's scale (expert banks:
    ``experts`` gives their rank and scale)."""
    ptype = cfg["peft_type"]
    variant = {"VERA": "vera", "ADALORA": "adalora"}.get(ptype, "dora" if cfg.get("use_dora") else "lora")
    ranks, alphas = {}, {}
    for path, mods in found.items():
        rs = [per_module[m][0] for m in mods.values()]
        scales = {per_module[m][1] for m in mods.values() if per_module[m][0]}
        ranks[path] = max(max(rs), 1)
        if residual_init is not None and (len(set(rs)) > 1 or len(scales) > 1):
            _refuse(cfg_path, "rank_pattern", f"{residual_init} with different ranks or scales across the layers of {path}")
        scale = next(iter(scales), 1.0) if ptype == "LORA" else None
        if scale is not None:
            alphas[path] = scale * (math.sqrt(ranks[path]) if cfg.get("use_rslora") else ranks[path])
    for path, (r_path, scale) in experts.items():
        ranks[path] = r_path
        alphas[path] = scale * (math.sqrt(r_path) if cfg.get("use_rslora") else r_path)
    r = max(ranks.values())
    kw: dict[str, Any] = {}
    if ptype == "LORA":
        alpha = alphas[next(iter(found or experts))]
        kw = {"rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
              "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
              "rslora": bool(cfg.get("use_rslora")), "init": residual_init or "kaiming"}
    else:
        alpha = float(cfg.get("lora_alpha") or 8) if ptype == "ADALORA" else 1.0
        if ptype == "ADALORA":
            r = int(cfg.get("init_r", 12))
    dropout = float(cfg.get("vera_dropout" if ptype == "VERA" else "lora_dropout", 0.0) or 0.0)
    return AdapterSpec(targets=tuple(re.escape(p) for p in [*found, *experts]), variant=variant, r=r, alpha=alpha,
                       stacked=model.stacked, dropout=dropout,
                       settings=Vera(d_initial=float(cfg.get("d_initial", 0.1))) if ptype == "VERA" else None, **kw)


def _codec_spec(codec: PeftCodec, cfg: dict[str, Any], found: dict[str, dict[int, str]], model: Any,
                cfg_path: Path) -> AdapterSpec:
    """The AdapterSpec of an adapter in a registered codec's format (the codec reads its config fields)."""
    try:
        kw = codec.spec(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    return AdapterSpec(targets=tuple(re.escape(p) for p in found), stacked=model.stacked, **kw)


def _fill_codec(n: Node, codec: PeftCodec, path: str, mods: list[str | None], tensors: dict[str, np.ndarray],
                lead: int, d: Path) -> Node:
    """``n`` with its codec's fields read from the file, layer by layer (a layer without tensors keeps the
    fresh adapter's values, which leave it equal to the base)."""
    own = {f: np.asarray(jax.device_get(getattr(n, f))) for f in codec.fields}
    per: dict[str, list[np.ndarray]] = {f: [] for f in codec.fields}
    for i, m in enumerate(mods):
        for key in codec.keys:
            mine = [own[f][i] if lead else own[f] for f in key.fields]
            vals = mine
            if m is not None:
                name = f"{PREFIX}{m}.{key.suffix}"
                if name not in tensors:
                    raise ValueError(f"{d}: adapter tensor {name!r} is missing")
                vals = [np.asarray(v) for v in key.decode(tensors[name])]
                for f, v, w in zip(key.fields, vals, mine):
                    if v.shape != w.shape:
                        raise ValueError(f"{d}: adapter tensor {name!r} {tensors[name].shape} gives {f} of shape "
                                         f"{v.shape}; {path} of this model needs {w.shape} (an adapter for a "
                                         "different base model or rank?)")
            for f, v in zip(key.fields, vals):
                per[f].append(v)
    return n.replace(**{f: jnp.asarray(np.stack(v) if lead else v[0], getattr(n, f).dtype) for f, v in per.items()})


def _adalora_keep(cfg: dict[str, Any], module: str, r: int) -> np.ndarray:
    pattern = cfg.get("rank_pattern") or {}
    for key in (f"{module}.lora_E", f"{module}.lora_E.default"):
        if key in pattern:
            return np.asarray(pattern[key], bool)
    hits = [v for k, v in pattern.items() if k.startswith(f"{module}.lora_E.")]
    return np.asarray(hits[0], bool) if hits else np.ones(r, bool)


def _fill_node(n: Node, path: str, mods: list[str | None], tensors: dict[str, np.ndarray], cfg: dict[str, Any],
               per_module: dict[str, tuple[int, float]], lead: int, d: Path) -> Node:
    def get(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{d}: adapter tensor {name!r} is missing")
        t = tensors[name]
        if shape is not None and t.shape != shape:
            raise ValueError(f"{d}: adapter tensor {name!r} has shape {t.shape}; {path} of this model needs {shape}")
        return t

    def stack(xs: list[np.ndarray]) -> jax.Array:
        return jnp.asarray(np.stack(xs) if lead else xs[0])

    d_in, d_out = n.shape[-2:]
    own = np.asarray(jax.device_get(n.magnitude)) if isinstance(n, DoraNode) else None
    if isinstance(n, VeraNode):
        r = n.lambda_d.shape[-1]
        lam_d = [get(f"{PREFIX}{m}.vera_lambda_d", (r,)) if m else np.zeros(r, np.float32) for m in mods]
        lam_b = [get(f"{PREFIX}{m}.vera_lambda_b", (d_out,)) if m else np.zeros(d_out, np.float32) for m in mods]
        return n.replace(lambda_d=stack(lam_d), lambda_b=stack(lam_b))
    r = n.lora_a.shape[-1]
    if isinstance(n, AdaLoraNode):
        a_s, e_s, b_s, masks = [], [], [], []
        for m in mods:
            a, e, b = np.zeros((r, d_in), np.float32), np.zeros((r,), np.float32), np.zeros((d_out, r), np.float32)
            keep = np.zeros(r, bool)
            if m is not None:
                keep = _adalora_keep(cfg, m, r)
                if keep.shape != (r,):
                    raise ValueError(f"{d}: rank_pattern of {m} has {keep.size} entries; init_r is {r}")
                k = int(keep.sum())
                a[keep] = get(f"{PREFIX}{m}.lora_A", (k, d_in))
                e[keep] = get(f"{PREFIX}{m}.lora_E", (k, 1))[:, 0]
                b[:, keep] = get(f"{PREFIX}{m}.lora_B", (d_out, k))
            a_s.append(a.T), e_s.append(e), b_s.append(b.T), masks.append(keep)
        return n.replace(lora_a=stack(a_s), lora_e=stack(e_s), lora_b=stack(b_s), rank_mask=stack(masks))
    a_s, b_s, mags = [], [], []
    for i, m in enumerate(mods):
        a_full, b_full = np.zeros((d_in, r), np.float32), np.zeros((r, d_out), np.float32)
        if m is not None:
            emb = f"{PREFIX}{m}.lora_embedding_A" in tensors
            ka, kb = (f"{PREFIX}{m}.lora_embedding_A", f"{PREFIX}{m}.lora_embedding_B") if emb else \
                (f"{PREFIX}{m}.lora_A.weight", f"{PREFIX}{m}.lora_B.weight")
            a, b = get(ka), get(kb)
            k = a.shape[0]
            if a.shape != (k, d_in) or b.shape != (d_out, k) or k > r:
                raise ValueError(f"{d}: adapter tensors {ka!r} {a.shape} / {kb!r} {b.shape} do not fit {path} "
                                 f"[{d_in}, {d_out}] of this model (an adapter for a different base model?)")
            a_full[:, :k] = a.T
            b_full[:k] = b.T * (per_module[m][1] / n.scale)  # the node's one scale; differences go into B
        a_s.append(a_full), b_s.append(b_full)
        if isinstance(n, DoraNode):
            mag = None
            if m is not None:
                mk = next((f"{PREFIX}{m}{s}" for s in (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
                           if f"{PREFIX}{m}{s}" in tensors), f"{PREFIX}{m}.lora_magnitude_vector")
                mag = get(mk, (d_out,))
            mags.append(mag if mag is not None else (own[i] if lead else own))
    out = n.replace(lora_a=stack(a_s), lora_b=stack(b_s))
    if isinstance(n, DoraNode):
        out = out.replace(magnitude=stack(mags))
    return out


def _vera_projections(tree: Any, cfg: dict[str, Any], tensors: dict[str, np.ndarray], cfg_path: Path) -> Any:
    """The shared VeRA projections from the file, or regenerated as PEFT does without ``save_projection``."""
    nodes = [n for _, n in leaves_with_paths(tree, nodes_are_leaves=True) if isinstance(n, VeraNode)]
    d_in = max(n.shape[-2] for n in nodes)
    d_out = max(n.shape[-1] for n in nodes)
    r = nodes[0].lambda_d.shape[-1]
    if "base_model.vera_A" in tensors:
        va, vb = tensors["base_model.vera_A"].T, tensors["base_model.vera_B"].T
        if va.shape[0] < d_in or vb.shape[1] < d_out or va.shape[1] != r or vb.shape[0] != r:
            raise ValueError(f"{cfg_path.parent}: vera_A {va.shape[::-1]} / vera_B {vb.shape[::-1]} do not fit rank "
                             f"{r} and the largest adapted weight [{d_in}, {d_out}]")
    elif cfg.get("save_projection", True):
        raise ValueError(f"{cfg_path.parent}: save_projection is true but base_model.vera_A/B are not in the file")
    else:
        va, vb = vera_projections(r, d_in, d_out, int(cfg.get("projection_prng_key", 0)))

    def put(path: str, n: Any) -> Any:
        if not isinstance(n, VeraNode):
            return n
        own = n.vera_a.value is not None  # the owner holds the projections; the others refer to it
        return n.replace(vera_a=Shared(n.vera_a.name, jnp.asarray(va) if own else None),
                         vera_b=Shared(n.vera_b.name, jnp.asarray(vb) if own else None))

    return map_with_paths(put, tree, nodes_are_leaves=True)
