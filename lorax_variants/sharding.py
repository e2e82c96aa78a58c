"""Meshes, partition rules and the shardings of adapted trees.

A mesh has four axes, ``("data", "fsdp", "context", "tensor")``. Batches split over ``data x fsdp``; a
causal LM's sequence over ``context`` (context parallelism, ``models.context``: every chip holds a slice of
each row's tokens, attention gathers the keys and values);
weights split their input/output dimensions over ``fsdp`` and ``tensor`` by path rules
(Megatron-style: column-parallel projections put their output on ``tensor``, row-parallel ones
their input), so frozen weights are stored once across a slice of the mesh (ZeRO-3 / FSDP).

Adapter and quantized nodes derive their leaves' specs from the weight's, so a sharded base shards its adapters alike:
``lora_a [.., in, r]`` takes the weight's input axis, ``lora_b [.., r, out]`` its output axis,
NF4 codes ``[.., in/2, out]`` and block scales ``[.., in/bs, out]`` both. A dimension that does
not divide by its mesh axis stays unsplit (a tiny model on a big mesh still runs); leading
stacked-layer axes are never split, except an expert bank's expert axis, which goes over fsdp. Leaves no
rule names (norms, biases, routers) are replicated.
"""

from __future__ import annotations

import dataclasses

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lorax_variants.nodes.base import Node
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.shared import Shared
from lorax_variants.tree import map_with_paths

__all__ = ["AXES", "BATCH", "make_mesh", "RULES", "weight_spec", "tree_specs", "tree_shardings", "batch_sharding",
           "state_shardings", "to_host"]

AXES = ("data", "fsdp", "context", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both

# (path regex, spec of the last two dims [in, out]); first match wins. Covers every zoo model.
RULES: tuple[tuple[str, tuple[str | None, str | None]], ...] = (
    # Column-parallel: input over fsdp, output over tensor.
    (r"(.*/)?(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|intermediate|c_attn|c_fc|transform|pooler|dense)",
     ("fsdp", "tensor")),
    # Row-parallel: input over tensor, output over fsdp.
    (r"(.*/)?(o_proj|down_proj|out|output|c_proj|out_proj)", ("tensor", "fsdp")),
    (r"(.*/)?(embed|wte)", ("tensor", "fsdp")),  # [vocab, d]
    (r"(.*/)?lm_head", ("fsdp", "tensor")),  # [d, vocab]
    (r"(.*/)?(pos|token_type)", (None, "fsdp")),
    (r"(.*/)?classifier", ("fsdp", None)),  # [d, labels]
)
# Expert banks [L, E, in, out] (mixture-of-experts): the expert axis over fsdp (each device stores E/n
# experts, ZeRO-3 style), the ffn dimension over tensor.
EXPERT_AXIS = "fsdp"
EXPERT_RULES: tuple[tuple[str, tuple[str | None, str | None]], ...] = (
    (r"(.*/)?moe/(gate_proj|up_proj)", (None, "tensor")),
    (r"(.*/)?moe/down_proj", ("tensor", None)),
)


def expert_spec(path: str, shape: tuple[int, ...]) -> tuple[str | None, str | None] | None:
    """The (in, out) axes of an expert bank ``[L, E, in, out]`` at ``path``; None if it is not one."""
    if len(shape) < 4:
        return None
    return next((spec for pattern, spec in EXPERT_RULES if re.fullmatch(pattern, path)), None)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None, *,
              context: int = 1) -> Mesh:
    """A ``(data, fsdp, context, tensor)`` mesh over ``devices`` (all devices of all hosts by default).

    One size may be -1: it takes what the others leave. Devices are laid out data-major, so on
    several hosts the data axis spans hosts and fsdp/context/tensor stay within one where they fit
    (tensor, the chattiest, on the nearest devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
            raise ValueError(f"mesh.{name} must be a positive integer or -1, got {v!r}")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh {sizes} does not fit {len(devices)} devices: {len(devices)} is not divisible "
                             f"by the fixed axes' product {fixed}")
        sizes[free[0]] = len(devices) // fixed
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x context={sizes['context']} x "
                         f"tensor={sizes['tensor']} needs {int(np.prod(list(sizes.values())))} devices; there are "
                         f"{len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(*(sizes[a] for a in AXES))
    return Mesh(grid, AXES)


def _fit(dim: int, axis: str | None, mesh: Mesh) -> str | None:
    return axis if axis is not None and dim % mesh.shape[axis] == 0 else None


def weight_spec(path: str, shape: tuple[int, ...], mesh: Mesh,
                rules: Sequence[tuple[str, tuple[str | None, str | None]]] = RULES) -> tuple[str | None, str | None]:
    """The (in, out) axes of a weight of ``shape`` at ``path`` (before divisibility checks)."""
    if len(shape) < 2:
        return (None, None)
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            return spec
    return (None, None)  # norms, biases, anything unnamed: replicated


def _node_specs(path: str, n: Node, mesh: Mesh, rules: Any) -> Node:
    d_in, d_out = n.shape[-2:]
    lead = len(n.shape) - 2
    experts = expert_spec(path, n.shape)
    si, so = experts or weight_spec(path, n.shape, mesh, rules)

    def one(x: Any, quantized: bool) -> Any:
        if x is None or isinstance(x, Shared) or not hasattr(x, "shape"):
            return P()
        shape = tuple(x.shape)
        if len(shape) < lead + 1:
            return P()
        spec: list[str | None] = [None] * len(shape)
        if shape[-1] == d_out:
            spec[-1] = _fit(d_out, so, mesh)
        if len(shape) >= lead + 2 and (shape[-2] == d_in or (quantized and shape[-1] == d_out)):
            spec[-2] = _fit(shape[-2], si, mesh)
        if experts is not None and shape[lead - 1] == n.shape[lead - 1]:  # every leaf of a bank has the E axis
            spec[lead - 1] = _fit(shape[lead - 1], EXPERT_AXIS, mesh)
        return P(*spec)

    def walk(m: Node, quantized: bool) -> Node:
        changes = {}
        static = {f.name for f in dataclasses.fields(m) if f.metadata.get("static")}
        for name, value in vars(m).items():
            if name in static:
                continue
            if isinstance(value, Node):
                changes[name] = walk(value, isinstance(value, QuantizedNode))
            elif isinstance(value, jax.Array | np.ndarray | jax.ShapeDtypeStruct) or value is None:
                changes[name] = one(value, quantized) if value is not None else None
            elif isinstance(value, Shared):
                changes[name] = jax.tree.map(lambda _: P(), value)
            elif isinstance(value, tuple):  # one leaf per adapter (many adapters at once), None where absent
                changes[name] = tuple(None if v is None else one(v, quantized) for v in value)
        return m.replace(**changes)

    return walk(n, isinstance(n, QuantizedNode))


def tree_specs(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, tuple[str | None, str | None]]] = RULES) -> Any:
    """A PartitionSpec for every array leaf of ``tree`` (plain, node or abstract), same structure."""

    def one(path: str, x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, Node):
            return _node_specs(path, x, mesh, rules)
        if isinstance(x, Shared):
            return jax.tree.map(lambda _: P(), x)
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) < 2:
            return P()
        experts = expert_spec(path, shape)
        if experts is not None:
            return P(*([None] * (len(shape) - 3)), _fit(shape[-3], EXPERT_AXIS, mesh), _fit(shape[-2], experts[0], mesh),
                     _fit(shape[-1], experts[1], mesh))
        si, so = weight_spec(path, shape, mesh, rules)
        return P(*([None] * (len(shape) - 2)), _fit(shape[-2], si, mesh), _fit(shape[-1], so, mesh))

    return map_with_paths(one, tree, nodes_are_leaves=True)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, tuple[str | None, str | None]]] = RULES) -> Any:
    """``tree_specs`` as NamedShardings on ``mesh``."""
    specs = tree_specs(tree, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays ``[batch, ...]``: the batch axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def state_shardings(state: Any, params: Any, param_shardings: Any, default: NamedSharding) -> Any:
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path (and has its
    shape) takes that parameter's sharding (Adam's moments, AdaLoRA's EMAs, LoRA+'s per-group
    states); everything else (counts, schedules) gets ``default``.

    Works for any Optax chain, including transformations whose ``init`` must see real parameters.
    """
    table = {}
    for (kp, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings)):
        table[tuple(str(k) for k in kp)] = (tuple(x.shape), s)

    def one(kp: Any, x: Any) -> Any:
        keys = tuple(str(k) for k in kp)
        for i in range(len(keys)):
            hit = table.get(keys[i:])
            if hit is not None and hit[0] == tuple(getattr(x, "shape", ())):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(one, state)


def to_host(tree: Any) -> Any:
    """Every leaf as a full numpy array on every process (gathered across hosts where it spans them)."""
    from jax.experimental import multihost_utils

    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)
