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
import numpy as np

from lorax_variants.nodes.base import Node, frozen, node, static

__all__ = ["QuantizedNode", "NF4_CODE", "FP4_CODE", "DYNAMIC_CODE"]

# The code tables live with the node that decodes them; ``quant`` (the encoder) imports them from here.
# The NF4 code (bitsandbytes' table, float32).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)

# bitsandbytes' FP4 code (e2m1, the order of its 4-bit patterns), for pre-quantized FP4 checkpoints.
FP4_CODE = np.array([0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
                     0.1666666716337204, 0.25, -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
                     -0.3333333432674408, -0.5, -0.1666666716337204, -0.25], np.float32)

# bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(signed=True)``), as float32 bits.
_DYNAMIC_HEX = (
    "bf7e3333bf7a999abf770000bf736666bf6fcccdbf6c3333bf68999abf650000bf616666bf5dcccdbf5a3333bf56999a"
    "bf530000bf4f6666bf4bcccdbf483333bf44999abf410000bf3d6666bf39cccdbf363334bf32999abf2f0000bf2b6666"
    "bf27cccdbf243334bf20999abf1d0000bf196666bf15cccdbf123334bf0e999abf0b0000bf076666bf03ccccbf003333"
    "bef93332bef20000beeaccccbee3999abedc6666bed53333bece0000bec6ccccbebf999abeb86666beb13333beaa0000"
    "bea2ccccbe9b999abe946666be8d3334be860000be7d9999be6f3333be60cccdbe526666be440000be35999abe273333"
    "be18cccdbe0a6666bdf80000bddb3334bdc9eb85bdc428f7bdbe6667bdb8a3d7bdb2e148bdad1eb8bda75c2abda1999a"
    "bd9bd70abd96147bbd9051ebbd8a8f5dbd84cccdbd7e147bbd728f5dbd670a3dbd5b851fbd500000bd447ae1bd38f5c3"
    "bd2d70a3bd21eb85bd166667bd0ae148bcfeb852bce7ae15bcd0a3d7bcb9999abca28f5dbc8b851fbc68f5c3bc3ae148"
    "bc1f3b64bc160418bc0ccccdbc039581bbf4bc6abbe24dd3bbcfdf3bbbbd70a4bbab020dbb989374bb8624ddbb676c8a"
    "bb428f5cbb1db22dbaf1a9fcbaa7ef9dba7765ffba59e83eba3c6a80ba1eecc1ba016f01b9c7e283b98ce705b923d70b"
    "b8ba1f4bb88aefb3b8378034b7b24206b70205ffb65a1a94b513a3b7000000003513a3b7365a1a94370205ff37b24206"
    "38378034388aefb338ba1f4b3923d70b398ce70539c7e2833a016f013a1eecc13a3c6a803a59e83e3a7765ff3aa7ef9d"
    "3af1a9fc3b1db22d3b428f5c3b676c8a3b8624dd3b9893743bab020d3bbd70a43bcfdf3b3be24dd33bf4bc6a3c039581"
    "3c0ccccd3c1604183c1f3b643c3ae1483c68f5c33c8b851f3ca28f5d3cb9999a3cd0a3d73ce7ae153cfeb8523d0ae148"
    "3d1666673d21eb853d2d70a33d38f5c33d447ae13d5000003d5b851f3d670a3d3d728f5d3d7e147b3d84cccd3d8a8f5d"
    "3d9051eb3d96147b3d9bd70a3da1999a3da75c2a3dad1eb83db2e1483db8a3d73dbe66673dc428f73dc9eb853ddb3334"
    "3df800003e0a66663e18cccd3e2733333e35999a3e4400003e5266663e60cccd3e6f33333e7d99993e8600003e8d3334"
    "3e9466663e9b999a3ea2cccc3eaa00003eb133333eb866663ebf999a3ec6cccc3ece00003ed533333edc66663ee3999a"
    "3eeacccc3ef200003ef933323f0033333f03cccc3f0766663f0b00003f0e999a3f1233343f15cccd3f1966663f1d0000"
    "3f20999a3f2433343f27cccd3f2b66663f2f00003f32999a3f3633343f39cccd3f3d66663f4100003f44999a3f483333"
    "3f4bcccd3f4f66663f5300003f56999a3f5a33333f5dcccd3f6166663f6500003f68999a3f6c33333f6fcccd3f736666"
    "3f7700003f7a999a3f7e33333f800000"
)
DYNAMIC_CODE = np.frombuffer(bytes.fromhex("".join(_DYNAMIC_HEX)), ">u4").astype(np.uint32).view(np.float32)


def _dequant_2d(n: dict[str, jax.Array], kind: str, bs: int, bs2: int, d_in: int, d_out: int) -> jax.Array:
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
        if table is not None:
            values = jnp.take(jnp.asarray(table), q.astype(jnp.int32))
        else:  # int4: codes 0..15 stand for -8..7; int4_asym: steps 0..15 above the block's zero point
            values = q.astype(jnp.float32) - (0.0 if kind == "int4_asym" else 8.0)
    if kind == "int4_asym":
        w = values.reshape(d_in // bs, bs, d_out) * (absmax / 15.0)[:, None, :] + n["zeros"][:, None, :]
        return w.reshape(d_in, d_out)
    scale = absmax if kind in ("nf4", "fp4") else absmax / (7.0 if kind == "int4" else 127.0)
    return (values.reshape(d_in // bs, bs, d_out) * scale[:, None, :]).reshape(d_in, d_out)


@node
class QuantizedNode(Node):
    """A frozen weight stored blockwise quantized (NF4, FP4, int4, int4 with zero points, int8) with its scales
    (double-quantized where set); ``dequantize`` gives the float weight, ``dense`` uses it as any weight."""

    variant: ClassVar[str] = "quantized"

    codes: jax.Array = frozen()
    absmax: jax.Array | None = frozen(default=None)
    qabsmax: jax.Array | None = frozen(default=None)
    absmax2: jax.Array | None = frozen(default=None)
    offset: jax.Array | None = frozen(default=None)
    zeros: jax.Array | None = frozen(default=None)  # int4_asym: per-block zero points [in/bs, out] (float32)
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
        """The dense weight Ŵ [..., in, out] in ``dtype`` (default: the original weight's)."""
        fields = {k: getattr(self, k) for k in ("codes", "absmax", "qabsmax", "absmax2", "offset", "zeros")}
        fn = lambda f: _dequant_2d(f, self.kind, self.block_size, self.block_size2, *self.in_out)  # noqa: E731
        for _ in self.codes.shape[:-2]:
            fn = jax.vmap(fn)
        return fn(fields).astype(dtype or self.dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        """x Ŵ with Ŵ dequantized inside the step in x's dtype (NF4/FP4/int4/int4_asym/int8 blocks)."""
        if len(self.shape) != 2:
            raise ValueError(f"apply a stacked quantized weight {self.shape} one layer at a time (scan)")
        return jnp.matmul(x, self.dequantize(x.dtype))

    def merge(self) -> jax.Array:
        """The dequantized weight (``dequantize()``)."""
        return self.dequantize()

    def check_can_train(self, field_path: str, full_path: str) -> None:
        """Refuse training a quantized weight, naming ``full_path``."""
        raise ValueError(f"{full_path}: quantized weights cannot be trained (their codes are integers); "
                         "train an adapter over them instead")


