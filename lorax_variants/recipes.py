"""Recipes: everything a training loop needs to know about a variant, in one object per variant.

A recipe names the adapter node it builds (``registry``) and carries the variant's own settings (a
dataclass: the app's config section ``adapter.<name>``) and hooks, each optional:

- ``spec(settings)``: ``AdapterSpec`` fields the variant sets (DyLoRA's ``r_min``, VeRA's ``d_initial``, ...);
- ``optimizer(settings, ctx)``: the variant's Optax chain around the loop's base optimizer (``OptimContext``);
- ``lr_groups(settings, ctx)``: learning rates by parameter group, for logs;
- ``penalty(settings)``: a loss term over the adapted tree (AdaLoRA's orthogonality);
- ``train_tree(settings, tree, key)``: the tree a training forward sees (DyLoRA samples its rank);
- ``after_update(settings, frozen, old, new, step)``: new frozen leaves after an update (Delta-LoRA);
- ``extras`` / ``with_extras``: state beyond the trainable leaves a checkpoint must hold (Delta-LoRA's weights);
- ``reshape``: a one-time change of the tree during training (LoRA-drop's selection, ``Reshape``);
- ``tracks_ranks``, ``summary(opt_state)``, ``weight_changes``, ``figures``: what a loop reports;
- ``adapt(settings, params, spec, key)``: the adapted tree, where ``adapt(params, spec, key)`` is not it (many
  adapters: one spec each); ``routes(settings)``: the adapters rows go to and where their rows come from
  (``Route``); ``route_mean``: the loss is each route's mean over its rows, summed (each adapter trains as if
  alone); ``clip(max_norm)``: the gradient clipping (per adapter for many adapters).

A loop (the app's, or a user's) calls the hooks and never names a variant. Adding a variant: its node
and builder (``nodes/<variant>.py``), its recipe here, a config, a test.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax

from lorax_variants.nodes.adalora import orthogonal_penalty
from lorax_variants.nodes.dylora import sample_rank
from lorax_variants.nodes.lora import LoraNode
from lorax_variants.optim import lora_drop
from lorax_variants.optim.adalora import AllocatorState, adalora_allocator, rank_pattern
from lorax_variants.optim.delta_lora import delta_lora_update
from lorax_variants.optim.lorafa import lorafa_projection
from lorax_variants.optim.loraplus import loraplus, loraplus_labels
from lorax_variants.optim.sora import sora_proximal
from lorax_variants.optim.multi import clip_by_adapter_norm
from lorax_variants.multi import adapters as many_adapters
from lorax_variants.spec import AdapterSpec
from lorax_variants.tree import leaves_with_paths

__all__ = ["Recipe", "OptimContext", "Reshape", "RECIPES", "recipe", "LoraPlus", "AdaLora", "Sora", "DeltaLora",
           "DyLora", "Vera", "MultiTask", "LoraDrop", "QaLora", "Many", "ManyAdapter", "Route"]


# The variants' own settings (the app reads each from its config section ``adapter.<variant>``).

@dataclasses.dataclass
class LoraPlus:
    """LoRA+ (arXiv 2402.12354): B learns at ``ratio`` times A's rate; embedding adapters' B at ``lr_embedding``."""

    ratio: float = 16.0
    lr_embedding: float = 1e-6


@dataclasses.dataclass
class AdaLora:
    """AdaLoRA (arXiv 2303.10512): budget from the initial rank to ``target_r`` per matrix between ``tinit`` and
    ``total - tfinal`` steps, every ``delta_t``; sensitivity EMAs ``beta1``/``beta2``; ``orth_reg`` weighs the
    orthogonality penalty."""

    target_r: int = 4
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1


@dataclasses.dataclass
class Sora:
    """SoRA (arXiv 2311.11696): ``xi`` is the gates' L1 strength (the proximal step's threshold per unit rate)."""

    xi: float = 1e-4


@dataclasses.dataclass
class DeltaLora:
    """Delta-LoRA (arXiv 2309.02411): from step ``start`` the frozen W moves by ``update_ratio`` times the change
    of s·A B at each step."""

    update_ratio: float = 0.5
    start: int = 0


@dataclasses.dataclass
class DyLora:
    """DyLoRA (arXiv 2210.07558): each step trains a rank drawn from [``r_min``, r]."""

    r_min: int = 1


@dataclasses.dataclass
class Vera:
    """VeRA (arXiv 2310.11454): λ_d starts at ``d_initial``."""

    d_initial: float = 0.1


@dataclasses.dataclass
class MultiTask:
    """``n_tasks`` adapters per target; each row is routed to its task's adapter."""

    n_tasks: int = 1


@dataclasses.dataclass
class QaLora:
    """QA-LoRA (arXiv 2309.14717): the adapter reads the input pooled over ``group_size`` features (default: the
    quantization block size, ``quant.block_size``), so it folds into an ``int4_asym`` base's zero points."""

    group_size: int | None = None


@dataclasses.dataclass
class ManyAdapter:
    """One of many adapters trained together: its ``name``, ``variant`` (lora | dora), rank ``r``, ``alpha``,
    ``rslora`` and ``targets`` (each defaults to the ``adapter`` section's), and where its rows come from:
    ``task``, the value of ``data.task_field`` its rows of ``data.source`` carry, or ``source``, a data file
    (read as ``data`` says) all of whose rows are its own."""

    name: str = ""
    variant: str = "lora"
    r: int | None = None
    alpha: float | None = None
    rslora: bool | None = None
    targets: str | list[str] | None = None
    task: str | None = None
    source: str | None = None


@dataclasses.dataclass
class Many:
    """Many adapters trained at once over one frozen model (``lv.adapters``), each example routed to its own."""

    adapters: list[ManyAdapter] = dataclasses.field(default_factory=list)
    impl: str = "auto"  # nodes.multi: gather (any row order; what auto takes) or ragged (ragged_dot over sorted rows)


@dataclasses.dataclass(frozen=True)
class Route:
    """Where an adapter's rows come from: a ``task`` label of ``data.task_field`` or a ``source`` file."""

    name: str
    task: str | None
    source: str | None


@dataclasses.dataclass
class LoraDrop:
    """LoRA-drop (arXiv 2402.07721): after ``select_at`` steps (default a tenth of the run) the layers whose
    adapters' output importance (measured on ``batches`` training batches) makes the top ``threshold`` share keep
    their own adapters; the rest share one set per shape."""

    select_at: int | None = None
    threshold: float = 0.9
    batches: int = 4


@dataclasses.dataclass(frozen=True)
class OptimContext:
    """What a recipe's ``optimizer`` builds on: ``make(learning_rate, weight_decay, mask)`` the loop's base
    optimizer, ``lr`` its schedule (``base_lr`` its peak), the trainable and whole adapted trees."""

    make: Callable[..., optax.GradientTransformation]
    lr: optax.Schedule
    base_lr: float
    weight_decay: float
    decay_mask: Any
    trainable: Any
    adapted: Any
    stacked: str | None
    total_steps: int


@dataclasses.dataclass(frozen=True)
class Reshape:
    """A one-time change of the adapted tree during training: at step ``at(settings, total_steps)``,
    ``decide(settings, apply, tree, batches, stacked) -> (choice, report)`` on a few training batches,
    ``apply(tree, choice)`` the new tree, ``carry(opt_state, trainable, frozen, choice, mask)`` the optimizer
    state for it. ``choice`` is a dict of boolean arrays by path (saved with checkpoints as lists)."""

    at: Callable[[Any, int], int]
    decide: Callable[..., tuple[dict[str, np.ndarray], dict[str, Any]]]
    apply: Callable[[Any, dict[str, np.ndarray]], Any]
    carry: Callable[..., Any]
    batches: Callable[[Any], int]


def _plain(settings: Any, ctx: OptimContext) -> optax.GradientTransformation:
    """The loop's base optimizer alone (weight decay on matrices only)."""
    return ctx.make(ctx.lr, ctx.weight_decay, ctx.decay_mask if ctx.weight_decay else None)


def _no_spec(settings: Any) -> dict[str, Any]:
    """No AdapterSpec fields of the variant's own."""
    return {}


def _one_group(settings: Any, ctx: OptimContext) -> dict[str, Callable[[int], float]]:
    """One learning rate for every trainable leaf."""
    return {"lr": ctx.lr}


def _no_penalty(settings: Any) -> None:
    """No loss term of the variant's own."""
    return None


def _no_summary(opt_state: Any) -> dict[str, Any]:
    """Nothing to add to the run's summary."""
    return {}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One variant for a training loop (see the module docstring). ``node``: the registered node variant
    (``None``: no adapters, only extra leaves train); ``settings``: the settings dataclass or ``None``."""

    name: str
    node: str | None
    settings: type | None = None
    spec: Callable[[Any], dict[str, Any]] = _no_spec
    optimizer: Callable[[Any, OptimContext], optax.GradientTransformation] = _plain
    lr_groups: Callable[[Any, OptimContext], dict[str, Callable[[int], float]]] = _one_group
    penalty: Callable[[Any], Callable[[Any], jax.Array] | None] = _no_penalty
    train_tree: Callable[[Any, Any, jax.Array], Any] | None = None
    after_update: Callable[..., Any] | None = None
    extras: Callable[[Any], list[Any]] | None = None
    with_extras: Callable[[Any, list[Any]], Any] | None = None
    reshape: Reshape | None = None
    tracks_ranks: bool = False
    summary: Callable[[Any], dict[str, Any]] = _no_summary
    weight_changes: bool = True
    figures: tuple[str, ...] = ()  # the report figures of the variant's own (names the app's report draws)
    routed: bool = False  # each example goes to one of several adapters: the data must say which (a task field)
    adapt: Callable[[Any, Any, AdapterSpec, jax.Array], Any] | None = None
    routes: Callable[[Any], list[Route]] | None = None
    route_mean: bool = False
    clip: Callable[[float], optax.GradientTransformation] = optax.clip_by_global_norm

    def defaults(self) -> Any:
        """The settings with their defaults (``None`` for a variant without settings)."""
        return self.settings() if self.settings is not None else None


# Per-variant hooks.

def _lorafa(settings: Any, ctx: OptimContext) -> optax.GradientTransformation:
    base = _plain(settings, ctx)
    if isinstance(jax.tree.leaves(ctx.adapted)[0], jax.ShapeDtypeStruct):
        return base  # a plan over abstract trees: the (stateless) projection needs values
    return optax.chain(lorafa_projection(ctx.adapted), base)


def _loraplus(s: LoraPlus, ctx: OptimContext) -> optax.GradientTransformation:
    return loraplus(lambda learning_rate, **kw: ctx.make(learning_rate, **kw), ctx.lr, ctx.trainable, ratio=s.ratio,
                    lr_embedding=s.lr_embedding, weight_decay=ctx.weight_decay, stacked=ctx.stacked)


def _loraplus_groups(s: LoraPlus, ctx: OptimContext) -> dict[str, Callable[[int], float]]:
    labels = set(jax.tree.leaves(loraplus_labels(ctx.trainable, stacked=ctx.stacked)))
    out = {"lr": ctx.lr}
    if "B" in labels or "B_no_decay" in labels:
        out["lr_B"] = lambda step: s.ratio * ctx.lr(step)
    if "embedding" in labels:
        out["lr_embedding"] = lambda step: s.lr_embedding
    return out


def _adalora(s: AdaLora, ctx: OptimContext) -> optax.GradientTransformation:
    return adalora_allocator(_plain(s, ctx), target_r=s.target_r, total_step=ctx.total_steps, tinit=s.tinit,
                             tfinal=s.tfinal, delta_t=s.delta_t, beta1=s.beta1, beta2=s.beta2)


def _adalora_summary(opt_state: Any) -> dict[str, Any]:
    alloc = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AllocatorState))
             if isinstance(x, AllocatorState)]
    return {"adalora_ranks": [np.asarray(r).tolist() for r in rank_pattern(alloc[0])]} if alloc else {}


def _sora(s: Sora, ctx: OptimContext) -> optax.GradientTransformation:
    return optax.chain(_plain(s, ctx), sora_proximal(lambda step: s.xi * ctx.lr(step) / ctx.base_lr))


def _delta_weights(frozen: Any) -> list[Any]:
    """The frozen weights Delta-LoRA changes (those under LoRA nodes), in path order."""
    return [n.weight for _, n in leaves_with_paths(frozen, nodes_are_leaves=True) if isinstance(n, LoraNode)]


def _with_delta_weights(frozen: Any, weights: list[Any]) -> Any:
    it = iter(weights)
    return jax.tree.map(lambda n: n.replace(weight=next(it)) if isinstance(n, LoraNode) else n, frozen,
                        is_leaf=lambda x: isinstance(x, LoraNode))


def _drop_decide(s: LoraDrop, apply: Callable, tree: Any, batches: list[Any], stacked: str | None):
    scores = lora_drop.importance(apply, tree, batches, stacked)
    keep = lora_drop.keep_mask(scores, s.threshold)
    kept = sum(int(np.sum(k)) for k in keep.values())
    message = (f"LoRA-drop: {kept} of {sum(np.size(k) for k in keep.values())} adapted layers keep their own "
               "adapters, the rest share one set per shape")
    return keep, {"message": message, "threshold": s.threshold, "importance": {k: np.asarray(v).tolist() for k, v in scores.items()},
                  "keep": {k: np.asarray(v).tolist() for k, v in keep.items()}}


def _many_routes(s: Many) -> list[Route]:
    """The adapters in route order, each with the one place its rows come from."""
    if not s.adapters:
        raise ValueError("adapter.many.adapters: list at least one adapter (name, variant, r, task or source)")
    seen: set[str] = set()
    out = []
    for i, a in enumerate(s.adapters):
        where = f"adapter.many.adapters[{i}]"
        if not a.name or a.name in seen or "/" in a.name:
            raise ValueError(f"{where}.name: each adapter needs a unique name without '/', got {a.name!r}")
        seen.add(a.name)
        if a.variant not in ("lora", "dora"):
            raise ValueError(f"{where}.variant: many adapters at once are 'lora' or 'dora', got {a.variant!r}")
        if (a.task is None) == (a.source is None):
            raise ValueError(f"{where} ({a.name}): give exactly one of task (a value of data.task_field) or source "
                             "(a data file of its own)")
        out.append(Route(a.name, None if a.task is None else str(a.task), a.source))
    return out


def _many_adapt(s: Many, params: Any, spec: AdapterSpec, key: jax.Array) -> Any:
    """One spec per adapter from the ``adapter`` section's, with the adapter's own fields where it sets them."""
    _many_routes(s)
    specs = {}
    for a in s.adapters:
        own = {"variant": a.variant, "r": a.r, "alpha": a.alpha, "rslora": a.rslora,
               "targets": tuple(a.targets) if isinstance(a.targets, list) else a.targets}
        specs[a.name] = dataclasses.replace(spec, **{k: v for k, v in own.items() if v is not None})
    return many_adapters(params, specs, key, impl=s.impl)


_LORA_DROP = Reshape(at=lambda s, total: s.select_at or max(1, total // 10), decide=_drop_decide,
                     apply=lora_drop.apply_keep, carry=lora_drop.carry_state, batches=lambda s: s.batches)

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("lora", "lora"),
    Recipe("lora_fa", "lora_fa", optimizer=_lorafa),
    Recipe("loraplus", "lora", LoraPlus, optimizer=_loraplus, lr_groups=_loraplus_groups),
    Recipe("dora", "dora"),
    Recipe("vera", "vera", Vera, spec=lambda s: {"d_initial": s.d_initial}),
    Recipe("adalora", "adalora", AdaLora, optimizer=_adalora, tracks_ranks=True, summary=_adalora_summary,
           figures=("adalora",),
           penalty=lambda s: (lambda tree: s.orth_reg * orthogonal_penalty(tree)) if s.orth_reg else None),
    Recipe("dylora", "dylora", DyLora, spec=lambda s: {"r_min": s.r_min},
           train_tree=lambda s, tree, key: sample_rank(tree, key)),
    Recipe("sora", "sora", Sora, optimizer=_sora, tracks_ranks=True, figures=("sora",)),
    Recipe("delta_lora", "lora", DeltaLora, weight_changes=False, extras=_delta_weights, with_extras=_with_delta_weights,
           after_update=lambda s, frozen, old, new, step: delta_lora_update(frozen, old, new, step, lam=s.update_ratio,
                                                                            start_step=s.start)),
    Recipe("multitask", "multitask", MultiTask, spec=lambda s: {"n_tasks": s.n_tasks}, weight_changes=False,
           figures=("tasks",), routed=True),
    Recipe("lora_drop", "lora", LoraDrop, reshape=_LORA_DROP, figures=("lora_drop",)),
    Recipe("qalora", "qalora", QaLora, spec=lambda s: {"group_size": s.group_size}),
    Recipe("many", "lora", Many, adapt=_many_adapt, routes=_many_routes, route_mean=True, clip=clip_by_adapter_norm,
           weight_changes=False, figures=("tasks",), routed=True),
    Recipe("none", None),
]}


def recipe(name: str) -> Recipe:
    """The recipe of variant ``name``; an unknown name is an error listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(RECIPES)}")
    return RECIPES[name]
