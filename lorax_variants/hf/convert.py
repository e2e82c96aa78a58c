"""Tensors of an HF checkpoint -> our params tree, and the exact inverse (``to_hf``).

Stacked leaves are filled layer by layer into one preallocated array, so peak host memory is
the params plus one tensor. Every mismatch is an error naming the tensor: missing tensors,
unexpected tensors, wrong shapes, tied copies that differ from the weight they should equal.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.hf import names
from lorax_variants.nodes.base import Node
from lorax_variants.tree import leaves_with_paths

__all__ = ["params_from_hf", "to_hf"]


def _indices(template: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The stacked positions of a template's tensors: ``(i,)`` per layer, ``(i, e)`` per layer and expert."""
    if "{e}" in template:
        return [(i, e) for i in range(shape[0]) for e in range(shape[1])]
    return [(i,) for i in range(shape[0])] if "{i}" in template else [()]


def _name(template: str, idx: tuple[int, ...]) -> str:
    return template.format(**dict(zip(("i", "e"), idx))) if idx else template


def _set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def params_from_hf(
    model: Any,
    tensors: Mapping[str, np.ndarray],
    dtype: Any = None,
    leaf_fn: Callable[[str, np.ndarray], Any] | None = None,
    per_tensor: Callable[[str], Callable[[np.ndarray], Any] | None] | None = None,
    fill: Callable[[str], Any] | None = None,
    prequantized: tuple[Callable[[str], Any], set[str]] | None = None,
) -> dict[str, Any]:
    """Build ``model``'s params from HF-named tensors (numpy, torch layout).

    ``dtype``: cast every tensor (None keeps the checkpoint's). ``leaf_fn(path, array)``
    transforms each finished leaf (e.g. ``jnp.asarray``) before the next is read.
    ``per_tensor(path)`` may return a function applied to each 2-D tensor of that leaf as it is
    read (one layer at a time, e.g. quantization), whose results are stacked over layers: peak
    host memory is then the transformed params plus one full-precision tensor.
    ``fill(path)`` may supply a leaf whose tensors are all absent (a new task head); it returns
    None for leaves that must come from the checkpoint. ``prequantized = (node_of, companions)``: a
    quantized checkpoint's weights as ``QuantizedNode``s (``node_of(name)``, None for plain tensors) and
    the names of their scale and state tensors (see ``hf.bnb``).
    """
    available = list(tensors)
    prefix = names.prefix_of(model, available)
    tab = names.table(model, prefix)
    want = dict(names.shape_items(model.shapes()))
    needed = {}
    positions = {}
    for path, (template, _) in tab.items():
        positions[path] = _indices(template, want[path])
        needed[path] = [_name(template, idx) for idx in positions[path]]
    filled = {}
    if fill is not None:
        for path, ns in list(needed.items()):
            if not any(n in tensors for n in ns) and (value := fill(path)) is not None:
                filled[path] = value
                del needed[path]
    missing = [n for ns in needed.values() for n in ns if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint for {model.config.model_type} is missing {len(missing)} tensor(s): {missing[:8]}")
    used = {n for ns in needed.values() for n in ns} | (prequantized[1] if prequantized else set())
    node_of = prequantized[0] if prequantized else (lambda name: None)
    tied = names.tied(model)
    ignore = names.ignorable(model, prefix)
    unexpected = [n for n in available if n not in used and n not in tied and not any(p.fullmatch(n) for p in ignore)]
    if unexpected:
        raise ValueError(
            f"checkpoint for {model.config.model_type} (task {getattr(model, 'task', 'causal_lm')!r}) has "
            f"{len(unexpected)} unexpected tensor(s): {unexpected[:8]}"
        )
    params: dict[str, Any] = {}
    for path, value in filled.items():
        _set_path(params, path, value)
    for path, (template, kind) in tab.items():
        if path in filled:
            continue
        shape = want[path]
        fn = per_tensor(path) if per_tensor else None
        out = None
        done = []
        for idx, name in zip(positions[path], needed[path]):
            pre = node_of(name)
            if pre is not None and out is not None:
                raise ValueError(f"{path}: some layers of it are quantized in the checkpoint ({name!r}) and some are not")
            if pre is not None:
                if tuple(pre.in_out) != tuple(shape[-2:]) or kind != "linear":
                    raise ValueError(f"quantized tensor {name!r} holds a weight {pre.in_out[::-1]} (torch layout); "
                                     f"{path} needs {tuple(shape[-2:])[::-1]}")
                done.append(pre)
                continue
            if done and fn is None:
                raise ValueError(f"{path}: some layers of it are quantized in the checkpoint and {name!r} is not")
            t = np.asarray(tensors[name])
            t = t.T if kind == "linear" else t
            got = tuple(shape[: len(idx)]) + t.shape
            if got != tuple(shape):
                layout = " (torch stores Linear weights [out, in]; ours are [in, out])" if kind == "linear" else ""
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(tensors[name].shape)}, which does not fit {path} "
                    f"of shape {tuple(shape)}{layout}"
                )
            target = np.dtype(dtype) if dtype is not None else t.dtype
            if fn is not None:
                done.append(fn(t.astype(target)))
                continue
            if not idx:
                out = t.astype(target)
                break
            if out is None:
                out = np.empty(shape, target)
            out[idx] = t
        if fn is not None or done:
            lead = tuple(shape[: len(positions[path][0])])
            leaf = done[0] if not lead else jax.tree.map(
                lambda *xs: jnp.stack(xs).reshape(lead + xs[0].shape), *done)
            _set_path(params, path, leaf)
            continue
        _set_path(params, path, leaf_fn(path, out) if leaf_fn else out)
    for name, path in tied.items():
        if name in tensors:
            ours = dict(leaves_with_paths(params, nodes_are_leaves=True))[path]
            ours = ours.merge() if isinstance(ours, Node) else ours
            if np.asarray(tensors[name]).shape != np.asarray(ours).shape or not np.array_equal(
                np.asarray(tensors[name], np.float32), np.asarray(ours, np.float32)
            ):
                raise ValueError(f"tensor {name!r} should be tied to {path} but differs from it: untied heads are not "
                                 f"supported for this config (set tie_word_embeddings=False where the model allows)")
    return params


def to_hf(model: Any, params: Any) -> dict[str, np.ndarray]:
    """Our params -> ``{hf_name: numpy array}`` in torch layout, as transformers names them."""
    nodes = [p for p, x in leaves_with_paths(params, nodes_are_leaves=True) if isinstance(x, Node)]
    if nodes:
        raise ValueError(f"to_hf needs plain params; these are adapter/quantized nodes: {nodes[:5]} "
                         "(merge them first with lorax_variants.merge)")
    leaves = dict(leaves_with_paths(params))
    tab = names.table(model, names.default_prefix(model), untied_head=names.untied_head(model, leaves))
    missing = sorted(set(tab) - set(leaves))
    if missing:
        raise ValueError(f"params lack {missing[:8]} for {model.config.model_type}")
    unknown = sorted(set(leaves) - set(tab))
    if unknown:  # never dropped without a word
        raise ValueError(f"params hold {unknown[:8]}, which {model.config.model_type} has no tensor for")
    out: dict[str, np.ndarray] = {}
    for path, (template, kind) in tab.items():
        arr = np.asarray(leaves[path])
        for idx in _indices(template, arr.shape):
            x = arr[idx]
            out[_name(template, idx)] = np.ascontiguousarray(x.T if kind == "linear" else x)
    return out
