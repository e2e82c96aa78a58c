"""Multi-task adapters with per-example routing (the batched-gather idea of Punica / S-LoRA).

n LoRA adapters stacked per target, A [n, in, r], B [n, r, out]; each example of a batch uses
its own adapter, chosen by an index set on the tree with ``route(tree, task_ids)`` (per-call
state; ``BASE`` = -1 runs the base model only):

    y_e = x_e W + s · (x_e A[t_e]) B[t_e]          for example e with task t_e ≥ 0

The forward gathers each example's A and B (r-wide, no d x k) and equals running each example
alone with its own adapter. ``stack([lora_tree, ...])`` builds a stack from separately trained
LoRA trees; ``select(tree, k)`` is adapter k as plain LoRA (merge, export).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import AdapterNode, dense, frozen, node, param, static
from lorax_variants.nodes.factored import adapter_dropout
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.registry import Target, lora_factors, register_variant, rewrites_base, settings_of
from lorax_variants.spec import register_settings
from lorax_variants.tree import leaves_with_paths, map_with_paths
from lorax_variants.variants.lora import LoraNode

__all__ = ['MultiTaskNode', 'select', 'stack', 'MultiTask']




@node
class MultiTaskNode(AdapterNode):
    """``n_tasks`` LoRA adapters stacked over one ``weight`` (``lora_a`` [..., n, in, r], ``lora_b`` [..., n, r,
    out]); each example goes through the adapter ``task_ids`` names (``BASE``: the weight alone)."""

    variant: ClassVar[str] = "multitask"

    weight: Any = frozen()
    lora_a: jax.Array = param()  # [..., n, in, r]
    lora_b: jax.Array = param()  # [..., n, r, out]
    task_ids: jax.Array | None = frozen(default=None)  # int32 [..., batch], per call
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    @property
    def n_tasks(self) -> int:
        return self.lora_a.shape[-3]

    @property
    def n_routes(self) -> int:
        return self.n_tasks

    def routed(self, ids: jax.Array) -> "MultiTaskNode":
        """This node with each example's task index set (``ids`` [batch]; −1: the base model)."""
        return self.replace(task_ids=jnp.broadcast_to(ids, self.shape[:-2] + ids.shape))

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + s·(x A_t) B_t with t the adapter each row is routed to (``task_ids``; ``BASE`` rows get x W)."""
        if self.task_ids is None:
            raise ValueError("multi-task adapter without routing: call route(tree, task_ids) before the forward")
        ids = self.task_ids
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"route() gave {ids.shape[0]} task ids for a batch of {x.shape[0]}")
        use = jnp.clip(ids, 0, self.n_tasks - 1)
        a = jnp.take(self.lora_a, use, axis=0).astype(x.dtype)  # [batch, in, r]
        b = jnp.take(self.lora_b, use, axis=0).astype(x.dtype)  # [batch, r, out]
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        x3 = xd.reshape(x.shape[0], -1, x.shape[-1])
        h = jnp.einsum("bti,bir->btr", x3, a) * jnp.asarray(self.scale, x.dtype)
        low = jnp.einsum("btr,bro->bto", h, b) * (ids >= 0).astype(x.dtype)[:, None, None]
        y = dense(x, self.weight)
        return y + low.reshape(y.shape)

    reduces_to_lora: ClassVar[bool] = True

    def as_lora(self, task: int | None = None) -> LoraNode:
        """Adapter ``task`` as a plain ``LoraNode``."""
        if task is None:
            raise ValueError("a multi-task tree reduces to one task's adapter: pass task=k")
        if not 0 <= task < self.n_tasks:
            raise ValueError(f"task {task} out of range [0, {self.n_tasks})")
        lead = len(self.shape) - 2
        take = lambda m: jnp.take(m, task, axis=lead)  # noqa: E731
        return LoraNode(weight=self.weight, lora_a=take(self.lora_a), lora_b=take(self.lora_b), scale=self.scale,
                        dropout=self.dropout)

    def merge(self) -> jax.Array:
        """Refused unless one task is selected: a multi-task weight has no single dense form."""
        raise ValueError(f"a multi-task adapter ({self.n_tasks} tasks) has no single merged weight: "
                         "merge(select(tree, task)) merges one of them")


@register_variant("multitask")
def build_multitask(t: Target) -> MultiTaskNode:
    n = settings_of(t.spec).n_tasks
    keys = jax.random.split(t.key, n)
    if rewrites_base(t.spec):
        raise ValueError(f"{t.path}: {t.spec.init} rewrites the base weight; it cannot be shared by {n} task adapters")
    factors = [lora_factors(Target(**{**t.__dict__, "key": k})) for k in keys]
    lead = len(t.lead)
    a = jnp.stack([f[1] for f in factors], axis=lead)
    b = jnp.stack([f[2] for f in factors], axis=lead)
    return MultiTaskNode(weight=t.weight, lora_a=a, lora_b=b, scale=t.scale, dropout=t.spec.dropout)


def _nodes(tree: Any) -> list[tuple[str, MultiTaskNode]]:
    return [(p, x) for p, x in leaves_with_paths(tree, nodes_are_leaves=True) if isinstance(x, MultiTaskNode)]


def select(tree: Any, task: int) -> Any:
    """Adapter ``task`` of every multi-task node as a plain ``LoraNode``."""
    if not _nodes(tree):
        raise ValueError("select: the tree has no multi-task nodes")
    return map_with_paths(lambda p, x: x.as_lora(task) if isinstance(x, MultiTaskNode) else x, tree,
                          nodes_are_leaves=True)


def stack(trees: Sequence[Any]) -> Any:
    """Separately trained LoRA trees over the same base -> one tree of multi-task nodes."""
    if len(trees) < 2:
        raise ValueError("stack needs at least two LoRA trees")
    others = [dict(leaves_with_paths(t, nodes_are_leaves=True)) for t in trees[1:]]

    def join(path: str, x: Any) -> Any:
        if not isinstance(x, LoraNode):
            return x
        nodes = [x] + [o.get(path) for o in others]
        for i, n in enumerate(nodes):
            if not isinstance(n, LoraNode) or n.lora_a.shape != x.lora_a.shape or n.scale != x.scale:
                raise ValueError(f"{path}: tree {i} has no LoRA adapter of the same rank and scale to stack")
        lead = len(x.shape) - 2
        return MultiTaskNode(weight=x.weight, lora_a=jnp.stack([n.lora_a for n in nodes], axis=lead),
                             lora_b=jnp.stack([n.lora_b for n in nodes], axis=lead), scale=x.scale, dropout=x.dropout)

    return map_with_paths(join, trees[0], nodes_are_leaves=True)


@dataclasses.dataclass(frozen=True)
class MultiTask:
    """``n_tasks`` adapters per target; each row is routed to its task's adapter."""

    n_tasks: int = 1


def _check(s: MultiTask, total_steps: int) -> None:
    if s.n_tasks < 1:
        raise ValueError(f"n_tasks: must be at least 1, got {s.n_tasks}")


register_settings("multitask", MultiTask)
register_recipe(Recipe("multitask", "multitask", MultiTask, spec=lambda s: {"settings": s},
                       weight_changes=False, figures=("tasks",), routed=True, tasks=lambda s: s.n_tasks, check=_check))
