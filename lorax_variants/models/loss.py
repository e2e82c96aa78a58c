"""Next-token cross-entropy that never forms [tokens, vocab] logits beyond one chunk of tokens.

    ce_n = logsumexp(head(h_n)) - head(h_n)[y_n]          (float32; head: the model's output head)

The final hidden states [N, d] go through the head ``chunk`` tokens at a time in a ``scan`` whose body is
rematerialized (``jax.checkpoint``): the forward keeps only each chunk's hidden states, and the backward
recomputes that chunk's logits, takes softmax - onehot and sends it back through the head (its matmul,
a LoRA on it, a tied embedding, Gemma's final soft-cap: whatever ``model.head`` is), so the largest
temporary is [chunk, vocab] in float32 however long the sequence. The head's gradients sum over chunks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["token_cross_entropy"]


def token_cross_entropy(model: Any, params: Any, hidden: jax.Array, targets: jax.Array,
                        chunk: int = 2048, splits: int = 1) -> tuple[jax.Array, jax.Array]:
    """Per token ``(cross-entropy float32, argmax == target)`` for ``hidden [..., d]`` and ``targets [...]``.

    ``params``: the resolved tree ``model.head`` reads. Equal to the plain computation on full logits in
    value and gradient (to float32 rounding). ``splits``: ``hidden [B, T, d]``'s tokens are split over that many
    devices (context parallelism): each takes ``chunk`` of its own tokens per step (rows [B·splits, T/splits])."""
    if splits > 1:
        b, t = targets.shape
        rows = b * splits
        h = hidden.reshape(rows, t // splits, hidden.shape[-1])
        y = targets.reshape(rows, t // splits)
        k = min(chunk, t // splits)
        pad = -(t // splits) % k
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(rows, -1, k, h.shape[-1]).transpose(1, 0, 2, 3)
        y = jnp.pad(y, ((0, 0), (0, pad))).reshape(rows, -1, k).transpose(1, 0, 2)
        one = jax.checkpoint(lambda h_c, y_c: _ce(model, params, h_c.reshape(-1, h_c.shape[-1]), y_c.reshape(-1)))
        _, (ce, correct) = jax.lax.scan(lambda _, xs: (None, one(*xs)), None, (h, y))
        back = lambda z: z.reshape(-1, rows, k).transpose(1, 0, 2).reshape(rows, -1)[:, :t // splits].reshape(b, t)  # noqa: E731
        return back(ce), back(correct)
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).astype(jnp.int32)
    n = h.shape[0]
    if n <= chunk:  # one chunk: the plain computation (nothing to save by recomputing)
        ce, correct = _ce(model, params, h, y)
        return ce.reshape(shape), correct.reshape(shape)
    c = max(1, chunk)
    pad = -n % c
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, c, h.shape[-1])
    y = jnp.pad(y, (0, pad)).reshape(-1, c)

    one = jax.checkpoint(lambda h_c, y_c: _ce(model, params, h_c, y_c))  # the backward recomputes the logits
    _, (ce, correct) = jax.lax.scan(lambda _, xs: (None, one(*xs)), None, (h, y))
    return ce.reshape(-1)[:n].reshape(shape), correct.reshape(-1)[:n].reshape(shape)


def _ce(model: Any, params: Any, h: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _ce_of_logits(model.head(params, h).astype(jnp.float32), y)


@jax.custom_vjp
def _ce_of_logits(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(logsumexp(logits) - logits[y], logits[y] is the largest)`` per row, with a backward that writes
    ``(softmax(logits) - onehot(y)) · g`` as one [rows, vocab] array: autodiff of the plain expression also
    holds the exponentials, a scatter of the picked logit's gradient into zeros of that shape and the argmax's
    index array (for a 262k vocabulary at 512 tokens: 0.5 GB each)."""
    return _ce_fwd(logits, y)[0]


def _ce_fwd(logits: jax.Array, y: jax.Array) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
    picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    return (lse - picked, picked >= top), (logits, lse, y)


def _ce_bwd(res: tuple[jax.Array, ...], g: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    logits, lse, y = res
    hit = jnp.arange(logits.shape[-1], dtype=y.dtype)[None, :] == y[:, None]
    return (jnp.exp(logits - lse[:, None]) - hit.astype(logits.dtype)) * g[0][:, None], None


_ce_of_logits.defvjp(_ce_fwd, _ce_bwd)
