"""AdaLoRA's SVD-form adapter (arXiv 2303.10512).

    W' = W + s · P Λ Q,    s = alpha / (r + 1e-5)  (PEFT: scaling / (ranknum + 1e-5))

In our [in, out] layout: ``lora_a`` = Qᵀ [in, r], ``lora_e`` = Λ [r], ``lora_b`` = Pᵀ [r, out]
(PEFT: lora_A (r, in), lora_E (r, 1), lora_B (out, r)). At init Λ = 0 and A, B ~ N(0, 0.02²).
``rank_mask`` [r] (1 = kept) multiplies Λ; the rank allocator (``optim.adalora``) sets it.
``orthogonal_penalty(tree)`` is the regulariser R = mean over matrices of ‖PᵀP − I‖_F and
‖QQᵀ − I‖_F (non-squared, as PEFT and the official code).

AdaLoRA's rank allocator (arXiv 2303.10512) as an Optax transformation around a base optimizer.

After each base update (params p' = p + u, gradient g of this step), for every AdaLoRA leaf:

    I = |p' · g|,   Ī ← β₁ Ī + (1 − β₁) I,   Ū ← β₂ Ū + (1 − β₂) |I − Ī|,   s = Ī · Ū
    S_i = s(Λ_i) + mean_j s(Q_{i j}) + mean_j s(P_{j i})      (triplet i of each matrix)

and a global budget b(t) over all triplets of all layers (b₀ = Σ r_init, b_T = target_r · #matrices):
b₀ until t_init; b_T after T − t_final; between, b(t) = b_T + (b₀ − b_T)(1 − (t − t_init)/(T −
t_final − t_init))³, masking every ΔT steps. Masking zeroes Λ_i for the b₀ − b(t) lowest S_i
(S at or below the k-th smallest); at T − t_final the final pattern is fixed and applied every
step after. This is PEFT's ``RankAllocator.update_and_allocate`` step for step (t counts from 0
at the first update). k is clamped to [0, b₀]. The allocator cannot be skipped: it wraps the
optimizer. Add ``orth_weight · orthogonal_penalty(tree)`` to the loss (PEFT: 0.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_variants.codec import PREFIX, Key, PeftCodec, Refusal, Site, layers, module_tensor, peft_alpha, register_codec, stack_layers
from lorax_variants.nodes.base import AdapterNode, Node, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout, low_rank
from lorax_variants.recipes import OptimContext, Recipe, plain_optimizer, register_recipe
from lorax_variants.registry import Target, register_variant

__all__ = ['AdaLoraNode', 'orthogonal_penalty', 'adalora_allocator', 'AllocatorState', 'budget_schedule', 'rank_pattern', 'with_rank_pattern', 'AdaLora']


@node
class AdaLoraNode(AdapterNode):
    """AdaLoRA's SVD-form adapter over ``weight``: ``W + s·(Qᵀ (Λ ⊙ rank_mask)) Pᵀ`` with ``lora_a`` = Qᵀ [..., in,
    r], ``lora_e`` = Λ [..., r], ``lora_b`` = Pᵀ [..., r, out]."""

    variant: ClassVar[str] = "adalora"

    weight: Any = frozen()
    lora_a: jax.Array = param()  # Qᵀ [..., in, r]
    lora_e: jax.Array = param()  # Λ [..., r]
    lora_b: jax.Array = param()  # Pᵀ [..., r, out]
    rank_mask: jax.Array = frozen()  # bool [..., r]: True kept, False pruned
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def _e(self, dtype: Any) -> jax.Array:
        return (self.lora_e * self.rank_mask.astype(self.lora_e.dtype)).astype(dtype)

    def active_ranks(self) -> jax.Array:
        """The triplets the rank mask keeps, per stacked layer."""
        return jnp.sum(self.rank_mask, axis=-1).astype(jnp.int32)

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + s·((x Qᵀ) ⊙ (Λ ⊙ mask)) Pᵀ: the SVD-form adapter (arXiv 2303.10512) with pruned triplets masked."""
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return dense(x, self.weight) + low_rank(xd, self.lora_a.astype(x.dtype), self.lora_b.astype(x.dtype),
                                                float(self.scale), self._e(x.dtype))

    def merge(self) -> jax.Array:
        """W + s·Qᵀ diag(Λ ⊙ mask) Pᵀ."""
        w = weight_of(self.weight)
        a = self.lora_a.astype(jnp.float32) * self._e(jnp.float32)[..., None, :]
        return (w.astype(jnp.float32) + self.scale * jnp.matmul(a, self.lora_b.astype(jnp.float32))).astype(w.dtype)

    def ranks(self) -> jax.Array:
        """Ranks in use (per stacked layer)."""
        return jnp.sum(self.rank_mask, axis=-1)


@register_variant("adalora")
def build_adalora(t: Target) -> AdaLoraNode:
    dtype = jnp.dtype(t.spec.dtype)
    ka, kb = jax.random.split(t.key)
    return AdaLoraNode(
        weight=t.weight,
        lora_a=(0.02 * jax.random.normal(ka, t.lead + (t.d_in, t.r))).astype(dtype),
        lora_e=jnp.zeros(t.lead + (t.r,), dtype),
        lora_b=(0.02 * jax.random.normal(kb, t.lead + (t.r, t.d_out))).astype(dtype),
        rank_mask=jnp.ones(t.lead + (t.r,), bool),
        scale=t.alpha / (t.r + 1e-5),
        dropout=t.spec.dropout,
    )


def orthogonal_penalty(tree: Any) -> jax.Array:
    """Mean over all AdaLoRA P and Q matrices (each stacked layer counted) of ‖·ᵀ· − I‖_F."""
    total, count = jnp.zeros((), jnp.float32), 0
    for n in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Node)):
        if not isinstance(n, AdaLoraNode):
            continue
        for m, gram in ((n.lora_a, "...ir,...is->...rs"), (n.lora_b, "...ro,...so->...rs")):
            m = m.astype(jnp.float32)
            g = jnp.einsum(gram, m, m) - jnp.eye(m.shape[-1] if gram.startswith("...ir") else m.shape[-2])
            norms = jnp.sqrt(jnp.sum(g * g, axis=(-2, -1)))
            total, count = total + jnp.sum(norms), count + norms.size
    if count == 0:
        raise ValueError("orthogonal_penalty: the tree has no AdaLoRA nodes")
    return total / count


class AllocatorState(NamedTuple):
    """The allocator's state: step count, importance and uncertainty EMAs, the rank pattern, the base's."""

    count: jax.Array
    ema_ipt: Any  # trees shaped like the trainable tree (AdaLoRA fields)
    ema_unc: Any
    keep: Any  # per AdaLoRA node: bool [..., r], the current rank pattern
    base: Any

    def apply_ranks(self, tree: Any) -> Any:
        """``tree`` with the allocator's current rank pattern on its nodes (``with_rank_pattern``)."""
        return with_rank_pattern(tree, self)


def _is_node(x: Any) -> bool:
    return isinstance(x, Node)


def _ada_nodes(tree: Any) -> list[AdaLoraNode]:
    return [n for n in jax.tree.leaves(tree, is_leaf=_is_node) if isinstance(n, AdaLoraNode)]


def budget_schedule(t: jax.Array, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    delta_t: int) -> tuple[jax.Array, jax.Array]:
    """(budget, mask now?) at step t, as PEFT's ``budget_schedule``."""
    span = max(total_step - tfinal - tinit, 1)
    mul = 1.0 - (t - tinit) / span
    mid = jnp.floor((init_bgt - target_bgt) * mul**3 + target_bgt).astype(jnp.int32)
    budget = jnp.where(t <= tinit, init_bgt, jnp.where(t > total_step - tfinal, target_bgt, mid))
    mask = jnp.where(t <= tinit, False, jnp.where(t > total_step - tfinal, True, t % delta_t == 0))
    return budget, mask


def adalora_allocator(
    base: optax.GradientTransformation, *, target_r: int, total_step: int, tinit: int = 0, tfinal: int = 0,
    delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85,
) -> optax.GradientTransformation:
    """AdaLoRA's rank budget (arXiv 2303.10512, §3.3): wraps ``base`` and, between ``tinit`` and ``total_step -
    tfinal``, every ``delta_t`` steps scores each triplet by the smoothed sensitivity |λ·∂L/∂λ| (EMA
    ``beta1``) times its uncertainty (EMA ``beta2``) and keeps the top ones on a cubic schedule from the
    initial rank to ``target_r`` per matrix on average (``rank_mask``), as PEFT's ``RankAllocator``."""
    if not (0 < beta1 < 1 and 0 < beta2 < 1):
        raise ValueError(f"beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
    if total_step <= tinit + tfinal:
        raise ValueError(f"total_step={total_step} must exceed tinit + tfinal = {tinit + tfinal}")

    def init(params: Any) -> AllocatorState:
        nodes = _ada_nodes(params)
        if not nodes:
            raise ValueError("adalora_allocator: the trainable tree has no AdaLoRA nodes")
        zeros = jax.tree.map(jnp.zeros_like, params)
        keep = [jnp.ones(n.lora_e.shape, bool) for n in nodes]
        return AllocatorState(jnp.zeros((), jnp.int32), zeros, zeros, keep, base.init(params))

    def update(grads: Any, state: AllocatorState, params: Any = None) -> tuple[Any, AllocatorState]:
        if params is None:
            raise ValueError("adalora_allocator needs params: call tx.update(grads, state, params)")
        t = state.count
        updates, base_state = base.update(grads, state.base, params)
        new_params = optax.apply_updates(params, updates)
        nodes = _ada_nodes(new_params)
        init_bgt = sum(int(n.lora_e.size) for n in nodes)
        n_mat = sum(int(n.lora_e.size) // n.lora_e.shape[-1] for n in nodes)
        final_t = total_step - tfinal

        # Importance EMAs (only before the final phase, as PEFT).
        ipt = jax.tree.map(lambda p, g: jnp.abs(p * g), new_params, grads)
        ema_i = jax.tree.map(lambda e, i: beta1 * e + (1 - beta1) * i, state.ema_ipt, ipt)
        ema_u = jax.tree.map(lambda u, i, e: beta2 * u + (1 - beta2) * jnp.abs(i - e), state.ema_unc, ipt, ema_i)
        learning = t < final_t
        ema_i = jax.tree.map(lambda a, b: jnp.where(learning, a, b), ema_i, state.ema_ipt)
        ema_u = jax.tree.map(lambda a, b: jnp.where(learning, a, b), ema_u, state.ema_unc)

        # Triplet scores, one vector per node, then one global threshold.
        scores = []
        for ni, nu in zip(_ada_nodes(ema_i), _ada_nodes(ema_u)):
            s = lambda f: getattr(ni, f) * getattr(nu, f)  # noqa: E731
            scores.append(s("lora_e") + jnp.mean(s("lora_a"), axis=-2) + jnp.mean(s("lora_b"), axis=-1))
        flat = jnp.concatenate([x.reshape(-1) for x in scores])
        budget, mask_now = budget_schedule(t, init_bgt, target_r * n_mat, tinit, tfinal, total_step, delta_t)
        k = jnp.clip(init_bgt - budget, 0, init_bgt)
        threshold = jnp.where(k > 0, jnp.sort(flat)[jnp.maximum(k - 1, 0)], -jnp.inf)
        fresh = [x > threshold for x in scores]
        at_final = t == final_t
        after = t > final_t
        keep = [jnp.where((mask_now & ~after) | at_final, f, old) for f, old in zip(fresh, state.keep)]
        apply_mask = mask_now | at_final | after

        it = iter(keep)

        def mask_e(n: Any) -> Any:
            if not isinstance(n, AdaLoraNode):
                return n
            kept = next(it)
            return n.replace(lora_e=jnp.where(apply_mask & ~kept, 0.0, n.lora_e).astype(n.lora_e.dtype))

        masked = jax.tree.map(mask_e, new_params, is_leaf=_is_node)
        # Reset EMAs at the final allocation (PEFT's reset_ipt).
        ema_i = jax.tree.map(lambda e: jnp.where(at_final, 0.0, e).astype(e.dtype), ema_i)
        ema_u = jax.tree.map(lambda e: jnp.where(at_final, 0.0, e).astype(e.dtype), ema_u)
        new_updates = jax.tree.map(lambda m, p: m - p, masked, params)
        return new_updates, AllocatorState(t + 1, ema_i, ema_u, keep, base_state)

    return optax.GradientTransformation(init, update)


def rank_pattern(state: AllocatorState) -> list[jax.Array]:
    """The kept ranks of each AdaLoRA node (tree order), bool [..., r]: the final rank pattern."""
    return list(state.keep)


def with_rank_pattern(tree: Any, state: AllocatorState) -> Any:
    """The tree with each AdaLoRA node's ``rank_mask`` set to the allocator's pattern (for export)."""
    it = iter(state.keep)

    def set_mask(n: Any) -> Any:
        return n.replace(rank_mask=next(it)) if isinstance(n, AdaLoraNode) else n

    out = jax.tree.map(set_mask, tree, is_leaf=_is_node)
    if next(it, None) is not None:
        raise ValueError("with_rank_pattern: the tree has fewer AdaLoRA nodes than the allocator state")
    return out


@dataclasses.dataclass(frozen=True)
class AdaLora:
    """AdaLoRA (arXiv 2303.10512): budget from the initial rank to ``target_r`` per matrix between ``tinit`` and
    ``total - tfinal`` steps, every ``delta_t``; sensitivity EMAs ``beta1``/``beta2``; ``orth_reg`` weighs the
    orthogonality penalty."""

    target_r: int = 4
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1


def _adalora(s: AdaLora, ctx: OptimContext) -> optax.GradientTransformation:
    return adalora_allocator(plain_optimizer(s, ctx), target_r=s.target_r, total_step=ctx.total_steps, tinit=s.tinit,
                             tfinal=s.tfinal, delta_t=s.delta_t, beta1=s.beta1, beta2=s.beta2)


def _adalora_summary(opt_state: Any) -> dict[str, Any]:
    alloc = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AllocatorState))
             if isinstance(x, AllocatorState)]
    return {"adalora_ranks": [np.asarray(r).tolist() for r in rank_pattern(alloc[0])]} if alloc else {}


register_recipe(Recipe(
    "adalora", "adalora", AdaLora, optimizer=_adalora, tracks_ranks=True, summary=_adalora_summary, figures=("rank_allocation",),
    penalty=lambda s: (lambda tree: s.orth_reg * orthogonal_penalty(tree)) if s.orth_reg else None))


# PEFT's AdaLoRA format (``AdaLoraConfig``): per module ``lora_A`` [k, in], ``lora_E`` [k, 1], ``lora_B`` [out, k]
# truncated to the k kept triplets, with ``rank_pattern``: per module (``<module>.lora_E``, with or without the
# adapter name, as PEFT writes it after or before saving) the mask over ``init_r``; before any allocation
# (``rank_pattern: null``) every triplet is kept. Scale ``alpha / (init_r + 1e-5)`` as PEFT's.
KEYS = (Key.plain("lora_A", "lora_a"), Key("lora_E", ("lora_e",)), Key.plain("lora_B", "lora_b"))


def _peft_write(sites: list[Site], conv1d: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    tensors: dict[str, np.ndarray] = {}
    pattern: dict[str, list[bool]] = {}
    r0 = alpha = None
    for s in sites:
        n = s.node
        r0 = n.lora_a.shape[-1]
        alpha = n.scale * (r0 + 1e-5)
        for m, a, e, b, keep in zip(s.modules, layers(n.lora_a, s.lead), layers(n.lora_e, s.lead),
                                    layers(n.lora_b, s.lead), layers(n.rank_mask, s.lead)):
            keep = keep.astype(bool)
            a, e, b = a.astype(np.float32), e.astype(np.float32), b.astype(np.float32)
            tensors[f"{PREFIX}{m}.{KEYS[0].suffix}"] = np.ascontiguousarray(a.T[keep])
            tensors[f"{PREFIX}{m}.{KEYS[1].suffix}"] = np.ascontiguousarray((e * keep)[keep][:, None])
            tensors[f"{PREFIX}{m}.{KEYS[2].suffix}"] = np.ascontiguousarray(b.T[:, keep])
            pattern[f"{m}.lora_E"] = [bool(k) for k in keep]  # as PEFT saves it (adapter name dropped)
    return {"r": r0, "init_r": r0, "target_r": r0, "lora_alpha": peft_alpha(alpha, 1), "rank_pattern": pattern,
            "total_step": 1000, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
            "orth_reg_weight": 0.5, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}, tensors


def _peft_residual(cfg: dict[str, Any]) -> None:
    init = cfg.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", None):
        raise Refusal("init_lora_weights", f"{init!r} for AdaLoRA (its triplets start from a plain init)")


def _peft_read(cfg: dict[str, Any], found: dict[str, Any], tensors: dict[str, np.ndarray], experts: dict[str, Any],
               residual: str | None) -> tuple[dict[str, Any], Any]:
    return {"variant": "adalora", "r": int(cfg.get("init_r", 12)), "alpha": float(cfg.get("lora_alpha") or 8),
            "dropout": float(cfg.get("lora_dropout") or 0.0)}, None


def _keep(cfg: dict[str, Any], module: str, r: int) -> np.ndarray:
    pattern = cfg.get("rank_pattern") or {}
    for key in (f"{module}.lora_E", f"{module}.lora_E.default"):
        if key in pattern:
            return np.asarray(pattern[key], bool)
    hits = [v for k, v in pattern.items() if k.startswith(f"{module}.lora_E.")]
    return np.asarray(hits[0], bool) if hits else np.ones(r, bool)


def _peft_fill(n: AdaLoraNode, site: Site, tensors: dict[str, np.ndarray], cfg: dict[str, Any], ctx: Any) -> AdaLoraNode:
    d_in, d_out = n.shape[-2:]
    r = n.lora_a.shape[-1]

    a_s, e_s, b_s, masks = [], [], [], []
    for m in site.modules:
        a, e, b = np.zeros((r, d_in), np.float32), np.zeros((r,), np.float32), np.zeros((d_out, r), np.float32)
        keep = np.zeros(r, bool)
        if m is not None:
            keep = _keep(cfg, m, r)
            if keep.shape != (r,):
                raise ValueError(f"rank_pattern of {m} has {keep.size} entries; init_r is {r}")
            k = int(keep.sum())
            a[keep] = module_tensor(tensors, site, m, KEYS[0].suffix, (k, d_in))
            e[keep] = module_tensor(tensors, site, m, KEYS[1].suffix, (k, 1))[:, 0]
            b[:, keep] = module_tensor(tensors, site, m, KEYS[2].suffix, (d_out, k))
        a_s.append(a.T), e_s.append(e), b_s.append(b.T), masks.append(keep)
    return n.replace(lora_a=stack_layers(site, a_s, n.lora_a), lora_e=stack_layers(site, e_s, n.lora_e),
                     lora_b=stack_layers(site, b_s, n.lora_b), rank_mask=stack_layers(site, masks, n.rank_mask))


PEFT = register_codec(PeftCodec(
    "ADALORA", AdaLoraNode, KEYS, write=_peft_write, residual=_peft_residual, read=_peft_read, fill=_peft_fill,
    reads=frozenset({"fan_in_fan_out"})))
