"""Context parallelism: a causal LM's sequence split over a mesh axis, so that one row's tokens, and every
[T, d] activation of them, live on several chips (MaxText's and Megatron's context parallelism).

Layout (``balance=True``, causal load balancing): the T tokens are cut into 2n chunks for n devices and device
i holds chunks i and 2n-1-i. Under a causal mask a query chunk's work grows with its position, so device i does
(i + 1) + (2n - i) chunk pairs, the same on every device; without it, the last device would do n times the
first one's work while the others wait. The model takes its tokens in that order (``order``) and says where
each one sits in the sequence, so rotary positions, causality, windows and packed rows' segment ids all refer
to the true positions.

Everything but attention works on the local tokens as it is: norms, projections, the MLP's chunks (``splits``:
each device chunks its own share) and the chunked loss; the layer's remat saves local activations.
Attention (``attention``): each device keeps its queries and all-gathers the keys and values (and their padding
and segment ids) over the axis, puts them back into sequence order and runs the blockwise attention
(``models.flash``) once per local chunk, with the chunk's position as the query offset, so key blocks the chunk
cannot see (after it, or before its window) are skipped. The backward is flash's; the gather's transpose, a
reduce-scatter, sums every device's key/value gradients into their owners' shards. Per device and layer the
gathered K/V cost [T, kv heads, head dim] twice: at 1M tokens and Llama-3-8B's 8 KV heads of 128, 2 GiB each
in bf16 (the ring form, which streams them, would keep one chunk: not built).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lorax_variants.models.flash import flash_attention

__all__ = ["ContextParallel"]


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """The sequence split over ``mesh``'s ``axis`` (see the module docstring). Set as a zoo model's ``context``."""

    mesh: Mesh
    axis: str = "context"
    balance: bool = True

    @property
    def size(self) -> int:
        return int(self.mesh.shape[self.axis])

    @property
    def chunks(self) -> int:
        """Chunks of the sequence: two per device when balanced, else one."""
        return 2 * self.size if self.balance else self.size

    def check(self, t: int, what: str = "sequence length") -> None:
        """Refuse a length ``t`` that does not cut into this layout's chunks, naming ``what`` it is."""
        if t % self.chunks:
            raise ValueError(f"context parallelism over {self.size} devices (mesh axis {self.axis!r}"
                             + (", balanced: 2 chunks per device" if self.balance else "")
                             + f"): the {what} {t} must be a multiple of {self.chunks}")

    def order(self, t: int) -> np.ndarray:
        """The sequence positions in the order the devices hold them: device 0's tokens first."""
        self.check(t)
        if not self.balance:
            return np.arange(t)
        c, n = t // self.chunks, self.size
        return np.concatenate([np.arange(j * c, (j + 1) * c) for d in range(n) for j in (d, 2 * n - 1 - d)])

    def _rows(self, b: int) -> tuple[str, ...] | None:
        """The mesh axes a batch of ``b`` rows splits over (data x fsdp where they divide it)."""
        names = tuple(a for a in ("data", "fsdp") if self.mesh.shape.get(a, 1) > 1)
        n = int(np.prod([self.mesh.shape[a] for a in names])) if names else 1
        return names if names and b % n == 0 else None

    def constrain(self, x: jax.Array) -> jax.Array:
        """``x [B, T, ...]`` (in ``order``) laid out with its tokens over the axis."""
        spec = P(self._rows(x.shape[0]), self.axis, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool,
                  key_valid: jax.Array | None = None, window: Any = None, softcap: float | None = None,
                  segment_ids: jax.Array | None = None) -> jax.Array:
        """Self-attention of tokens in ``order``: ``q [B, T, H, D]``, ``k``/``v [B, T, Hkv, D]``, ``key_valid``
        and ``segment_ids`` ``[B, T]`` -> ``[B, T, H·D]``, all in ``order``; as ``layers.self_attention``."""
        b, t, h, _ = q.shape
        hkv = k.shape[2]
        self.check(t)
        tp = self.mesh.shape.get("tensor", 1)
        heads = "tensor" if tp > 1 and h % tp == 0 and hkv % tp == 0 else None
        rows = self._rows(b)
        n, balance, axis = self.size, self.balance, self.axis
        c = t // self.chunks
        extra = {name: x for name, x in (("key_valid", key_valid), ("segment_ids", segment_ids)) if x is not None}
        static_window = window if window is None or isinstance(window, int) else None
        if static_window is None and window is not None:  # a per-layer window (traced in the layer scan)
            extra["window"] = jnp.asarray(window, jnp.int32)

        def natural(x: jax.Array) -> jax.Array:
            """Gathered [B, T, ...] in device order -> sequence order."""
            if not balance:
                return x
            g = x.reshape(x.shape[0], n, 2, c, *x.shape[2:])
            return jnp.concatenate([g[:, :, 0], g[:, ::-1, 1]], axis=1).reshape(x.shape)

        def body(q, k, v, ex):
            i = jax.lax.axis_index(axis)
            gather = lambda x: natural(jax.lax.all_gather(x, axis, axis=1, tiled=True))  # noqa: E731
            kk, vv = gather(k), gather(v)
            seg = ex.get("segment_ids")
            kw = dict(scale=scale, causal=causal, softcap=softcap,
                      window=ex.get("window", static_window),
                      key_valid=gather(ex["key_valid"]) if "key_valid" in ex else None,
                      key_segment_ids=gather(seg) if seg is not None else None)
            parts = [(0, i)] if not balance else [(0, i), (c, 2 * n - 1 - i)]
            width = c if balance else t // n
            outs = [flash_attention(q[:, s:s + width], kk, vv, q_offset=j * width,
                                    segment_ids=None if seg is None else seg[:, s:s + width], **kw)
                    for s, j in parts]
            return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

        tok = P(rows, axis, heads, None)
        ex_specs = {k_: (P() if k_ == "window" else P(rows, axis)) for k_ in extra}
        fn = jax.shard_map(body, mesh=self.mesh, in_specs=(tok, tok, tok, ex_specs), out_specs=P(rows, axis, heads),
                           check_vma=False)
        return fn(q, k, v, extra)
