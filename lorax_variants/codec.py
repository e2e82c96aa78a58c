"""PEFT adapter formats as data. A variant that PEFT holds declares one ``PeftCodec`` in its own module: the
``peft_type``, one key table (per adapted module: the PEFT tensor's suffix <-> the node fields it holds, with the
layout change between PEFT's torch tensors and ours, both ways), the config fields it writes and how a PEFT
config becomes an ``AdapterSpec``. ``hf.peft`` (writing) and ``hf.peft_import`` (reading) walk the same table,
so a format is written and read from one description; neither names a variant.

Layouts: PEFT keeps one module per layer with torch's ``[out, in]`` weights; our nodes hold ``[..., in, out]``
stacked over layers. A key's ``encode`` gets one layer's field arrays and returns the PEFT tensor; ``decode``
is its inverse (a tuple, one array per field)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

__all__ = ["Key", "PeftCodec", "register_codec", "codec_of", "codec_for", "transposed", "same", "peft_types"]


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
    ``conv1d``: PEFT's layer of this format wraps GPT-2's ``Conv1D`` too (not only ``nn.Linear``)."""

    peft_type: str
    node: type
    keys: tuple[Key, ...]
    config: Callable[[Any], dict[str, Any]]
    spec: Callable[[dict[str, Any]], dict[str, Any]]
    reads: frozenset[str] = frozenset()
    conv1d: bool = True

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for k in self.keys for f in k.fields)


_BY_TYPE: dict[str, PeftCodec] = {}
_BY_NODE: dict[type, PeftCodec] = {}


def register_codec(codec: PeftCodec) -> PeftCodec:
    """Register ``codec`` for its PEFT type and its node class (a variant module calls this once)."""
    if codec.peft_type in _BY_TYPE and _BY_TYPE[codec.peft_type] is not codec:
        raise ValueError(f"a PEFT codec for {codec.peft_type} is already registered")
    _BY_TYPE[codec.peft_type] = codec
    _BY_NODE[codec.node] = codec
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
