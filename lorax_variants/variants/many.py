"""Many adapters over one frozen weight, trained together: k named adapters of their own ranks and
variants (LoRA or DoRA, any mix), each example of a batch routed to one of them or to none.

    y_e = x_e W + s_t (x_e A_t) B_t                                   (adapter t_e = t is LoRA)
    y_e = x_e W + (m_t/n_t − 1) ⊙ x_e W + (m_t/n_t) ⊙ s_t (x_e A_t) B_t   (DoRA, n_t = ‖W + s_t A_t B_t‖_c)
    y_e = x_e W                                                        (t_e = BASE = −1)

Each example's tokens meet only their own adapter's factors, so the low-rank FLOPs are those of one
adapter over the batch, whatever k. Two ways, chosen by ``impl``:

- ``"gather"`` (what ``"auto"`` takes): each example gathers its adapter's A and B (padded to the largest
  rank) and the rank-r products are batched matmuls over examples (Punica's BGMV). Any order of examples.
- ``"ragged"``: examples sorted by adapter (``sort_by_adapter``; rows of BASE last), the tokens of each
  adapter one group of ``jax.lax.ragged_dot`` (a grouped matmul, native in XLA:TPU and GPU). XLA:CPU
  computes ragged_dot as every group over every row; compiled for a TPU v5p (``bench_multi_adapter.py
  --tpu v5p``) the ragged step is charged 18% more FLOPs than k separate steps at k = 16 where the gather
  step is within 1.2%, so ``"auto"`` does not take it (an accelerator measurement could change that).
  Unsorted ids under ``jit`` give NaN outputs (never a silently wrong result); concrete ids are checked.
- ``"masked"``: every adapter over every row, each row keeping its own (k dense rank-r passes): the
  formulation the others avoid, kept as the benchmark's baseline; never chosen by ``"auto"``.

Adapters keep their own leaves (``lora_a[i] [..., in, r_i]``, ``lora_b[i]``, DoRA's ``magnitude[i]``):
gradients, optimizer state and checkpoints see each at its own rank, and an adapter absent from this
weight is ``None``. ``pick(tree, name)`` gives one adapter as a plain LoRA/DoRA tree (merge, export).

Many adapters trained at once over one frozen model (``nodes.multi.MultiAdapterNode`` at each weight).

    tree = lv.adapters(params, {"legal": AdapterSpec(targets=..., r=8),
                                "med": AdapterSpec(targets=..., r=32, variant="dora")}, key)
    tree = lv.route(tree, ids)                  # per example: 0 = "legal", 1 = "med", -1 = base only
    loss = per_adapter_mean(...)                # each adapter's gradient = training it alone on its rows
    lv.pick(tree, "med")                        # one adapter as a plain DoRA tree: merge, PEFT export

Each adapter is built by ``adapt`` with its own spec (rank, alpha, variant LoRA or DoRA, targets, init)
and key ``fold_in(key, i)``, exactly the tree ``adapt`` would give it alone; ``join_trees`` joins trees
adapted (or trained) separately over the same base.

Gradient clipping per adapter when many adapters train together (``lv.adapters``), an Optax transformation.

``optax.clip_by_global_norm`` over a tree of k adapters would scale every adapter by the norm of all of them:
one adapter's large gradient would shrink the others' steps. Here each adapter (its A, B and DoRA magnitude in
every weight) is clipped by its own global norm, the leaves outside the adapters (a head, biases) by theirs:

    g_i ← g_i · min(1, max_norm / ‖g_i‖)      for each adapter i, and for the other leaves together

so, with a per-adapter mean loss (``lv.adapter_means``) and an elementwise optimizer (Adam, Lion, SGD), each
adapter's update is the one it would get trained alone on its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_variants.adapt import adapt
from lorax_variants.nodes.base import AdapterNode, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout
from lorax_variants.recipes import Recipe, Route, register_recipe
from lorax_variants.registry import rewrites_base
from lorax_variants.spec import AdapterSpec
from lorax_variants.tree import leaves_with_paths, map_with_paths
from lorax_variants.variants.dora import DoraNode
from lorax_variants.variants.lora import LoraNode

__all__ = ['MultiAdapterNode', 'adapters', 'join_trees', 'pick', 'adapter_names', 'adapter_means',
           'clip_by_adapter_norm', 'Many', 'ManyAdapter']


IMPLS = ("auto", "gather", "ragged", "masked")


@node
class MultiAdapterNode(AdapterNode):
    """k named adapters (LoRA or DoRA, each its own rank and scale) over one frozen ``weight``."""

    variant: ClassVar[str] = "multi"

    weight: Any = frozen()
    lora_a: tuple = param()  # per adapter [..., in, r_i] or None
    lora_b: tuple = param()  # per adapter [..., r_i, out] or None
    magnitude: tuple = param()  # per adapter: DoRA's m [..., out], None for LoRA (or absent)
    weight_sq_norm: jax.Array | None = frozen(default=None)  # ‖W‖² per output unit when any adapter is DoRA
    adapter_ids: jax.Array | None = frozen(default=None)  # int32 [..., batch], per call (``route``)
    dropout_key: jax.Array | None = frozen(default=None)
    names: tuple[str, ...] = static()
    kinds: tuple[str | None, ...] = static()  # "lora" | "dora" | None (absent here)
    scales: tuple[float, ...] = static()
    dropout: float = static(default=0.0)
    impl: str = static(default="auto")

    @property
    def n_routes(self) -> int:
        return len(self.names)

    def routed(self, ids: jax.Array) -> "MultiAdapterNode":
        """This node with each example's adapter index set (``ids`` [batch]; −1: none)."""
        return self.replace(adapter_ids=jnp.broadcast_to(ids, self.shape[:-2] + ids.shape))

    def _rank(self) -> int:
        return max([a.shape[-1] for a in self.lora_a if a is not None] + [1])

    def _stacks(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """``A [k+1, in, R]`` and ``s·B [k+1, R, out]``: every adapter padded to the largest rank R, the last
        slot zeros (rows routed to none)."""
        d_in, d_out = self.shape[-2:]
        rank = self._rank()
        a_s, b_s = [], []
        for a, b, s in zip(self.lora_a, self.lora_b, self.scales):
            if a is None:
                a_s.append(jnp.zeros((d_in, rank), dtype))
                b_s.append(jnp.zeros((rank, d_out), dtype))
                continue
            pad = rank - a.shape[-1]
            a_s.append(jnp.pad(a.astype(dtype), ((0, 0), (0, pad))))
            b_s.append(jnp.pad(b.astype(dtype) * jnp.asarray(s, dtype), ((0, pad), (0, 0))))
        a_s.append(jnp.zeros((d_in, rank), dtype))
        b_s.append(jnp.zeros((rank, d_out), dtype))
        return jnp.stack(a_s), jnp.stack(b_s)

    def _ratios(self) -> jax.Array | None:
        """DoRA's m/‖W + s·A B‖_c per adapter ``[k+1, out]`` float32 (1 for LoRA, absent and none rows)."""
        if "dora" not in self.kinds:
            return None
        w = weight_of(self.weight).astype(jnp.float32)
        rows = []
        for kind, a, b, m, s in zip(self.kinds, self.lora_a, self.lora_b, self.magnitude, self.scales):
            if kind != "dora":
                rows.append(jnp.ones(self.shape[-1:], jnp.float32))
                continue
            norm = DoraNode(weight=w, lora_a=a, lora_b=b, magnitude=m, weight_sq_norm=self.weight_sq_norm,
                            scale=s).norm()
            rows.append(m.astype(jnp.float32) / norm)
        rows.append(jnp.ones(self.shape[-1:], jnp.float32))
        return jnp.stack(rows)

    def resolved_impl(self) -> str:
        """The implementation ``apply`` takes: ``impl``, ``"gather"`` for ``"auto"`` (see the module docstring)."""
        return "gather" if self.impl == "auto" else self.impl

    def apply(self, x: jax.Array) -> jax.Array:
        """Each example through its own adapter (or none): see the module docstring."""
        if len(self.shape) != 2:
            raise ValueError(f"apply a stacked multi-adapter weight {self.shape} one layer at a time (scan)")
        if self.adapter_ids is None:
            raise ValueError(f"multi-adapter weight ({', '.join(self.names)}) without routing: call "
                             "route(tree, adapter_ids) before the forward")
        ids = self.adapter_ids
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"route() gave {ids.shape[0]} adapter ids for a batch of {x.shape[0]}")
        k = self.n_routes
        slot = jnp.where(ids < 0, k, jnp.minimum(ids, k - 1)).astype(jnp.int32)
        a_stack, b_stack = self._stacks(x.dtype)
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        x3 = xd.reshape(x.shape[0], -1, x.shape[-1])
        if self.resolved_impl() == "ragged":
            per_row = x3.shape[1]
            sizes = jnp.bincount(slot, length=k + 1).astype(jnp.int32) * per_row
            flat = x3.reshape(-1, x.shape[-1])
            h = jax.lax.ragged_dot(flat, a_stack, sizes)
            low = jax.lax.ragged_dot(h, b_stack, sizes).reshape(x3.shape[:2] + (-1,))
            ordered = jnp.all(slot[1:] >= slot[:-1])
            low = jnp.where(ordered, low, jnp.nan)  # unsorted rows: loud, never silently wrong
        elif self.resolved_impl() == "gather":
            a = jnp.take(a_stack, slot, axis=0)  # [batch, in, R]
            b = jnp.take(b_stack, slot, axis=0)  # [batch, R, out]
            low = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x3, a), b)
        elif self.resolved_impl() == "masked":  # every row times every adapter's A, the others' ranks masked to zero
            rank = a_stack.shape[-1]
            a_all = jnp.transpose(a_stack, (1, 0, 2)).reshape(x.shape[-1], -1)  # [in, (k+1)·R]
            keep = jnp.repeat(jax.nn.one_hot(slot, k + 1, dtype=x.dtype), rank, axis=-1)  # [batch, (k+1)·R]
            low = jnp.matmul(jnp.matmul(x3, a_all) * keep[:, None, :], b_stack.reshape(-1, b_stack.shape[-1]))
        else:
            raise ValueError(f"MultiAdapterNode.impl must be one of {IMPLS}, got {self.impl!r}")
        y = dense(x, self.weight)
        ratios = self._ratios()
        if ratios is None:
            return y + low.reshape(y.shape)
        r = jnp.take(ratios, slot, axis=0).astype(x.dtype)[:, None, :]  # [batch, 1, out]
        y3 = y.reshape(x3.shape[:2] + (-1,))
        base_d = y3 if xd is x else dense(x3, self.weight)
        return (y3 + (r - 1) * base_d + r * low).reshape(y.shape)

    def as_one(self, name: str) -> Any:
        """Adapter ``name`` alone: a ``LoraNode`` or ``DoraNode`` over the same weight (the weight itself where
        the adapter is absent)."""
        if name not in self.names:
            raise ValueError(f"no adapter named {name!r}; adapters: {list(self.names)}")
        i = self.names.index(name)
        kind = self.kinds[i]
        if kind is None:
            return self.weight
        common = dict(weight=self.weight, lora_a=self.lora_a[i], lora_b=self.lora_b[i], scale=self.scales[i],
                      dropout=self.dropout)
        if kind == "dora":
            return DoraNode(**common, magnitude=self.magnitude[i], weight_sq_norm=self.weight_sq_norm)
        return LoraNode(**common)

    def with_weight(self, weight: Any) -> "MultiAdapterNode":
        """Over another frozen weight of the same shape (each DoRA adapter keeps its ratio m/‖·‖)."""
        if "dora" not in self.kinds:
            return self.replace(weight=weight)
        moved = [self.as_one(n).with_weight(weight) if k == "dora" else None for n, k in zip(self.names, self.kinds)]
        mags = tuple(m.magnitude if m is not None else None for m in moved)
        sq = next(m.weight_sq_norm for m in moved if m is not None)
        return self.replace(weight=weight, magnitude=mags, weight_sq_norm=sq)

    def merge(self) -> jax.Array:
        """Refused: k adapters have no single dense weight (``pick(tree, name)`` then ``merge``)."""
        raise ValueError(f"a multi-adapter weight ({', '.join(self.names)}) has no single merged weight: "
                         "merge(pick(tree, name)) merges one of them")


def join(path: str, nodes: dict[str, Any], impl: str = "auto") -> Any:
    """One ``MultiAdapterNode`` at ``path`` from each adapter's node there (``LoraNode``/``DoraNode``, or the
    plain weight where that adapter leaves ``path`` alone); every node must stand over the same weight."""
    adapted = {n: x for n, x in nodes.items() if isinstance(x, AdapterNode)}
    if not adapted:
        return next(iter(nodes.values()))
    first = next(iter(adapted.values()))
    names, kinds, a_s, b_s, m_s, scales = [], [], [], [], [], []
    sq = None
    for name, x in nodes.items():
        names.append(name)
        if not isinstance(x, AdapterNode):
            kinds.append(None), a_s.append(None), b_s.append(None), m_s.append(None), scales.append(0.0)
            continue
        if type(x) not in (LoraNode, DoraNode) or getattr(x, "freeze", ()):
            raise ValueError(f"{path}: adapter {name!r} is a {type(x).__name__}; many adapters at once take LoRA "
                             "and DoRA adapters")
        if x.shape != first.shape or not _same(x.weight, first.weight):
            raise ValueError(f"{path}: adapter {name!r} stands over another base weight than "
                             f"{next(iter(adapted))!r}; adapters trained together share the frozen weights")
        kinds.append("dora" if isinstance(x, DoraNode) else "lora")
        a_s.append(x.lora_a), b_s.append(x.lora_b), scales.append(float(x.scale))
        m_s.append(x.magnitude if isinstance(x, DoraNode) else None)
        if isinstance(x, DoraNode):
            sq = x.weight_sq_norm
    rates = {float(x.dropout) for x in adapted.values()}
    if len(rates) > 1:
        raise ValueError(f"{path}: adapters trained together share one dropout rate, got {sorted(rates)}")
    return MultiAdapterNode(weight=first.weight, lora_a=tuple(a_s), lora_b=tuple(b_s), magnitude=tuple(m_s),
                            weight_sq_norm=sq, names=tuple(names), kinds=tuple(kinds), scales=tuple(scales),
                            dropout=rates.pop(), impl=impl)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if x is y:
            continue
        if x.shape != y.shape:
            return False
        if not all(isinstance(v, (jax.Array, np.ndarray)) and not isinstance(v, jax.core.Tracer) for v in (x, y)):
            continue  # abstract (planning, tracing): shapes were compared; values cannot be
        if not bool(jnp.array_equal(x, y)):
            return False
    return True


def adapters(params: Any, specs: Mapping[str, AdapterSpec], key: Any, *, impl: str = "auto") -> Any:
    """``params`` with every weight any spec targets replaced by a ``MultiAdapterNode`` holding each named
    adapter (``specs`` in order: adapter i is ``route`` index i). Specs may target different weights and use
    variants ``lora``/``dora`` with any rank; a spec's own errors name its adapter."""
    if not specs:
        raise ValueError("adapters() needs at least one named AdapterSpec")
    key = jax.random.PRNGKey(key) if isinstance(key, int) else key
    trees = {}
    for i, (name, spec) in enumerate(specs.items()):
        if spec.variant not in ("lora", "dora"):
            raise ValueError(f"adapter {name!r}: variant {spec.variant!r}; many adapters at once take 'lora' and "
                             "'dora'")
        if rewrites_base(spec):
            raise ValueError(f"adapter {name!r}: init {spec.init!r} rewrites the base weight, which the adapters "
                             "share")
        try:
            trees[name] = adapt(params, spec, jax.random.fold_in(key, i))
        except ValueError as e:
            raise ValueError(f"adapter {name!r}: {e}") from None
    return join_trees(trees, impl=impl)


def join_trees(trees: Mapping[str, Any], *, impl: str = "auto") -> Any:
    """Separately adapted (or trained) trees over the same base -> one tree of ``MultiAdapterNode``s."""
    names = list(trees)
    flat = {n: dict(leaves_with_paths(t, nodes_are_leaves=True)) for n, t in trees.items()}
    first = trees[names[0]]

    def one(path: str, x: Any) -> Any:
        at = {n: flat[n].get(path) for n in names}
        missing = [n for n, v in at.items() if v is None]
        if missing:
            raise ValueError(f"{path}: the trees of adapters {missing} have no leaf there; join trees of one model")
        if not any(isinstance(v, AdapterNode) for v in at.values()):
            return x
        return join(path, at, impl=impl)

    return map_with_paths(one, first, nodes_are_leaves=True)


def adapter_names(tree: Any) -> tuple[str, ...]:
    """The adapters' names, in route order (from the first ``MultiAdapterNode``)."""
    for _, x in leaves_with_paths(tree, nodes_are_leaves=True):
        if isinstance(x, MultiAdapterNode):
            return x.names
    raise ValueError("the tree has no multi-adapter weights")


def pick(tree: Any, name: str) -> Any:
    """Adapter ``name`` alone: every ``MultiAdapterNode`` as that adapter's ``LoraNode``/``DoraNode`` (its plain
    weight where the adapter leaves it alone). Merge, export and evaluate one adapter with it."""
    names = adapter_names(tree)
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; adapters: {list(names)}")
    return map_with_paths(lambda p, x: x.as_one(name) if isinstance(x, MultiAdapterNode) else x, tree,
                          nodes_are_leaves=True)


def adapter_means(sums: jax.Array, counts: jax.Array, routes: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """``(means [n], counts [n])``: per adapter, the summed loss of its rows over their count (tokens or
    examples; rows routed to BASE count for none). ``jnp.sum(means)`` as the loss gives each adapter the
    gradient of training it alone on its rows with a mean loss, whatever the others' share of the batch."""
    onehot = jax.nn.one_hot(routes, n, dtype=jnp.float32)  # BASE (-1) rows: all zeros
    total = onehot.T @ sums.astype(jnp.float32)
    count = onehot.T @ counts.astype(jnp.float32)
    return total / jnp.maximum(count, 1.0), count


OTHER = -1  # the label of leaves outside every adapter


def adapter_labels(tree: Any) -> Any:
    """``tree`` with each leaf replaced by its adapter's index (``OTHER`` = −1 outside the adapters)."""
    def label(x: Any) -> Any:
        if not isinstance(x, MultiAdapterNode):
            return OTHER
        fields = {f: tuple(None if v is None else jax.tree.map(lambda _, i=i: i, v) for i, v in enumerate(getattr(x, f)))
                  for f in ("lora_a", "lora_b", "magnitude")}
        return jax.tree.map(lambda _: OTHER, x).replace(**fields)

    return jax.tree.map(label, tree, is_leaf=lambda x: isinstance(x, MultiAdapterNode))


def clip_by_adapter_norm(max_norm: float) -> optax.GradientTransformation:
    """``clip_by_global_norm`` applied to each adapter of a many-adapter tree on its own (and to the leaves
    outside the adapters together)."""
    def init(params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        leaves, treedef = jax.tree.flatten(updates)
        labels = jax.tree.leaves(adapter_labels(updates))
        if len(labels) != len(leaves):
            raise ValueError("clip_by_adapter_norm: the labels do not match the gradient tree's leaves")
        squares: dict[int, jax.Array] = {}
        for x, k in zip(leaves, labels):
            squares[k] = squares.get(k, 0.0) + jnp.sum(jnp.square(x.astype(jnp.float32)))
        factor = {k: jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(s), 1e-30)) for k, s in squares.items()}
        clipped = [(x * factor[k]).astype(x.dtype) for x, k in zip(leaves, labels)]
        return jax.tree.unflatten(treedef, clipped), state

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
class Many:
    """Many adapters trained at once over one frozen model (``lv.adapters``), each example routed to its own."""

    adapters: list[ManyAdapter] = dataclasses.field(default_factory=list)
    impl: str = "auto"  # nodes.multi: gather (any row order; what auto takes) or ragged (ragged_dot over sorted rows)


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
    return adapters(params, specs, key, impl=s.impl)


register_recipe(Recipe("many", "lora", Many, adapt=_many_adapt, routes=_many_routes, route_mean=True,
                       clip=clip_by_adapter_norm, weight_changes=False, figures=("tasks",), routed=True))
