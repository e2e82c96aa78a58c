"""LoRA-drop's node: per layer, either the layer's own adapter or one shared set (arXiv 2402.07721).

    y = x W + s (x_d A') B',   (A', B') = (A_k, B_k) if slot = k ≥ 0 else (A_shared, B_shared)

Only what LoRA-drop keeps is stored, so the selection removes parameters (and their optimizer state):
the kept layers' own adapters ``kept_a [K, in, r]``, ``kept_b [K, r, out]`` (K = layers of this weight
that keep theirs), and the shared set ``shared_a [in, r]``, ``shared_b [r, out]``, stored once for every
weight of its shape. ``slot`` (int per stacked layer) says which kept set a layer uses, -1 for the
shared one. Both kinds of sets are ``Shared`` leaves: stored once and broadcast to every layer of a
``scan`` (never sliced by it), each layer picking its own by ``slot``; gradients sum over uses.
Built by ``optim.lora_drop.select``; ``as_lora()`` expands it to a plain LoRA node (merge, export).

LoRA-drop (arXiv 2402.07721): keep adapters where their output matters, share one set elsewhere.

1. Train LoRA briefly on a sample (any loop).
2. ``importance(apply, tree, batches)``: for every adapted weight (each stacked layer apart),
   I_i = Σ_x ‖ΔW_i x_i‖² over the sample (x_i: that layer's input), normalised to sum to 1.
3. ``select(tree, importance, threshold=0.9)``: layers sorted by I_i descending are kept until
   their cumulative share reaches ``threshold``; kept layers keep their own adapters, the others
   share one adapter set (one per weight shape), stored once.
4. Train on.

The per-layer inputs are read without side channels: each LoRA node gets a zero probe leaf and
adds ``tap(probe, ‖ΔW x‖²)``, which is 0 in the forward pass and whose backward pass returns the
statistic as the probe's gradient; one ``jax.grad`` over the probes returns every layer's
importance, through ``scan`` and ``jit`` alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.nodes.base import AdapterNode, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout, low_rank
from lorax_variants.recipes import Recipe, Reshape, register_recipe
from lorax_variants.shared import Shared, value_of
from lorax_variants.tree import combine, compile_patterns, leaves_with_paths, map_with_paths, matches, split
from lorax_variants.variants.lora import LoraNode

__all__ = ['LoraDropNode', 'LoraDrop']  # the selection's functions: lorax_variants.variants.lora_drop


@node
class LoraDropNode(AdapterNode):
    """A weight whose layers use their own LoRA set (``slot ≥ 0``) or the shared one (``slot = -1``)."""

    variant: ClassVar[str] = "lora_drop"

    weight: Any = frozen()
    shared_a: Shared = param()  # [in, r], stored once per weight shape
    shared_b: Shared = param()  # [r, out]
    slot: jax.Array = frozen()  # int32 [...] (stacked layers): index into kept_a/kept_b, or -1
    kept_a: Shared | None = param(default=None)  # [K, in, r]: the kept layers' own A (None: K = 0)
    kept_b: Shared | None = param(default=None)  # [K, r, out]
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    @property
    def keep(self) -> jax.Array:
        """Per layer: whether it keeps its own adapter."""
        return self.slot >= 0

    def _factors(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        a, b = value_of(self.shared_a), value_of(self.shared_b)
        lead = tuple(self.slot.shape)
        if self.kept_a is not None:
            idx = jnp.maximum(self.slot, 0)
            use = (self.slot >= 0)[..., None, None]
            a = jnp.where(use, jnp.take(value_of(self.kept_a), idx, axis=0), a)
            b = jnp.where(use, jnp.take(value_of(self.kept_b), idx, axis=0), b)
        else:
            a, b = jnp.broadcast_to(a, lead + a.shape), jnp.broadcast_to(b, lead + b.shape)
        return a.astype(dtype), b.astype(dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + s·(x A_l) B_l with layer l's own set if kept, else the shared set (LoRA-drop, arXiv 2402.07721)."""
        a, b = self._factors(x.dtype)
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return dense(x, self.weight) + low_rank(xd, a, b, float(self.scale))

    reduces_to_lora: ClassVar[bool] = True

    def as_lora(self) -> LoraNode:
        """The same weight as a plain ``LoraNode``: every layer with the set it uses (for merge and export)."""
        a, b = self._factors(jnp.float32)
        return LoraNode(weight=self.weight, lora_a=a, lora_b=b, scale=self.scale, dropout=self.dropout)

    def merge(self) -> jax.Array:
        """W + s·A_l B_l per layer (kept layers their own set, the others the shared one)."""
        a, b = self._factors(jnp.float32)
        w = weight_of(self.weight)
        return (w.astype(jnp.float32) + self.scale * jnp.matmul(a, b)).astype(w.dtype)


def slots(keep: np.ndarray) -> np.ndarray:
    """``slot`` of each layer from a keep mask: 0, 1, ... over the kept layers in order, -1 elsewhere."""
    keep = np.asarray(keep, bool)
    return np.where(keep, np.cumsum(keep.reshape(-1)).reshape(keep.shape) - 1, -1).astype(np.int32)


@jax.custom_vjp
def _tap(probe: jax.Array, value: jax.Array) -> jax.Array:
    return jnp.zeros((), value.dtype)


def _tap_fwd(probe, value):
    return _tap(probe, value), value


def _tap_bwd(value, g):
    return value.astype(jnp.float32), jnp.zeros_like(value)


_tap.defvjp(_tap_fwd, _tap_bwd)


@node
class _Probed(AdapterNode):
    inner: Any = frozen()
    probe: jax.Array = param()
    dummy: int = static(default=0)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inner.shape

    def apply(self, x: jax.Array) -> jax.Array:
        n = self.inner
        low = jnp.matmul(jnp.matmul(x, n.lora_a.astype(x.dtype)) * jnp.asarray(n.scale, x.dtype), n.lora_b.astype(x.dtype))
        stat = jnp.sum(jax.lax.stop_gradient(low).astype(jnp.float32) ** 2)
        return dense(x, n.weight) + low + _tap(self.probe, stat).astype(x.dtype)  # = n.apply(x), no dropout

    def merge(self) -> jax.Array:
        return self.inner.merge()


def importance(apply: Callable[[Any, Any], jax.Array], tree: Any, batches: Iterable[Any],
               stacked: str | None = None) -> dict[str, np.ndarray]:
    """Normalised I_i per LoRA path (an array over stacked layers), from ``apply(tree, batch)``."""
    st = compile_patterns(stacked)
    lora = {p: n for p, n in leaves_with_paths(tree, nodes_are_leaves=True) if isinstance(n, LoraNode)}
    if not lora:
        raise ValueError("lora_drop.importance: the tree has no LoRA nodes")
    for p, n in lora.items():
        if len(n.shape) > 2 and not matches(p, st):
            raise ValueError(f"{p}: stacked LoRA node; pass stacked= (the model's stacked pattern)")
    probes = {p: jnp.zeros(n.shape[:-2], jnp.float32) for p, n in lora.items()}

    def with_probes(t: Any, pr: dict[str, jax.Array]) -> Any:
        return map_with_paths(lambda p, x: _Probed(inner=x, probe=pr[p]) if p in pr else x, t, nodes_are_leaves=True)

    # The tree is an argument, not a closure: closed-over weights become constants XLA folds.
    grad = jax.jit(jax.grad(lambda pr, t, b: jnp.sum(apply(with_probes(t, pr), b).astype(jnp.float32))))
    total = {p: np.zeros(v.shape) for p, v in probes.items()}
    for batch in batches:
        for p, g in grad(probes, tree, batch).items():
            total[p] += np.asarray(g)
    norm = sum(float(v.sum()) for v in total.values())
    if norm <= 0:
        raise ValueError("lora_drop.importance: every adapter output is zero (train briefly first)")
    return {p: v / norm for p, v in total.items()}


def keep_mask(scores: dict[str, np.ndarray], threshold: float = 0.9) -> dict[str, np.ndarray]:
    """Which layers keep their own adapters: the most important, up to ``threshold`` of the total."""
    if not 0 < threshold <= 1:
        raise ValueError(f"LoRA-drop threshold must be in (0, 1], got {threshold}")
    total = sum(float(np.sum(np.asarray(a, np.float64))) for a in scores.values())
    if not total > 0:
        raise ValueError(f"LoRA-drop importances must be non-negative with a positive sum, got a sum of {total}")
    # shares of the total: raw scores (any scale) select as importance()'s normalized ones do
    flat = [(float(v) / total, p, idx) for p, arr in scores.items() for idx, v in np.ndenumerate(np.asarray(arr))]
    flat.sort(key=lambda t: -t[0])
    keep = {p: np.zeros(np.asarray(a).shape, bool) for p, a in scores.items()}
    cum = 0.0
    for v, p, idx in flat:
        if cum >= threshold - 1e-9:  # reached (up to rounding of the running sum)
            break
        keep[p][idx] = True
        cum += v
    return keep


def apply_keep(tree: Any, keep: dict[str, np.ndarray]) -> Any:
    """LoRA nodes -> ``LoraDropNode``s by a keep mask per path.

    Kept layers keep their own A, B (gathered into ``kept_a``/``kept_b``); the others share one set per
    weight shape, which starts from the first dropped layer's adapter and is stored once. The dropped
    layers' own adapters are gone: fewer trainable leaves than before. A path whose layers are all kept
    stays plain LoRA.
    """
    owners: dict[str, str] = {}
    keep = {p: np.asarray(k, bool) for p, k in keep.items()}

    def convert(path: str, n: Any) -> Any:
        if path not in keep or keep[path].all():
            return n  # every layer kept: stays plain LoRA
        if not isinstance(n, LoraNode):
            raise ValueError(f"{path}: LoRA-drop keep mask given for a {type(n).__name__}, not a LoRA node")
        lead = n.lora_a.shape[:-2]
        if keep[path].shape != lead:
            raise ValueError(f"{path}: LoRA-drop keep mask of shape {keep[path].shape} for layers {lead}")
        shape = (n.lora_a.shape[-2:], n.lora_b.shape[-2:])
        name = f"lora_drop/{shape[0][0]}x{shape[1][1]}r{shape[0][1]}"
        own = name not in owners
        if own:
            owners[name] = path
        flat = keep[path].reshape(-1)
        layers = lambda m: m.reshape((-1,) + m.shape[len(lead):])  # noqa: E731
        first = int(np.flatnonzero(~flat)[0])  # the shared set starts from a dropped layer's adapter
        kept = np.flatnonzero(flat)
        gather = lambda m, k: Shared(f"lora_drop/{path}/{k}", jnp.take(layers(m), kept, axis=0)) if len(kept) else None  # noqa: E731
        return LoraDropNode(weight=n.weight, slot=jnp.asarray(slots(keep[path])),
                            shared_a=Shared(f"{name}/a", layers(n.lora_a)[first] if own else None),
                            shared_b=Shared(f"{name}/b", layers(n.lora_b)[first] if own else None),
                            kept_a=gather(n.lora_a, "kept_a"), kept_b=gather(n.lora_b, "kept_b"),
                            scale=n.scale, dropout=n.dropout)

    return map_with_paths(convert, tree, nodes_are_leaves=True)


def select(tree: Any, scores: dict[str, np.ndarray], threshold: float = 0.9) -> tuple[Any, dict[str, np.ndarray]]:
    """Keep the most important layers up to ``threshold`` of the total; the rest share one set.

    Returns the tree (LoRA nodes -> ``LoraDropNode``) and the keep mask per path.
    """
    keep = keep_mask(scores, threshold)
    return apply_keep(tree, keep), keep


def carry_state(state: Any, trainable: Any, frozen: Any, keep: dict[str, np.ndarray], new_mask: Any) -> Any:
    """An optimizer state of the tree before ``apply_keep``, converted as the tree is.

    Every part of ``state`` shaped like ``trainable`` (Adam's moments, a momentum trace) goes through
    ``apply_keep`` with the parameters: the kept layers' moments stay with their adapters, the shared set
    takes its first dropped layer's, the dropped layers' go with them; counts are unchanged, so schedules
    and bias corrections go on. ``new_mask``: the trainable mask of the converted tree.
    """
    treedef = jax.tree.structure(trainable)

    def like_params(x: Any) -> bool:
        try:
            return jax.tree.structure(x) == treedef
        except Exception:  # noqa: BLE001 - not a pytree of the same kind
            return False

    def convert(x: Any) -> Any:
        if not like_params(x):
            return x
        return split(apply_keep(combine(x, frozen), keep), new_mask)[0]

    return jax.tree.map(convert, state, is_leaf=like_params)


@dataclasses.dataclass(frozen=True)
class LoraDrop:
    """LoRA-drop (arXiv 2402.07721): after ``select_at`` steps (default a tenth of the run) the layers whose
    adapters' output importance (measured on ``batches`` training batches) makes the top ``threshold`` share keep
    their own adapters; the rest share one set per shape."""

    select_at: int | None = None
    threshold: float = 0.9
    batches: int = 4


def _drop_decide(s: LoraDrop, apply: Callable, tree: Any, batches: list[Any], stacked: str | None):
    scores = importance(apply, tree, batches, stacked)
    keep = keep_mask(scores, s.threshold)
    kept = sum(int(np.sum(k)) for k in keep.values())
    message = (f"LoRA-drop: {kept} of {sum(np.size(k) for k in keep.values())} adapted layers keep their own "
               "adapters, the rest share one set per shape")
    return keep, {"message": message, "threshold": s.threshold, "importance": {k: np.asarray(v).tolist() for k, v in scores.items()},
                  "keep": {k: np.asarray(v).tolist() for k, v in keep.items()}}


_LORA_DROP = Reshape(at=lambda s, total: s.select_at or max(1, total // 10), decide=_drop_decide,
                     apply=apply_keep, carry=carry_state, batches=lambda s: s.batches)


def _check(s: LoraDrop, total_steps: int) -> None:
    if s.select_at is not None and not 1 <= s.select_at < total_steps:
        raise ValueError(f"select_at: must be in [1, train.steps={total_steps}), got {s.select_at}")
    if not 0 < s.threshold <= 1:
        raise ValueError(f"threshold: must be in (0, 1], got {s.threshold}")
    if s.batches < 1:
        raise ValueError(f"batches: must be at least 1, got {s.batches}")


register_recipe(Recipe("lora_drop", "lora", LoraDrop, reshape=_LORA_DROP, figures=("layer_importance",), check=_check,
                       lora_shaped=True))
