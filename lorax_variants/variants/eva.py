"""EVA, LoRA initialized from the principal directions of each layer's inputs (arXiv 2410.07170; PEFT
``init_lora_weights="eva"``).

Before training, the inputs X of every adapted layer over a few batches (the tokens a mask keeps: PEFT's
attention mask and labels != -100) go through an incremental PCA (PEFT's ``IncrementalPCA``: mean-centred,
float64, batch after batch) keeping ρ·r components per layer, until the leading components of every layer
stop moving (cosine similarity to the previous batch's >= τ, batches cycled as PEFT does). The rank budget
(the sum of the layers' r) is then redistributed: the layers' explained-variance ratios are ranked together
and each layer keeps as many components as it has among the top ``budget`` (layers reading the same input,
such as q/k/v, share one PCA, and the one PEFT computes it for holds the larger rank). Each layer's A is its
first ``rank`` components (divided by √singular value with ``whiten``), B = 0, the base unchanged; with
``adjust_scaling_factors`` alpha follows the rank (alpha·rank/r), so the scale stays alpha/r.

Layers of one stacked path may end with different ranks: the node keeps the path's largest and leaves the
rest of each layer's A and B zero, which is the smaller rank exactly (zero rows of A and columns of B get zero
gradients from B = 0 and stay zero). Scales differing per layer (``adjust_scaling_factors=False``) cannot be
one node's scale and are refused for stacked paths.

The inputs reach the host through ``jax.debug.callback`` from a probe in place of each adapted weight, one
call per layer and batch (the PCA runs in numpy on the host, as PEFT runs it in torch). PCA step: the exact
SVD where ρ·r·2 >= the input size (PEFT's ``torch.svd_lowrank`` is exact there too), else a randomized one of
the same algorithm; equal to PEFT on the same model, data and settings in the first case."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.nodes.base import Node, dense, frozen, node, static
from lorax_variants.recipes import InitData, InitRecipe, register_init
from lorax_variants.tree import leaves_with_paths, map_with_paths
from lorax_variants.variants.lora import LoraNode

__all__ = ["Eva", "eva", "IncrementalPCA"]


@dataclasses.dataclass(frozen=True)
class Eva:
    """EVA's options, as PEFT's ``EvaConfig`` (``rho``, ``tau``, ``whiten``, ``adjust_scaling_factors``), and the
    app's: how many training batches it cycles (``batches``) and how many passes over them it allows before
    refusing layers that have not converged (``max_passes``)."""

    rho: float = 2.0
    tau: float = 0.99
    whiten: bool = False
    adjust_scaling_factors: bool = True
    batches: int = 8
    max_passes: int = 20

    def __post_init__(self) -> None:
        if not self.rho >= 1.0:
            raise ValueError(f"Eva.rho must be >= 1.0, got {self.rho!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"Eva.tau must be in [0, 1], got {self.tau!r}")
        for name in ("batches", "max_passes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Eva.{name} must be a positive integer, got {v!r}")


def _svd_lowrank(x: np.ndarray, q: int, niter: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Randomized SVD (``torch.svd_lowrank``'s algorithm) in numpy float64; exact where q >= min(x.shape)."""
    if q >= min(x.shape):
        return np.linalg.svd(x, full_matrices=False)
    m, n = x.shape
    flip = m < n
    a = x.T if flip else x
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(a @ rng.standard_normal((a.shape[1], q)))[0]
    for _ in range(niter):
        basis = np.linalg.qr(a.T @ basis)[0]
        basis = np.linalg.qr(a @ basis)[0]
    u, s, vh = np.linalg.svd(basis.T @ a, full_matrices=False)
    u = basis @ u
    return (vh.T, s, u.T) if flip else (u, s, vh)


class IncrementalPCA:
    """PEFT's ``IncrementalPCA`` (``lowrank=True``: q = 2·n_components, 4 power iterations, a fixed seed) in
    numpy float64: ``partial_fit(X)`` batch after batch; ``components_``, ``singular_values_``,
    ``explained_variance_ratio_`` after each."""

    def __init__(self, n_components: int, seed: int = 42) -> None:
        self.n_components, self.q, self.seed = n_components, 2 * n_components, seed
        self.components_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.var_: np.ndarray | None = None
        self.n_seen = 0

    def partial_fit(self, x: np.ndarray) -> None:
        """One batch ``x [n, d]``: the running mean and variance updated, then the SVD of the kept components
        (scaled by their singular values), the batch centred on its mean, and the mean correction."""
        x = np.asarray(x, np.float64)
        n, d = x.shape
        if self.n_components > d:
            raise ValueError(f"n_components={self.n_components} exceeds the input size {d}")
        last_n = self.n_seen
        total = last_n + n
        new_sum = x.sum(0)
        t = new_sum / n
        tmp = x - t
        new_unnorm = (tmp ** 2).sum(0) - tmp.sum(0) ** 2 / n
        if last_n == 0:
            mean, var = new_sum / total, new_unnorm / total
        else:
            last_sum = self.mean_ * last_n
            ratio = last_n / n
            var = (self.var_ * last_n + new_unnorm + ratio / total * (last_sum / ratio - new_sum) ** 2) / total
            mean = (last_sum + new_sum) / total
        if self.components_ is None:
            x = x - mean
        else:
            batch_mean = x.mean(0)
            correction = np.sqrt((last_n / total) * n) * (self.mean_ - batch_mean)
            x = np.vstack([self.singular_values_[:, None] * self.components_, x - batch_mean, correction[None]])
        _, s, vt = _svd_lowrank(x, self.q, 4, self.seed)
        big = np.argmax(np.abs(vt), axis=1)  # PEFT's svd_flip (v-based): each row's largest entry positive
        vt = vt * np.sign(vt[np.arange(vt.shape[0]), big])[:, None]
        k = self.n_components
        self.components_, self.singular_values_ = vt[:k], s[:k]
        self.explained_variance_ratio_ = (s ** 2 / np.sum(var * total))[:k]
        self.mean_, self.var_, self.n_seen = mean, var, total


@node
class _Probe(Node):
    """An adapted weight during EVA's statistics pass: ``x W`` and, as a side effect, its inputs to the host."""

    weight: Any = frozen()
    layer: jax.Array = frozen()  # this layer's index (sliced out of [L] under a scan over stacked layers)
    mask: jax.Array = frozen()  # [..., B, T] tokens to use
    tag: int = static()

    def apply(self, x: jax.Array) -> jax.Array:
        jax.debug.callback(_SINK.take, self.tag, self.layer, x, self.mask)
        return dense(x, self.weight)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> Any:
        return self.weight.dtype


class _Sink:
    """Where the probes' inputs land: tag -> layer -> the rows the mask keeps (one batch at a time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: dict[tuple[int, int], np.ndarray] = {}

    def take(self, tag: Any, layer: Any, x: Any, mask: Any) -> None:
        x, keep = np.asarray(x), np.asarray(mask).astype(bool)
        rows = x.reshape(-1, x.shape[-1])[keep.reshape(-1)] if keep.size == x.size // x.shape[-1] else \
            x.reshape(-1, x.shape[-1])
        with self.lock:
            self.rows[(int(tag), int(layer))] = rows.astype(np.float32)


_SINK = _Sink()


def _layer_inputs(tree: Any, forward: Callable[[Any, Any], Any], paths: list[str], batch: Any,
                  mask: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """(path index, layer) -> the masked input rows of that adapted weight on ``batch``."""
    nodes = dict(leaves_with_paths(tree, nodes_are_leaves=True))

    def probe(path: str, n: Any) -> Any:
        if path not in paths:
            return n
        lead = n.shape[:-2]
        layers = int(np.prod(lead)) if lead else 1
        idx = jnp.arange(layers, dtype=jnp.int32).reshape(lead) if lead else jnp.int32(0)
        m = jnp.broadcast_to(jnp.asarray(mask), tuple(lead) + mask.shape)
        return _Probe(weight=n.weight, layer=idx, mask=m, tag=paths.index(path))

    probed = map_with_paths(probe, tree, nodes_are_leaves=True)
    with _SINK.lock:
        _SINK.rows = {}
    jax.block_until_ready(forward(probed, batch))  # (jitted by eva: one program for every batch of a shape)
    jax.effects_barrier()
    with _SINK.lock:
        rows, _SINK.rows = _SINK.rows, {}
    want = {(i, k) for i, p in enumerate(paths) for k in range(int(np.prod(nodes[p].shape[:-2])) or 1)}
    if set(rows) != want:
        missing = sorted({paths[i] for i, _ in want - set(rows)})
        raise ValueError(f"eva: the forward never reached {missing[:4]} (EVA needs every adapted weight applied "
                         "through the node protocol, unchunked)")
    return rows


def eva(tree: Any, forward: Callable[[Any, Any], Any], batches: Iterable[Any],
        mask: Callable[[Any], Any] | None = None, settings: Eva = Eva()) -> Any:
    """``tree``'s LoRA nodes initialized by EVA (the module docstring): ``forward(tree, batch)`` runs the model
    (jitted here, once per batch shape; its output is only waited for), ``batches`` are cycled until every layer's PCA converges (at most
    ``settings.max_passes`` passes), ``mask(batch)`` gives the [B, T] tokens whose inputs count (default: all).
    Returns the tree with each node's A set (B zero, the base unchanged; ranks redistributed, padded with zeros
    to the path's largest) and, with ``adjust_scaling_factors=False``, refuses stacked paths whose layers end
    with different ranks."""
    batches = list(batches)
    if not batches:
        raise ValueError("eva: no batches")
    nodes = {p: n for p, n in leaves_with_paths(tree, nodes_are_leaves=True) if isinstance(n, LoraNode)}
    if not nodes:
        raise ValueError("eva: the tree has no LoRA adapters")
    paths = sorted(nodes, key=_module_order)
    for p in paths:
        if isinstance(nodes[p].weight, Node):
            raise ValueError(f"{p}: EVA reads the layer's inputs through the full-precision weight here; initialize "
                             "before quantizing")
    masks = [np.asarray(mask(b)) if mask is not None else None for b in batches]
    forward = jax.jit(forward)

    def inputs(i: int) -> dict[tuple[int, int], np.ndarray]:
        b = batches[i]
        m = masks[i]
        if m is None:
            first = jax.tree.leaves(b)[0]
            m = np.ones(np.shape(first)[:2], bool)
        return _layer_inputs(tree, forward, paths, b, m)

    r_of = {p: int(nodes[p].lora_a.shape[-1]) for p in paths}
    # PEFT's module order: layer by layer, within a layer q, k, v, o, gate, up, down (ties in the rank ranking
    # and which of the layers sharing an input holds the PCA follow it)
    keys = sorted(((i, k) for i, p in enumerate(paths) for k in range(int(np.prod(nodes[p].shape[:-2])) or 1)),
                  key=lambda key: (key[1], key[0]))
    max_comp = {key: round(r_of[paths[key[0]]] * settings.rho) for key in keys}
    budget = sum(r_of[paths[i]] for i, _ in keys)
    # layers reading the same inputs share one PCA (PEFT hashes the first batch's inputs)
    first = inputs(0)
    rep: dict[tuple[int, int], tuple[int, int]] = {}
    for key in keys:
        same = next((o for o in keys if o in rep and rep[o] == o and first[o].shape == first[key].shape
                     and np.array_equal(first[o], first[key])), None)
        rep[key] = same if same is not None else key
    for key in keys:  # a shared PCA keeps the most components any of its layers asks for
        max_comp[rep[key]] = max(max_comp[rep[key]], max_comp[key])
    for key in keys:
        max_comp[key] = max_comp[rep[key]]
    heads = [k for k in keys if rep[k] == k]
    pca = {k: IncrementalPCA(max_comp[k]) for k in heads}
    converged = {k: np.zeros(max_comp[k], bool) for k in heads}
    done = {k: False for k in heads}
    rank = dict(max_comp)
    steps, limit = 0, settings.max_passes * len(batches)
    while True:
        for k in heads:
            ok = bool(np.all(converged[k][: rank[k]]))
            if not done[k] and ok:
                done[k] = True
            elif done[k] and not ok:
                done[k] = False
        if all(done.values()):
            break
        if steps >= limit:
            left = sorted({paths[i] for i, _ in heads if not done[(i, _)]})
            raise ValueError(f"eva: the input PCA of {left[:4]} did not converge (tau={settings.tau}) in "
                             f"{settings.max_passes} passes over {len(batches)} batches; raise Eva.max_passes or "
                             "give more batches")
        rows = first if steps == 0 else inputs(steps % len(batches))
        steps += 1
        for k in heads:
            if done[k] or rows[k].shape[0] < max_comp[k]:
                continue
            prev = None if pca[k].components_ is None else pca[k].components_.copy()
            pca[k].partial_fit(rows[k])
            if prev is not None:
                c = pca[k].components_
                sim = np.sum(c * prev, 1) / np.maximum(np.linalg.norm(c, axis=1) * np.linalg.norm(prev, axis=1), 1e-8)
                converged[k] = sim >= settings.tau
        if not all(pca[k].components_ is not None for k in heads):
            continue
        rank = _distribute(keys, rep, pca, max_comp, budget)
    return _with_components(tree, nodes, paths, keys, rep, pca, rank, settings)


_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "gate_proj", "up_proj", "c_fc", "down_proj")


def _module_order(path: str) -> tuple:
    """Paths in the order transformers defines the modules (attention before MLP, q, k, v, o, gate, up, down)."""
    leaf = path.rsplit("/", 1)[-1]
    return ("mlp" in path.split("/"), _ORDER.index(leaf) if leaf in _ORDER else len(_ORDER), path)


def _distribute(keys: list, rep: dict, pca: dict, max_comp: dict, budget: int) -> dict:
    """PEFT's rank redistribution: the layers' explained-variance ratios ranked together (the layers that hold a
    PCA first, then those sharing one, as PEFT lists them); each layer keeps its share of the top ``budget``; a
    shared PCA's own layer holds the larger rank."""
    owners, values = [], []
    for key in [k for k in keys if rep[k] == k] + [k for k in keys if rep[k] != k]:
        evr = pca[rep[key]].explained_variance_ratio_[: max_comp[key]]
        owners += [key] * len(evr)
        values += list(evr)
    order = np.argsort(-np.asarray(values), kind="stable")[:budget]
    counts = {k: 0 for k in keys}
    for i in order:
        counts[owners[i]] += 1
    for key in keys:
        head = rep[key]
        if head != key and counts[head] < counts[key]:
            counts[head], counts[key] = counts[key], counts[head]
    return counts


def _with_components(tree: Any, nodes: dict, paths: list[str], keys: list, rep: dict, pca: dict, rank: dict,
                     settings: Eva) -> Any:
    by_path: dict[str, dict[int, tuple[int, np.ndarray]]] = {}
    for key in keys:
        comp = pca[rep[key]].components_[: rank[key]]
        if settings.whiten:
            comp = comp / np.sqrt(pca[rep[key]].singular_values_[: rank[key]])[:, None]
        by_path.setdefault(paths[key[0]], {})[key[1]] = (rank[key], comp)

    def one(path: str, n: Any) -> Any:
        if path not in by_path:
            return n
        layers = by_path[path]
        r = int(n.lora_a.shape[-1])
        top = max(k for k, _ in layers.values())
        ranks = {k for k, _ in layers.values()}
        if not settings.adjust_scaling_factors and len(ranks) > 1:
            raise ValueError(f"{path}: EVA gave its layers ranks {sorted(ranks)}; without adjust_scaling_factors each "
                             "would need its own scale alpha/rank, which one stacked node cannot hold")
        width = max(top, 1)
        lead = n.shape[:-2]
        d_in, d_out = n.shape[-2:]
        a = np.zeros(tuple(lead) + (d_in, width), np.float32)
        for layer, (k, comp) in layers.items():
            idx = np.unravel_index(layer, lead) if lead else ()
            a[idx + (slice(None), slice(0, k))] = comp.T
        b = jnp.zeros(tuple(lead) + (width, d_out), n.lora_b.dtype)
        scale = n.scale
        if not settings.adjust_scaling_factors and top != r:  # PEFT: alpha / new rank (rsLoRA: alpha / sqrt)
            scale = n.scale * (r / top if not getattr(n, "rslora", False) else (r / top) ** 0.5)
        return n.replace(lora_a=jnp.asarray(a, n.lora_a.dtype), lora_b=b, scale=scale)

    return map_with_paths(one, tree, nodes_are_leaves=True)


def _from_data(settings: Eva, tree: Any, data: InitData) -> Any:
    """The app's EVA: the input PCA over this host's first ``settings.batches`` training batches (the tokens the
    loss covers). Deterministic: a resume or an export that prepares the run again gets the same adapters."""
    return eva(tree, data.forward, data.host_batches(settings.batches), mask=data.token_mask, settings=settings)


def _check(settings: Eva, adapter: Any) -> None:
    if getattr(adapter, "rslora", False):
        raise ValueError("rslora: eva with rsLoRA: PEFT's per-layer alpha adjustment gives each layer its own scale "
                         "alpha·√rank/r, which one stacked node cannot hold")


register_init(InitRecipe(
    "eva", Eva, from_data=_from_data, lora_only=True, refuses_quant=True, single_host=True, check=_check,
    describe=lambda s: f"EVA: adapters set from the input components of the first {s.batches} training batches "
                       "(the rank budget redistributed by explained variance)"))
