"""A frozen weight stored in 4 or 8 bits (see ``lorax_variants.quant`` for the format).

``apply(x)`` dequantizes the weight in the activation dtype and multiplies (the one
full-size intermediate the factored path allows); ``merge()`` returns the dequantized
weight in the original dtype. Nothing in it trains: asking to train one of its leaves is an
error naming the leaf.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import Node, frozen, node, static

__all__ = ["QuantizedNode"]


def _dequant_2d(n: dict[str, jax.Array], kind: str, bs: int, bs2: int, d_in: int, d_out: int) -> jax.Array:
    from lorax_variants.quant import DYNAMIC_CODE, FP4_CODE, NF4_CODE

    if n.get("qabsmax") is not None:
        q8 = n["qabsmax"]
        flat = jnp.take(jnp.asarray(DYNAMIC_CODE), q8.T.reshape(-1).astype(jnp.int32))
        count = flat.shape[0]
        flat = jnp.pad(flat, (0, -count % bs2)).reshape(-1, bs2) * n["absmax2"][:, None]
        absmax = (flat.reshape(-1)[:count] + n["offset"]).reshape(q8.shape[::-1]).T
    else:
        absmax = n["absmax"]
    codes = n["codes"]
    if kind == "int8":
        values = codes.astype(jnp.float32)
    else:
        q = jnp.stack([codes >> 4, codes & 0xF], axis=1).reshape(d_in, d_out)
        table = {"nf4": NF4_CODE, "fp4": FP4_CODE}.get(kind)
        values = jnp.take(jnp.asarray(table), q.astype(jnp.int32)) if table is not None else q.astype(jnp.float32) - 8.0
    scale = absmax if kind in ("nf4", "fp4") else absmax / (7.0 if kind == "int4" else 127.0)
    return (values.reshape(d_in // bs, bs, d_out) * scale[:, None, :]).reshape(d_in, d_out)


@node
class QuantizedNode(Node):
    variant: ClassVar[str] = "quantized"

    codes: jax.Array = frozen()
    absmax: jax.Array | None = frozen(default=None)
    qabsmax: jax.Array | None = frozen(default=None)
    absmax2: jax.Array | None = frozen(default=None)
    offset: jax.Array | None = frozen(default=None)
    kind: str = static()
    block_size: int = static()
    block_size2: int = static(default=256)
    in_out: tuple[int, int] = static()
    orig_dtype: str = static(default="float32")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-2]) + tuple(self.in_out)

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.orig_dtype)

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4

    def dequantize(self, dtype: Any = None) -> jax.Array:
        fields = {k: getattr(self, k) for k in ("codes", "absmax", "qabsmax", "absmax2", "offset")}
        fn = lambda f: _dequant_2d(f, self.kind, self.block_size, self.block_size2, *self.in_out)  # noqa: E731
        for _ in self.codes.shape[:-2]:
            fn = jax.vmap(fn)
        return fn(fields).astype(dtype or self.dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        if len(self.shape) != 2:
            raise ValueError(f"apply a stacked quantized weight {self.shape} one layer at a time (scan)")
        return jnp.matmul(x, self.dequantize(x.dtype))

    def merge(self) -> jax.Array:
        return self.dequantize()

    def check_can_train(self, field_path: str, full_path: str) -> None:
        raise ValueError(f"{full_path}: quantized weights cannot be trained (their codes are integers); "
                         "train an adapter over them instead")


