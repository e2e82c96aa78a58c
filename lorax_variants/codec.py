"""PEFT adapter formats as data. A variant that PEFT holds declares one ``PeftCodec`` in its own module: the
``peft_type``, one key table (per adapted module: the PEFT tensor's suffix <-> the node fields it holds, with the
layout change between PEFT's torch tensors and ours, both ways), the config fields it writes and how a PEFT
config becomes an ``AdapterSpec``. ``hf.peft`` (writing) and ``hf.peft_import`` (reading) walk the same table,
so a format is written and read from one description; neither names a variant.

Formats richer than one tensor per field (LoRA/DoRA: per-module ranks and scales; VeRA: projections shared
by every module; AdaLoRA: triplets truncated to the kept ranks) keep their key table (the tensors' suffixes,
read and written) and add hooks for what the table cannot say: ``write`` (the whole adapter's tensors and
config fields), ``residual`` / ``read`` / ``fill`` / ``finish`` (the config's init, the ``AdapterSpec``,
each node's fields, shared tensors). Without hooks the table alone does both ways.

Layouts: PEFT keeps one module per layer with torch's ``[out, in]`` weights; our nodes hold ``[..., in, out]``
stacked over layers. A key's ``encode`` gets one layer's field arrays and returns the PEFT tensor; ``decode``
is its inverse (a tuple, one array per field)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

__all__ = ["Key", "PeftCodec", "Site", "Refusal", "PREFIX", "module_tensor", "stack_layers", "register_codec", "codec_of", "codec_for", "transposed",
           "same", "peft_types", "fill_by_keys", "layers", "peft_alpha", "pattern_value"]

PREFIX = "base_model.model."  # where PEFT keeps the adapted model's modules


class Refusal(ValueError):
    """A PEFT config field (or a tensor standing for one) that a format cannot represent: ``field``, ``why``."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field, self.why = field, why


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted weight path as PEFT sees it: its HF module per layer (``None``: a layer without tensors on
    read), its node, ``lead`` stacked axes (0 or 1), whether it is an embedding, and (writing PiSSA/OLoRA)
    the node at initialization."""

    path: str
    modules: tuple[str | None, ...]
    node: Any
    lead: int
    embedding: bool = False
    initial: Any = None


def peft_alpha(scale: float, r: float) -> float:
    """PEFT's ``lora_alpha`` for a scale ``alpha / r`` (an integer where it is one, as PEFT's configs hold)."""
    alpha = scale * r
    return float(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 * max(1.0, abs(alpha)) else float(alpha)


def pattern_value(cfg: dict[str, Any], field: str, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a module name ending in it (a regex)."""
    import re

    for key, v in (cfg.get(field) or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return v
    return default


def layers(x: Any, lead: int) -> list[np.ndarray]:
    """An array of a node as one array per layer (``lead`` stacked axes: 0 or 1)."""
    import jax

    x = np.asarray(jax.device_get(x))
    return [x] if lead == 0 else [x[i] for i in range(x.shape[0])]


def transposed(x: np.ndarray) -> np.ndarray:
    """The last two axes swapped (torch ``[out, r]`` <-> our ``[r, out]``)."""
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def same(x: np.ndarray) -> np.ndarray:
    """Unchanged (a tensor PEFT and we lay out alike)."""
    return x


def _one(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    def decode(x: np.ndarray) -> tuple[np.ndarray, ...]:
        """The one field a tensor holds, laid out back as ours."""
        return (fn(x),)

    return decode


@dataclasses.dataclass(frozen=True)
class Key:
    """One PEFT tensor per adapted module: ``<module>.<suffix>`` holds node ``fields`` (one layer's worth).

    ``encode(*field_arrays) -> tensor`` writes it, ``decode(tensor) -> tuple of field arrays`` reads it back;
    by default one field, transposed both ways. ``dtype``: the tensor's dtype in the file (``float32``, or an
    integer type for indices)."""

    suffix: str
    fields: tuple[str, ...]
    encode: Callable[..., np.ndarray] = transposed
    decode: Callable[[np.ndarray], tuple[np.ndarray, ...]] = _one(transposed)
    dtype: str = "float32"
    aliases: tuple[str, ...] = ()  # other suffixes PEFT writes the same tensor under (read only)

    @classmethod
    def plain(cls, suffix: str, field: str, layout: Callable[[np.ndarray], np.ndarray] = transposed) -> Key:
        """A tensor holding one field, with ``layout`` applied both ways (``transposed`` or ``same``)."""
        return cls(suffix, (field,), layout, _one(layout))


@dataclasses.dataclass(frozen=True)
class PeftCodec:
    """A PEFT adapter format (see the module docstring).

    ``node``: the node class written in this format. ``config(node) -> dict``: the PEFT config fields that
    describe that node (all nodes of one adapter must agree). ``spec(cfg) -> dict``: ``AdapterSpec`` keyword
    arguments (``variant``, ``r``, ``settings``, ``dropout``, ...) from a PEFT config, refusing (``ValueError``
    naming the field) what the variant cannot represent. ``reads``: the config fields of this format that
    ``spec`` settles (others that are set are refused on import unless every format shares them).
    ``conv1d``: PEFT's layer of this format wraps GPT-2's ``Conv1D`` too (not only ``nn.Linear``).

    Hooks (see the module docstring), each replacing the table-driven default:

    - ``write(sites, conv1d) -> (config fields, tensors)``: tensors under their full names (``PREFIX`` +
      module + suffix, or a shared tensor's name);
    - ``residual(cfg) -> init or None``: the init PEFT re-runs on the base when it loads the adapter
      (``Refusal`` for one that cannot be recomputed);
    - ``read(cfg, found, tensors, experts, residual) -> (AdapterSpec keyword arguments, context)``;
      ``found``: our path -> layer -> HF module; ``experts``: expert-bank path -> (rank, scale);
    - ``fill(node, site, tensors, cfg, context) -> node``: the node's fields from the file;
    - ``finish(tree, cfg, tensors) -> tree``: tensors shared by every module (named in ``shared``).

    ``refused``: ``(suffix, field, why)`` of tensors that stand for a feature we do not represent."""

    peft_type: str
    node: type
    keys: tuple[Key, ...]
    config: Callable[[Any], dict[str, Any]] | None = None
    spec: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    reads: frozenset[str] = frozenset()
    conv1d: bool = True
    write: Callable[..., tuple[dict[str, Any], dict[str, np.ndarray]]] | None = None
    residual: Callable[[dict[str, Any]], str | None] | None = None
    read: Callable[..., tuple[dict[str, Any], Any]] | None = None
    fill: Callable[..., Any] | None = None
    finish: Callable[..., Any] | None = None
    shared: frozenset[str] = frozenset()
    refused: tuple[tuple[str, str, str], ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for k in self.keys for f in k.fields)

    @property
    def suffixes(self) -> tuple[str, ...]:
        """Every tensor suffix of the format (with a leading dot), longest first."""
        return tuple(sorted({f".{s}" for k in self.keys for s in (k.suffix, *k.aliases)}, key=len, reverse=True))


_BY_TYPE: dict[str, PeftCodec] = {}
_BY_NODE: dict[type, PeftCodec] = {}


def register_codec(codec: PeftCodec, node: type | None = None) -> PeftCodec:
    """Register ``codec`` for its PEFT type and its node class (a variant module calls this once); ``node``:
    another node class written in the same format (DoRA's, in LoRA's format)."""
    if codec.peft_type in _BY_TYPE and _BY_TYPE[codec.peft_type] is not codec:
        raise ValueError(f"a PEFT codec for {codec.peft_type} is already registered")
    _BY_TYPE[codec.peft_type] = codec
    _BY_NODE[node or codec.node] = codec
    return codec


def codec_of(node: Any) -> PeftCodec | None:
    """The codec that writes ``node``'s class, or None."""
    return _BY_NODE.get(type(node))


def codec_for(peft_type: Any) -> PeftCodec | None:
    """The codec that reads adapters of ``peft_type`` (``adapter_config.json``'s field), or None."""
    return _BY_TYPE.get(peft_type) if isinstance(peft_type, str) else None


def peft_types() -> tuple[str, ...]:
    """The PEFT types registered codecs read."""
    return tuple(sorted(_BY_TYPE))


def module_tensor(tensors: dict[str, np.ndarray], site: Site, module: str, suffix: str,
                  shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The file's tensor ``<PREFIX><module>.<suffix>``; a missing one, or one of another ``shape`` than this
    model's ``site`` needs, is an error naming it."""
    name = f"{PREFIX}{module}.{suffix}"
    if name not in tensors:
        raise ValueError(f"adapter tensor {name!r} is missing")
    if shape is not None and tuple(tensors[name].shape) != tuple(shape):
        raise ValueError(f"adapter tensor {name!r} has shape {tensors[name].shape}; {site.path} of this model needs "
                         f"{tuple(shape)} (an adapter for a different base model or rank?)")
    return tensors[name]


def stack_layers(site: Site, xs: list[np.ndarray], like: Any) -> Any:
    """A node field from its per-layer values (one per ``site.modules``): stacked over the layers of a stacked
    site, else the one value, in ``like``'s dtype."""
    import jax.numpy as jnp

    return jnp.asarray(np.stack(xs) if site.lead else xs[0], like.dtype)


def fill_by_keys(n: Any, codec: PeftCodec, site: Site, tensors: dict[str, np.ndarray]) -> Any:
    """``n`` with its codec's fields read from the file by the key table, layer by layer (a layer without
    tensors keeps the fresh adapter's values, which leave it equal to the base)."""
    own = {f: np.asarray(getattr(n, f)) for f in codec.fields}
    per: dict[str, list[np.ndarray]] = {f: [] for f in codec.fields}
    for i, m in enumerate(site.modules):
        for key in codec.keys:
            mine = [own[f][i] if site.lead else own[f] for f in key.fields]
            vals = mine
            if m is not None:
                name = f"{PREFIX}{m}.{key.suffix}"
                vals = [np.asarray(v) for v in key.decode(module_tensor(tensors, site, m, key.suffix))]
                for f, v, w in zip(key.fields, vals, mine):
                    if v.shape != w.shape:
                        raise ValueError(f"adapter tensor {name!r} {tensors[name].shape} gives {f} of shape {v.shape}; "
                                         f"{site.path} of this model needs {w.shape} (an adapter for a different base "
                                         "model or rank?)")
            for f, v in zip(key.fields, vals):
                per[f].append(v)
    return n.replace(**{f: stack_layers(site, v, getattr(n, f)) for f, v in per.items()})
