"""LoRA-GA, LoRA initialized from the gradient (arXiv 2407.05000; PEFT ``init_lora_weights="lora_ga"``).

Before training, the loss's gradient G with respect to each adapted weight (torch layout [out, in], averaged
over a few batches, taken at B = 0 where the adapted model is the base, so G is full fine-tuning's first
gradient) is decomposed G ≈ U S Vᵀ and the adapter set from its leading directions so that its first update
follows full fine-tuning's. As PEFT, with q = min(4r, out, in) and 4 power iterations of a randomized SVD
(``torch.svd_lowrank``'s algorithm; exact where q = min(out, in)):

    direction ArB2r (default):  A = Vᵀ[:r],          B = U[:, r:2r] S[r:2r]
              A2rBr:            A = Vᵀ[r:2r],        B = U[:, :r] S[:r]
              ArBr:             A = Vᵀ[1:2r:2],      B = U[:, 0:2r:2] S[0:2r:2]
              random:           r of the first 2r components, drawn from ``key``
    scale     stable (default): B · out^¼ / √γ;  weight_svd: B · σ₁(W) / S_B[0] (σ₁ exact);  gd_scale: A / s, B / s;  unit
    base      W - s · B A        (s: the LoRA scale alpha / r, or alpha / √r with rsLoRA)

so the adapted layer starts equal to the base. The adapter is LoRA's node: training, merging and the
optimizer are LoRA's. A PEFT export is written converted to plain LoRA of rank 2r on the original base
(``save_peft(..., initial=<the tree right after this init>)``), as PEFT's
``path_initial_model_for_weight_conversion``: PEFT cannot recompute the moved base from the base alone.
Quantized bases are refused (the gradient needs the full-precision weight), as PEFT does.

``weight_gradients(loss, tree, batches)`` gives the averaged gradients for any JAX model; the app
(``adapter.init: lora_ga``) computes them on its first ``LoraGa.batches`` training batches."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Literal

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import Node
from lorax_variants.recipes import InitData, InitRecipe, register_init
from lorax_variants.registry import path_key
from lorax_variants.tree import leaves_with_paths, map_with_paths
from lorax_variants.variants.lora import LoraNode

__all__ = ["LoraGa", "lora_ga", "weight_gradients", "svd_lowrank"]

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclasses.dataclass(frozen=True)
class LoraGa:
    """LoRA-GA's options, as PEFT's ``LoraGAConfig`` (``direction``, ``scale``, ``stable_gamma``), and how many
    training batches the app averages the gradient over (``batches``)."""

    direction: Literal["ArB2r", "A2rBr", "ArBr", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: float = 16.0
    batches: int = 8

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"LoraGa.direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.scale not in SCALES:
            raise ValueError(f"LoraGa.scale must be one of {SCALES}, got {self.scale!r}")
        if not self.stable_gamma > 0:
            raise ValueError(f"LoraGa.stable_gamma must be positive, got {self.stable_gamma!r}")
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ValueError(f"LoraGa.batches must be a positive integer, got {self.batches!r}")


def svd_lowrank(a: jax.Array, q: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U [m, q], S [q], Vh [q, n])`` of ``a`` [m, n] by randomized subspace iteration (Halko et al. 2009,
    algorithm 4.4, as ``torch.svd_lowrank``): a Gaussian test matrix, ``niter`` power iterations with QR
    re-orthonormalization, then the exact SVD of the small projected matrix. Exact where q = min(m, n). Each
    component's sign is canonical (the largest-magnitude entry of its U column positive); torch's follows its
    random test matrix, so LoRA-GA's factors here and in PEFT agree up to each component's sign."""
    m, n = a.shape
    flip = m < n  # work on the tall side: the projected matrix is [q, min(m, n)]
    x = a.T if flip else a
    basis = jnp.linalg.qr(x @ jax.random.normal(key, (x.shape[1], q), x.dtype))[0]
    for _ in range(niter):
        basis = jnp.linalg.qr(x.T @ basis)[0]
        basis = jnp.linalg.qr(x @ basis)[0]
    u, s, vh = jnp.linalg.svd(basis.T @ x, full_matrices=False)
    u = basis @ u
    u, vh = (vh.T, u.T) if flip else (u, vh)
    # each component's sign made canonical (its largest entry of U positive): the result does not depend on
    # the test matrix or the LAPACK build, only on ``a``
    big = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None], axis=0)[0]
    sign = jnp.where(big < 0, -1.0, 1.0).astype(u.dtype)
    return u * sign, s, vh * sign[:, None]


def _factors(g: jax.Array, w: jax.Array, r: int, scale: float, s: LoraGa, key: jax.Array) -> tuple[jax.Array, ...]:
    """One layer: ``(A [r, in], B [out, r])`` in torch layout from its gradient ``g`` and weight ``w`` [out, in]."""
    k_svd, k_pick = jax.random.split(key)
    u, sv, vh = svd_lowrank(g, min(4 * r, *g.shape), 4, k_svd)
    u, sv, vh = u[:, : 2 * r], sv[: 2 * r], vh[: 2 * r]
    if s.direction == "ArBr":
        a, ib = vh[1: 2 * r: 2], jnp.arange(0, 2 * r, 2)
    elif s.direction == "A2rBr":
        a, ib = vh[r: 2 * r], jnp.arange(r)
    elif s.direction == "ArB2r":
        a, ib = vh[:r], jnp.arange(r, 2 * r)
    else:
        ib = jax.random.permutation(k_pick, 2 * r)[:r]
        a = vh[ib]
    s_b = sv[ib]
    b = u[:, ib] * s_b
    if s.scale == "stable":
        b = b * (g.shape[0] ** 0.25 / s.stable_gamma ** 0.5)
    elif s.scale == "weight_svd":  # sigma_1(W) exactly (PEFT estimates it with a rank-r randomized SVD)
        top = jnp.linalg.svd(w, compute_uv=False)[0]
        b = jnp.where(s_b[0] > 0, b * top / jnp.where(s_b[0] > 0, s_b[0], 1.0), b)
    elif s.scale == "gd_scale":
        a, b = a / scale, b / scale
    return a, b


def lora_ga(tree: Any, grads: dict[str, jax.Array], settings: LoraGa = LoraGa(), key: Any = 0) -> Any:
    """``tree``'s LoRA nodes re-initialized by LoRA-GA from ``grads`` (path -> the averaged gradient of the loss
    w.r.t. that node's base weight, our layout [..., in, out], as ``weight_gradients`` gives): A, B from the
    gradient's SVD and the base moved to W - s·A B (the module docstring). Every LoRA node needs a gradient and
    2r <= min(in, out); a quantized base is refused. Stacked layers each get their own SVD."""
    key = jax.random.key(key) if isinstance(key, int) else key
    nodes = {p: n for p, n in leaves_with_paths(tree, nodes_are_leaves=True) if isinstance(n, Node)}
    lora = {p: n for p, n in nodes.items() if isinstance(n, LoraNode)}
    if not lora:
        kinds = sorted({type(n).__name__ for n in nodes.values()})
        raise ValueError(f"lora_ga: no LoRA adapters in the tree (found {kinds or 'no adapters'}); LoRA-GA initializes "
                         "LoRA's A and B")
    missing = sorted(set(lora) - set(grads))
    if missing:
        raise ValueError(f"lora_ga: no gradient for {missing[:4]}{' ...' if len(missing) > 4 else ''}")

    def one(path: str, n: Any) -> Any:
        if path not in lora:
            return n
        if isinstance(n.weight, Node):
            raise ValueError(f"{path}: LoRA-GA needs the full-precision base weight, not a {type(n.weight).__name__} "
                             "(initialize before quantizing; PEFT refuses quantized bases too)")
        r = n.lora_a.shape[-1]
        d_in, d_out = n.shape[-2:]
        if 2 * r > min(d_in, d_out):
            raise ValueError(f"{path}: LoRA-GA takes 2r = {2 * r} directions of a [{d_in}, {d_out}] gradient; "
                             f"lower the rank to at most {min(d_in, d_out) // 2}")
        g = jnp.asarray(grads[path], jnp.float32)
        if g.shape != tuple(n.shape):
            raise ValueError(f"lora_ga: the gradient for {path} has shape {g.shape}; its weight is {tuple(n.shape)}")
        w = n.weight
        lead = w.shape[:-2]
        layers = int(jnp.prod(jnp.asarray(lead))) if lead else 1
        own = path_key(key, path)
        keys = jax.random.split(own, layers).reshape(lead) if lead else own
        fn = lambda g_, w_, k_: _factors(g_.T, w_.astype(jnp.float32).T, r, n.scale, settings, k_)  # noqa: E731
        for _ in lead:
            fn = jax.vmap(fn)
        a, b = fn(g, w, keys)
        dtype = n.lora_a.dtype
        a_ours = jnp.swapaxes(a, -1, -2).astype(dtype)  # [..., in, r]
        b_ours = jnp.swapaxes(b, -1, -2).astype(n.lora_b.dtype)  # [..., r, out]
        moved = w.astype(jnp.float32) - n.scale * jnp.matmul(a_ours.astype(jnp.float32), b_ours.astype(jnp.float32))
        return n.replace(weight=moved.astype(w.dtype), lora_a=a_ours, lora_b=b_ours)

    return map_with_paths(one, tree, nodes_are_leaves=True)


def weight_gradients(loss: Callable[[Any, Any], jax.Array], tree: Any, batches: Iterable[Any]) -> dict[str, jax.Array]:
    """The gradient of ``loss(tree, batch)`` with respect to the base weight of every LoRA node of ``tree``,
    averaged over ``batches`` (as PEFT's ``preprocess_loraga``: one backward per batch, divided by their
    number); path -> [..., in, out] float32. At initialization (B = 0) this is full fine-tuning's gradient."""
    weights = {p: n.weight for p, n in leaves_with_paths(tree, nodes_are_leaves=True) if isinstance(n, LoraNode)}
    if not weights:
        raise ValueError("weight_gradients: the tree has no LoRA adapters")
    quantized = sorted(p for p, w in weights.items() if isinstance(w, Node))
    if quantized:
        raise ValueError(f"weight_gradients: {quantized[0]} has a quantized base; LoRA-GA's gradient needs the "
                         "full-precision weights (initialize before quantizing)")

    def f(ws: dict[str, jax.Array], batch: Any) -> jax.Array:
        swapped = map_with_paths(lambda p, n: n.replace(weight=ws[p]) if p in ws else n, tree, nodes_are_leaves=True)
        return loss(swapped, batch)

    grad = jax.jit(jax.grad(f))
    total, count = None, 0
    for batch in batches:
        g = grad(weights, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        count += 1
    if count == 0:
        raise ValueError("weight_gradients: no batches")
    return {p: (v / count).astype(jnp.float32) for p, v in total.items()}


def _from_data(settings: LoraGa, tree: Any, data: InitData) -> Any:
    """The app's LoRA-GA: the gradient averaged over the first ``settings.batches`` training batches (the ones
    steps 1, 2, ... train on), then ``lora_ga``. Deterministic: a resume or an export that prepares the run
    again gets the same moved bases."""
    grads = weight_gradients(data.loss, tree, data.global_batches(settings.batches))
    return lora_ga(tree, grads, settings, key=data.seed)


register_init(InitRecipe(
    "lora_ga", LoraGa, from_data=_from_data, moves_base=True, lora_only=True, refuses_quant=True,
    describe=lambda s: f"LoRA-GA: adapters and bases set from the gradient of {s.batches} training batches "
                       f"(direction {s.direction}, scale {s.scale})"))
