"""Recipes: everything a training loop needs to know about a variant, in one object per variant.

A recipe names the adapter node it builds (``registry``) and carries the variant's own settings (a frozen
dataclass: the app's config section ``adapter.<name>``) and hooks, each optional:

- ``spec(settings)``: ``AdapterSpec`` fields the variant sets (its node's ``settings``);
- ``optimizer(settings, ctx)``: the variant's Optax chain around the loop's base optimizer (``OptimContext``);
- ``lr_groups(settings, ctx)``: learning rates by parameter group, for logs;
- ``penalty(settings)``: a loss term over the adapted tree;
- ``train_tree(settings, tree, key)``: the tree a training forward sees (a rank drawn per step, say);
- ``after_update(settings, frozen, old, new, step)``: new frozen leaves after an update;
- ``extras`` / ``with_extras``: state beyond the trainable leaves a checkpoint must hold (changed frozen weights);
- ``reshape``: a one-time change of the tree during training (``Reshape``);
- ``tracks_ranks``, ``summary(opt_state)``, ``weight_changes``, ``figures``: what a loop reports;
- ``adapt(settings, params, spec, key)``: the adapted tree, where ``adapt(params, spec, key)`` is not it (one
  spec per adapter); ``routes(settings)``: the adapters rows go to and where their rows come from (``Route``);
  ``tasks(settings)``: how many adapters rows are routed to; ``route_mean``: the loss is each route's mean over
  its rows, summed (each adapter trains as if alone); ``clip(max_norm)``: the gradient clipping;
- ``check(settings, total_steps)``: refuse bad settings (``ValueError("field: ...")``); ``lora_shaped``: its
  nodes are LoRA's A, B over W (inits that set them from W apply).

A loop (the app's, or a user's) calls the hooks and never names a variant. A variant registers its recipe
from its own module (``lorax_variants/variants/<name>.py``) with ``register_recipe``.

Initializations are registered the same way (``InitRecipe``, ``register_init``): an init's settings (the
config section ``adapter.<init>``), the ``AdapterSpec.init`` its adapters are first built with, and its hooks:
``from_data(settings, tree, data)`` runs over the first training batches (``InitData``: the loop's loss,
forward, batches), ``on_quantized(settings, params, spec, qspec, key)`` builds adapters and quantized bases
together; flags say what it needs (a LoRA-shaped variant, a quantized or a full-precision base, one host)
and whether it moves the frozen base (an adapter export then writes its initial factors).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax

from lorax_variants.spec import AdapterSpec

__all__ = ["Recipe", "OptimContext", "Reshape", "RECIPES", "recipe", "register_recipe", "plain_optimizer", "Route",
           "InitRecipe", "InitData", "INITS", "init_recipe", "register_init"]


@dataclasses.dataclass(frozen=True)
class Route:
    """Where an adapter's rows come from: a ``task`` label of ``data.task_field`` or a ``source`` file."""

    name: str
    task: str | None
    source: str | None


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


def plain_optimizer(settings: Any, ctx: OptimContext) -> optax.GradientTransformation:
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
    optimizer: Callable[[Any, OptimContext], optax.GradientTransformation] = plain_optimizer
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
    # the report figures of the variant's own, by kind: rank_allocation (ranks rows), active_ranks (ranks rows),
    # layer_importance (rows under the variant's name), tasks (per-task eval), magnitude_direction (ΔM/ΔD)
    figures: tuple[str, ...] = ()
    routed: bool = False  # each example goes to one of several adapters: the data must say which (a task field)
    adapt: Callable[[Any, Any, AdapterSpec, jax.Array], Any] | None = None
    routes: Callable[[Any], list[Route]] | None = None
    route_mean: bool = False
    clip: Callable[[float], optax.GradientTransformation] = optax.clip_by_global_norm
    tasks: Callable[[Any], int] | None = None  # routed: how many adapters rows go to (without ``routes``)
    check: Callable[[Any, int], None] | None = None  # settings against the run's total steps: ValueError("field: ...")
    lora_shaped: bool = False  # its nodes are LoRA's A, B over W: inits that set A, B from W (LoftQ) apply
    moves_base: bool = False  # training changes the frozen base weights (no adapter file alone carries the result)

    def defaults(self) -> Any:
        """The settings with their defaults (``None`` for a variant without settings)."""
        return self.settings() if self.settings is not None else None


RECIPES: dict[str, Recipe] = {}


def register_recipe(r: Recipe) -> Recipe:
    """Register a variant's recipe under ``r.name`` (a variant module does this for itself)."""
    RECIPES[r.name] = r
    return r


register_recipe(Recipe("none", None))  # no adapters: only the leaves named as extra train


def recipe(name: str) -> Recipe:
    """The recipe of variant ``name``; an unknown name is an error listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(RECIPES)}")
    return RECIPES[name]


@dataclasses.dataclass(frozen=True)
class InitData:
    """What an init that reads training data gets from the loop: ``loss(tree, batch)`` (the batch's mean loss,
    no dropout), ``forward(tree, batch)`` (the model's output on a host batch), ``token_mask(batch)`` ([B, T]
    tokens the loss covers), ``global_batches(n)`` (the first n training batches, placed on the mesh),
    ``host_batches(n)`` (this host's first n, at most as many as there are), ``seed`` (``adapter.seed``)."""

    loss: Callable[[Any, Any], jax.Array]
    forward: Callable[[Any, Any], Any]
    token_mask: Callable[[Any], np.ndarray]
    global_batches: Callable[[int], list[Any]]
    host_batches: Callable[[int], list[Any]]
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class InitRecipe:
    """An adapter initialization for a training loop (see the module docstring).

    ``built_as``: the ``AdapterSpec.init`` the adapters are built with before the hooks run. ``full_weights``:
    the adapted weights are read in full precision and quantized after the init (their bases are the init's
    residual). ``moves_base``: the init changes the frozen base (PEFT export writes the initial factors, PEFT's
    conversion to LoRA on the original base). ``peft_reruns``: PEFT re-runs the init on the base when it loads
    an adapter saved with ``init_lora_weights=<name>``, so such an export needs no initial factors. ``lora_only``: LoRA-shaped, unrouted variants only;
    ``needs_quant`` / ``refuses_quant``: a quantized base is required / refused; ``single_host``: one process
    only. ``check(settings, adapter_config)``: refuse what the init cannot do (``ValueError("field: ...")``);
    ``describe(settings)``: the log line after it ran."""

    name: str
    settings: type | None = None
    built_as: str = "kaiming"
    from_data: Callable[[Any, Any, InitData], Any] | None = None
    on_quantized: Callable[[Any, Any, AdapterSpec, Any, jax.Array], Any] | None = None
    full_weights: bool = False
    moves_base: bool = False
    peft_reruns: bool = False
    lora_only: bool = False
    needs_quant: bool = False
    refuses_quant: bool = False
    single_host: bool = False
    check: Callable[[Any, Any], None] | None = None
    describe: Callable[[Any], str] | None = None

    def defaults(self) -> Any:
        """The settings with their defaults (``None`` for an init without settings)."""
        return self.settings() if self.settings is not None else None


INITS: dict[str, InitRecipe] = {}


def register_init(r: InitRecipe) -> InitRecipe:
    """Register an initialization under ``r.name`` (its module does this for itself)."""
    INITS[r.name] = r
    return r


def init_recipe(name: str) -> InitRecipe:
    """The init registered as ``name``; an unknown name is an error listing the known ones."""
    if name not in INITS:
        raise ValueError(f"unknown adapter init {name!r}; choose from {sorted(INITS)}")
    return INITS[name]


# The random inits AdapterSpec builds itself (A drawn, B = 0; lorax_variants.inits); those that take A, B from
# the weight (PiSSA, OLoRA) and the data-driven ones register from their modules in variants/.
register_init(InitRecipe("kaiming"))
register_init(InitRecipe("gaussian", built_as="gaussian"))
