"""``AdapterSpec``: which leaves to adapt, with which variant, rank, scale and initialization.

The spec is a frozen, hashable dataclass (usable as a static ``jit`` argument) that
round-trips through JSON (``to_dict``/``from_dict``), so it travels with every checkpoint
and export. Invalid values are refused at construction with the field named.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from lorax_variants.tree import compile_patterns

__all__ = ["AdapterSpec", "FACTOR_INITS", "register_settings", "settings_type"]

# How adapter factors may start: name -> ``registry.FactorInit``, filled by ``registry.register_factor_init``
# (kaiming and gaussian by the registry; PiSSA, OLoRA by their modules in ``variants/``).
FACTOR_INITS: dict[str, Any] = {}


def _pairs(value: Any, field: str, kind: type) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for item in items:
        try:
            pattern, v = item
        except (TypeError, ValueError):
            raise TypeError(f"AdapterSpec.{field} must map path regex -> {kind.__name__}, got {item!r}") from None
        if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"AdapterSpec.{field}[{pattern!r}] must be a positive integer, got {v!r}")
        if kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"AdapterSpec.{field}[{pattern!r}] must be a positive number, got {v!r}")
            v = float(v)
        out.append((pattern, v))
    compile_patterns([p for p, _ in out], what=f"AdapterSpec.{field} key")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What to adapt and how.

    Attributes:
      targets: regex (or list of regexes) matched against whole leaf paths, e.g.
        ``r".*/(q_proj|v_proj)/kernel"``.
      variant: ``"lora"`` or ``"lora_fa"`` (A frozen at init); later variants register more.
      r: rank. alpha: scale numerator (s = alpha / r, or alpha / sqrt(r) with ``rslora``).
      rank_pattern / alpha_pattern: per-path overrides ``{regex: value}``, first match wins
        (PEFT's ``rank_pattern``/``alpha_pattern``; layer-wise budgets). Each key must match
        at least one target.
      init: how the factors start, a registered factor init: ``"kaiming"`` (loralib: A ~ U(-1/sqrt(in),
        1/sqrt(in)), B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0, as PEFT), or one that takes A, B from the
        weight and leaves the residual as the base: ``"pissa"`` (arXiv 2404.02948, ``variants/pissa.py``),
        ``"olora"`` (arXiv 2406.01775, ``variants/olora.py``).
      rslora: rank-stabilized scaling alpha / sqrt(r) (arXiv 2312.03732).
      dropout: dropout rate on the adapter input (applied when keys are set by
        ``with_dropout``).
      stacked: regex of paths whose leaves carry one leading layer axis ``[L, in, out]``
        (layers stacked for ``scan``); each layer gets its own A, B.
      dtype: dtype of the adapter leaves (float32 by default, whatever the base dtype).
      settings: the variant's own options, an instance of the settings type the variant registers
        (``register_variant(name, settings=...)``; ``None``: its defaults). A frozen dataclass, so the spec
        stays hashable; ``to_dict``/``from_dict`` carry it as a mapping.

    Leaves to train besides the adapters (biases, a head) are named at ``split(tree,
    extra=...)``; everything else is frozen by default.
    """

    targets: str | tuple[str, ...]
    variant: str = "lora"
    r: int = 8
    alpha: float = 8.0
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    init: str = "kaiming"
    rslora: bool = False
    dropout: float = 0.0
    stacked: str | None = None
    dtype: str = "float32"
    settings: Any = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        targets = self.targets
        if isinstance(targets, (list, tuple)):
            if not targets:
                raise ValueError("AdapterSpec.targets is empty: name at least one path regex")
            set_("targets", tuple(targets))
        elif not isinstance(targets, str) or not targets:
            raise ValueError(f"AdapterSpec.targets must be a regex or a list of regexes, got {targets!r}")
        compile_patterns(self.targets, what="AdapterSpec.targets")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"AdapterSpec.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"AdapterSpec.alpha must be a positive number, got {self.alpha!r}")
        set_("alpha", float(self.alpha))
        set_("rank_pattern", _pairs(self.rank_pattern, "rank_pattern", int))
        set_("alpha_pattern", _pairs(self.alpha_pattern, "alpha_pattern", float))
        if self.init not in FACTOR_INITS:
            raise ValueError(f"AdapterSpec.init must be one of {sorted(FACTOR_INITS)}, got {self.init!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterSpec.dropout must be in [0, 1), got {self.dropout!r}")
        set_("dropout", float(self.dropout))
        if self.settings is not None and not (dataclasses.is_dataclass(self.settings)
                                              and type(self.settings).__dataclass_params__.frozen):
            raise TypeError(f"AdapterSpec.settings must be a variant's settings (a frozen dataclass), got "
                            f"{self.settings!r}")
        if not isinstance(self.rslora, bool):
            raise TypeError(f"AdapterSpec.rslora must be true or false, got {self.rslora!r}")
        if self.stacked is not None:
            compile_patterns(self.stacked, what="AdapterSpec.stacked")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"AdapterSpec.dtype must be a float dtype name, got {self.dtype!r}")

    def rank_for(self, path: str) -> int:
        """Rank for the weight at ``path`` (``rank_pattern`` first, else ``r``)."""
        return next((v for p, v in self.rank_pattern if _fullmatch(p, path)), self.r)

    def alpha_for(self, path: str) -> float:
        """Alpha for the weight at ``path`` (``alpha_pattern`` first, else ``alpha``)."""
        return next((v for p, v in self.alpha_pattern if _fullmatch(p, path)), self.alpha)

    def scale_for(self, path: str) -> float:
        """The scale s of ΔW = s·A B at ``path``: alpha / r, or alpha / √r with ``use_rslora`` (arXiv
        2312.03732)."""
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-able dict (saved with checkpoints and plans)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["targets"] = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        d["rank_pattern"] = dict(self.rank_pattern)
        d["alpha_pattern"] = dict(self.alpha_pattern)
        d["settings"] = dataclasses.asdict(self.settings) if self.settings is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdapterSpec":
        """The spec ``to_dict`` wrote; also one written before the variants' settings moved into ``settings``
        (their fields at the top level are read into the variant's settings)."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        kind = _SETTINGS.get(d.get("variant", "lora"))
        fields = {f.name for f in dataclasses.fields(kind)} if kind is not None else set()
        legacy = {k for k in set(d) - known if any(k in {f.name for f in dataclasses.fields(t)} for t in _SETTINGS.values())}
        unknown = sorted(set(d) - known - legacy)
        if unknown:
            raise ValueError(f"unknown AdapterSpec field(s) {unknown}; valid fields: {sorted(known)}")
        old = {k: d.pop(k) for k in legacy}
        settings = d.get("settings")
        if settings is None and kind is not None and any(k in fields for k in old):
            settings = {k: v for k, v in old.items() if k in fields}
        if isinstance(settings, Mapping):
            if kind is None:
                raise ValueError(f"AdapterSpec.settings given for variant {d.get('variant')!r}, which has none")
            bad = sorted(set(settings) - fields)
            if bad:
                raise ValueError(f"unknown {kind.__name__} field(s) {bad} in AdapterSpec.settings; valid: {sorted(fields)}")
            settings = kind(**settings)
        d["settings"] = settings
        return cls(**d)


_SETTINGS: dict[str, type] = {}


def register_settings(variant: str, kind: type) -> None:
    """Record ``kind`` as the settings type of ``variant`` (``from_dict`` rebuilds it from a mapping)."""
    _SETTINGS[variant] = kind


def settings_type(variant: str) -> type | None:
    """The settings type ``variant`` registered, or ``None``."""
    return _SETTINGS.get(variant)


def _fullmatch(pattern: str, path: str) -> bool:
    return re.fullmatch(pattern, path) is not None

