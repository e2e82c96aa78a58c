"""LoRA (arXiv 2106.09685), rsLoRA (arXiv 2312.03732) and LoRA-FA (arXiv 2308.03303).

    y = x W + s · (drop(x) A) B,      W [in, out] frozen,  A [in, r],  B [r, out]
    s = alpha / r          (LoRA)
    s = alpha / sqrt(r)    (rsLoRA: rank-stabilized scaling)

LoRA-FA freezes A at its random initialization and trains only B. Leading axes on all three
(``[L, in, out]``, ``[L, in, r]``, ``[L, r, out]``) are stacked layers, each with its own A, B;
``jax.lax.scan`` over the node slices them one layer at a time.

The factored apply never forms the d x k delta: the rank-r intermediate ``x A`` is scaled
(r values per token instead of out) and multiplied by B. ``merge`` forms ``W + s A B``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.codec import (PREFIX, Key, PeftCodec, Refusal, Site, layers, module_tensor, pattern_value, peft_alpha,
                                  register_codec, stack_layers)
from lorax_variants.nodes.base import AdapterNode, dense, dense_t, embed, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout, low_rank
from lorax_variants.recipes import INITS, Recipe, register_recipe
from lorax_variants.registry import Target, lora_factors, register_variant
from lorax_variants.shared import Shared, value_of
from lorax_variants.tree import leaves_with_paths, map_with_paths

__all__ = ['LoraNode', 'share_adapters']


@node
class LoraNode(AdapterNode):
    """``W + s·A B`` with A [..., in, r], B [..., r, out]."""

    variant: ClassVar[str] = "lora"

    weight: Any = frozen()
    lora_a: jax.Array = param()
    lora_b: jax.Array = param()
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    reduces_to_lora: ClassVar[bool] = True

    def as_lora(self) -> "LoraNode":
        """Itself."""
        return self

    @property
    def rank(self) -> int:
        return value_of(self.lora_a).shape[-1]

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + s·(dropout(x) A) B (arXiv 2106.09685), never forming A B."""
        y = dense(x, self.weight)
        xa = adapter_dropout(x, self.dropout, self.dropout_key)
        return y + low_rank(xa, value_of(self.lora_a).astype(x.dtype), value_of(self.lora_b).astype(x.dtype),
                            float(self.scale))

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Embedding rows of ``W + s·A B`` (W [vocab, d]): ``W[ids] + s·A[ids] B``."""
        rows = embed(ids, self.weight)
        a = jnp.take(value_of(self.lora_a), ids, axis=0).astype(rows.dtype)
        return rows + jnp.matmul(a * jnp.asarray(self.scale, rows.dtype), value_of(self.lora_b).astype(rows.dtype))

    def apply_t(self, x: jax.Array) -> jax.Array:
        """``x (W + s·A B)ᵀ = x Wᵀ + s·(x Bᵀ) Aᵀ`` (a tied head over an adapted embedding)."""
        h = jnp.matmul(x, value_of(self.lora_b).astype(x.dtype).T) * jnp.asarray(self.scale, x.dtype)
        return dense_t(x, self.weight) + jnp.matmul(h, value_of(self.lora_a).astype(x.dtype).T)

    def delta(self) -> jax.Array:
        """``s·A B`` in float32 (the d x k update; for merge and export only)."""
        a = value_of(self.lora_a).astype(jnp.float32)
        b = value_of(self.lora_b).astype(jnp.float32)
        return self.scale * jnp.matmul(a, b)

    def merge(self) -> jax.Array:
        """W + s·A B."""
        w = weight_of(self.weight)
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)
@register_variant("lora")
def build_lora(t: Target) -> LoraNode:
    weight, a, b = lora_factors(t)
    return LoraNode(weight=weight, lora_a=a, lora_b=b, scale=t.scale, dropout=t.spec.dropout)


def share_adapters(tree: Any, paths: list[str], name: str = "shared") -> Any:
    """Make the LoRA nodes at ``paths`` use one adapter set (A, B): the first path's, stored once.

    The others keep their own frozen weights and scales; after training, the owner's A and B hold
    gradients summed over every use (LoRA-drop shares one set among its unselected layers).
    """
    nodes = dict(leaves_with_paths(tree, nodes_are_leaves=True))
    missing = [p for p in paths if not isinstance(nodes.get(p), LoraNode)]
    if missing:
        raise ValueError(f"share_adapters: {missing} are not LoRA nodes of this tree")
    owner = nodes[paths[0]]
    a, b = value_of(owner.lora_a), value_of(owner.lora_b)
    for p in paths[1:]:
        n = nodes[p]
        if value_of(n.lora_a).shape != a.shape or value_of(n.lora_b).shape != b.shape:
            raise ValueError(f"share_adapters: {p} has A {value_of(n.lora_a).shape}, B {value_of(n.lora_b).shape}; "
                             f"{paths[0]} has A {a.shape}, B {b.shape}")
    wanted = {p: i for i, p in enumerate(paths)}

    def wrap(path: str, x: Any) -> Any:
        if path not in wanted:
            return x
        own = wanted[path] == 0
        return x.replace(lora_a=Shared(f"{name}/lora_a", a if own else None),
                         lora_b=Shared(f"{name}/lora_b", b if own else None))

    return map_with_paths(wrap, tree, nodes_are_leaves=True)


register_recipe(Recipe("lora", "lora", lora_shaped=True))


# PEFT's LoRA format (``LoraConfig``; DoRA with ``use_dora``, whose node registers the same codec). Per module
# ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] (``lora_embedding_A/B`` on embeddings), DoRA's
# ``lora_magnitude_vector`` [out]. Ranks and scales may differ per module (``rank_pattern``, ``alpha_pattern``,
# ``use_rslora``): on read, a path's modules are zero-padded to its largest rank and a module's scale that
# differs from the node's goes into B; PiSSA/OLoRA written with their initial factors are PEFT's conversion to
# plain LoRA on the original base (rank 2r: ``A = [A'; A0]``, ``B = [B', -B0]``).
KEYS = (dataclasses.replace(Key.plain("lora_A.weight", "lora_a"), aliases=("lora_embedding_A",)),
        dataclasses.replace(Key.plain("lora_B.weight", "lora_b"), aliases=("lora_embedding_B",)),
        dataclasses.replace(Key.plain("lora_magnitude_vector", "magnitude", lambda x: x),
                            aliases=("lora_magnitude_vector.weight",)))
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")  # the base stays W


def _peft_write(sites: list[Site], conv1d: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    kinds = sorted({type(s.node).__name__ for s in sites})
    if len(kinds) > 1:
        raise ValueError(f"save_peft: {' and '.join(kinds)} in one adapter: a PEFT LoRA adapter is all LoRA or all "
                         "DoRA (use_dora); export the merged model (save_merged / --format merged)")
    dora = hasattr(sites[0].node, "magnitude")
    tensors: dict[str, np.ndarray] = {}
    entries = []  # (module, r, alpha)
    for s in sites:
        n = s.node
        a_l, b_l = layers(n.lora_a, s.lead), layers(n.lora_b, s.lead)
        if s.initial is not None:  # PiSSA/OLoRA as PEFT's conversion to LoRA on the original base
            a_l = [np.concatenate([a, i], axis=1) for a, i in zip(a_l, layers(s.initial.lora_a, s.lead))]
            b_l = [np.concatenate([b, -j], axis=0) for b, j in zip(b_l, layers(s.initial.lora_b, s.lead))]
        mags = layers(n.magnitude, s.lead) if dora else None
        ka, kb = (KEYS[0].aliases[0], KEYS[1].aliases[0]) if s.embedding else (KEYS[0].suffix, KEYS[1].suffix)
        for i, m in enumerate(s.modules):
            a = np.ascontiguousarray(a_l[i].astype(np.float32).T)
            tensors[f"{PREFIX}{m}.{ka}"] = a
            tensors[f"{PREFIX}{m}.{kb}"] = np.ascontiguousarray(b_l[i].astype(np.float32).T)
            if dora:
                tensors[f"{PREFIX}{m}.{KEYS[2].suffix}"] = mags[i].astype(np.float32)
            entries.append((m, a.shape[0], peft_alpha(n.scale, a.shape[0])))
    r = Counter(e[1] for e in entries).most_common(1)[0][0]
    alpha = Counter(e[2] for e in entries).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "rank_pattern": {re.escape(m): rr for m, rr, _ in entries if rr != r},
            "alpha_pattern": {re.escape(m): aa for m, _, aa in entries if aa != alpha}, "use_rslora": False,
            "use_dora": dora, "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
            "layers_to_transform": None, "layers_pattern": None}, tensors


def _peft_residual(cfg: dict[str, Any]) -> str | None:
    init = cfg.get("init_lora_weights", True)
    if init in PLAIN_INITS or init is None:
        return None
    if init in INITS and INITS[init].peft_reruns:  # PEFT re-runs them on the base when it loads the adapter; so do we
        if cfg.get("use_dora") and init == "olora":
            raise Refusal("init_lora_weights", "OLoRA with DoRA")
        return init
    if isinstance(init, str) and (init.startswith(("pissa_niter_", "corda")) or init in ("loftq", "lora_ga")):
        raise Refusal("init_lora_weights", f"{init!r} left a residual base that cannot be recomputed from the base "
                      "model alone; save the adapter with PEFT's path_initial_model_for_weight_conversion (plain LoRA)")
    raise Refusal("init_lora_weights", f"unknown initialization {init!r}")


def _peft_read(cfg: dict[str, Any], found: dict[str, dict[int, str]], tensors: dict[str, np.ndarray],
               experts: dict[str, tuple[int, float]], residual: str | None) -> tuple[dict[str, Any], Any]:
    """Per path the largest rank of its modules and the first module's scale; context: each module's
    (rank in the file, scale as PEFT computes it)."""
    rslora = bool(cfg.get("use_rslora"))
    per_module: dict[str, tuple[int, float]] = {}
    for mods in found.values():
        for m in mods.values():
            key = next((f"{PREFIX}{m}.{s}" for s in (KEYS[0].suffix, *KEYS[0].aliases) if f"{PREFIX}{m}.{s}" in tensors),
                       None)
            if key is None:
                raise ValueError(f"adapter tensor {PREFIX}{m}.lora_A is missing")
            k = tensors[key].shape[0]
            alpha = float(pattern_value(cfg, "alpha_pattern", m, cfg.get("lora_alpha", 8)))
            per_module[m] = (k, alpha / (math.sqrt(k) if rslora else k) if k else 0.0)
    ranks, alphas = {}, {}
    for path, mods in found.items():
        rs = [per_module[m][0] for m in mods.values()]
        scales = {per_module[m][1] for m in mods.values() if per_module[m][0]}
        ranks[path] = max(max(rs), 1)
        if residual is not None and (len(set(rs)) > 1 or len(scales) > 1):
            raise Refusal("rank_pattern", f"{residual} with different ranks or scales across the layers of {path}")
        alphas[path] = next(iter(scales), 1.0) * (math.sqrt(ranks[path]) if rslora else ranks[path])
    for path, (r_path, scale) in experts.items():
        ranks[path] = r_path
        alphas[path] = scale * (math.sqrt(r_path) if rslora else r_path)
    r = max(ranks.values())
    alpha = alphas[next(iter(found or experts))]
    return {"variant": "dora" if cfg.get("use_dora") else "lora", "r": r, "alpha": alpha,
            "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha}, "rslora": rslora,
            "init": residual or "kaiming", "dropout": float(cfg.get("lora_dropout") or 0.0)}, per_module


def _peft_fill(n: Any, site: Site, tensors: dict[str, np.ndarray], cfg: dict[str, Any],
               per_module: dict[str, tuple[int, float]]) -> Any:
    d_in, d_out = n.shape[-2:]
    r = n.lora_a.shape[-1]
    dora = hasattr(n, "magnitude")
    own = layers(n.magnitude, site.lead) if dora else None
    a_s, b_s, mags = [], [], []
    for i, m in enumerate(site.modules):
        a_full, b_full = np.zeros((d_in, r), np.float32), np.zeros((r, d_out), np.float32)
        mag = own[i] if dora else None
        if m is not None:
            emb = f"{PREFIX}{m}.{KEYS[0].aliases[0]}" in tensors
            ka, kb = (f"{PREFIX}{m}.{k.aliases[0] if emb else k.suffix}" for k in KEYS[:2])
            if ka not in tensors or kb not in tensors:
                raise ValueError(f"adapter tensor {ka if ka not in tensors else kb!r} is missing")
            a, b = tensors[ka], tensors[kb]
            k = a.shape[0]
            if a.shape != (k, d_in) or b.shape != (d_out, k) or k > r:
                raise ValueError(f"adapter tensors {ka!r} {a.shape} / {kb!r} {b.shape} do not fit {site.path} "
                                 f"[{d_in}, {d_out}] of this model (an adapter for a different base model?)")
            a_full[:, :k] = a.T
            b_full[:k] = b.T * (per_module[m][1] / n.scale)  # the node's one scale; differences go into B
            if dora:
                suffix = next((s for s in (KEYS[2].suffix, *KEYS[2].aliases) if f"{PREFIX}{m}.{s}" in tensors), KEYS[2].suffix)
                mag = module_tensor(tensors, site, m, suffix, (d_out,))
        a_s.append(a_full), b_s.append(b_full), mags.append(mag)
    out = n.replace(lora_a=stack_layers(site, a_s, n.lora_a), lora_b=stack_layers(site, b_s, n.lora_b))
    return out.replace(magnitude=stack_layers(site, mags, n.magnitude)) if dora else out


PEFT = register_codec(PeftCodec(
    "LORA", LoraNode, KEYS, write=_peft_write, residual=_peft_residual, read=_peft_read, fill=_peft_fill,
    refused=((".lora_B.bias", "lora_bias", "a trainable bias on lora_B"),),
    reads=frozenset({"fan_in_fan_out"})))
