"""The figures of ``train.report``, each from a run's ``metrics.jsonl`` rows (``Run``); each returns the
PNG written (through a temporary file and a rename), or ``None`` where the run has no such data."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from train.metrics import read_jsonl

__all__ = ["Run", "fig_loss", "fig_lr", "fig_rank_allocation", "fig_active_ranks", "fig_magnitude_direction",
           "fig_layer_importance", "fig_tasks", "smooth", "save", "plt", "read_json", "scatter_side", "closest_peer"]


def plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_side(variant: str | None) -> str | None:
    """Which side of the ΔM/ΔD scatter a run of ``variant`` stands on: ``"decomposed"`` where its recipe declares
    the figure (magnitude and direction trained apart: DoRA), ``"joint"`` for the other LoRA-shaped recipes,
    None for the rest (their weights rows are not compared)."""
    from lorax_variants.recipes import RECIPES

    r = RECIPES.get(variant or "")
    if r is None:
        return None
    return "decomposed" if "magnitude_direction" in r.figures else "joint" if r.lora_shaped else None


class Run:
    """A run directory's config, summary and metrics rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{self.path / 'metrics.jsonl'} is missing: {self.path} is not a run directory, or "
                                    "its metrics file was deleted")
        self.rows = read_jsonl(self.path / "metrics.jsonl")
        self.config = read_json(self.path / "config.json")
        self.summary = read_json(self.path / "summary.json")
        self._check_one_run()
        self.name = self.path.name
        self.variant = self.config.get("adapter", {}).get("variant", "?")

    def _check_one_run(self) -> None:
        """The files must be of one run: summary.json names its run and the digest of its config.json."""
        from train.config import config_digest

        ids = {r.get("run_id") for r in self.rows if r.get("kind") == "run"}
        own = self.summary.get("run_id")
        if own is not None and ids and ids != {own}:
            raise ValueError(f"{self.path / 'metrics.jsonl'} holds the metrics of run {sorted(map(str, ids))}, but "
                             f"{self.path / 'summary.json'} is of run {own}: the files are of different runs")
        digest = self.summary.get("config_sha256")
        logged = [r.get("config_sha256") for r in self.rows if r.get("kind") == "config"]
        mine = config_digest(self.config) if self.config else None
        if mine is not None and digest is not None and mine != digest:
            raise ValueError(f"{self.path / 'config.json'} is not the config this run last ran with (its digest "
                             "differs from the one summary.json recorded); rerun the training command to rewrite it")
        if logged and digest is not None and logged[-1] != digest:
            raise ValueError(f"{self.path / 'metrics.jsonl'} is not this run's: the config it logged last differs "
                             f"from the one {self.path / 'summary.json'} recorded; put back the run's metrics file")
        if mine is not None and logged and mine != logged[-1]:  # no summary (a run that did not finish) to tell which
            raise ValueError(f"{self.path / 'config.json'} and {self.path / 'metrics.jsonl'} are of different runs "
                             "(config.json's digest differs from the config metrics.jsonl logged last; one of them "
                             "was replaced or edited); rerun the training command to rewrite config.json, or put back "
                             "the run's metrics file")

    def gaps(self) -> str | None:
        """What the metrics lack: a run summary.json says finished at step N whose rows end earlier."""
        steps = self.summary.get("steps")
        last = max((r.get("step", 0) for r in self.kind("train")), default=0)
        if isinstance(steps, int) and last < steps:
            return f"{self.path / 'metrics.jsonl'} ends at step {last} of the run's {steps} (the file was cut)"
        return None

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("kind") == kind]

    def series(self, kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["step"], r[key]) for r in self.kind(kind) if isinstance(r.get(key), (int, float))]
        return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], float)) if pts else (np.array([]), np.array([]))

    @property
    def model_path(self) -> str | None:
        return self.config.get("model", {}).get("path")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file ({} if absent); anything else is an error naming the file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rerun the training command to rewrite it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def save(fig: Any, path: Path) -> Path:
    """Save as PNG through a temporary file and a rename (a report being redrawn is never seen half-drawn)."""
    import io

    from lorax_variants.hf.safetensors_io import write_bytes_atomic

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.15)  # no text cut at the edges
    finally:
        plt().close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


def smooth(y: np.ndarray, frac: float = 0.1) -> np.ndarray:
    """Exponential moving average (debiased), span ~``frac`` of the points."""
    if len(y) < 5:
        return y
    a = min(1.0, 2.0 / (max(2, int(len(y) * frac)) + 1))
    out, m, w = np.empty_like(y), 0.0, 0.0
    for i, v in enumerate(y):
        m, w = (1 - a) * m + a * v, (1 - a) * w + a
        out[i] = m / w
    return out


def _module(path: str) -> str:
    """A short module name ('attn/q_proj') from a leaf path ('layers/attn/q_proj')."""
    parts = [p for p in path.split("/") if p not in ("layers", "blocks", "h", "encoder", "decoder")]
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def _grid(values: dict[str, list]) -> tuple[list[str], np.ndarray]:
    """``{path: per-layer values}`` as module labels and a [module, layer] array (NaN where absent)."""
    names = sorted(values)
    flat = {k: np.atleast_1d(np.asarray(v, float)) for k, v in values.items()}
    layers = max(len(v) for v in flat.values())
    grid = np.full((len(names), layers), np.nan)
    for i, k in enumerate(names):
        grid[i, : len(flat[k])] = flat[k]
    return [_module(k) for k in names], grid


def fig_loss(run: Run, out: Path) -> Path | None:
    steps, loss = run.series("train", "loss")
    if not len(steps):
        return None
    pyplot = plt()
    evals = run.kind("eval")
    metric = next((k for k in ("preference_accuracy", "reward", "accuracy", "token_accuracy", "perplexity")
                   if evals and k in evals[-1]), None)
    fig, axes = pyplot.subplots(1, 2 if metric else 1, figsize=(11 if metric else 7, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="train loss")
    ax.plot(steps, smooth(loss), color="tab:blue", lw=2, label="train loss (smoothed)")
    es, el = run.series("eval", "loss")
    if len(es):
        ax.plot(es, el, "o-", color="tab:orange", label="eval loss")
    objective = run.config.get("train", {}).get("objective", "sft")
    ax.set(xlabel="step", ylabel="loss (cross-entropy)" if objective == "sft" else f"loss ({objective})",
           title=f"{run.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if metric:
        ms, mv = run.series("eval", metric)
        ax2 = axes[0, 1]
        ax2.plot(ms, mv, "o-", color="tab:green")
        ax2.set(xlabel="step", ylabel=metric.replace("_", " "), title=f"eval {metric.replace('_', ' ')}")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, out / "loss.png")


def fig_preference(run: Run, out: Path) -> Path | None:
    """A preference run's implicit rewards (β log π/π_ref of the chosen and the rejected completion, and their
    margin) over training, and the preference accuracy on training batches and held-out pairs."""
    steps, chosen = run.series("train", "rewards_chosen")
    if not len(steps):
        return None
    pyplot = plt()
    fig, (ax, ax2) = pyplot.subplots(1, 2, figsize=(11, 4))
    for key, color, label in (("rewards_chosen", "tab:green", "chosen"), ("rewards_rejected", "tab:red", "rejected"),
                              ("rewards_margin", "tab:blue", "margin (chosen - rejected)")):
        s, v = run.series("train", key)
        ax.plot(s, smooth(v), color=color, lw=2, label=f"train {label}")
        es, ev = run.series("eval", key)
        if len(es):
            ax.plot(es, ev, "o--", color=color, label=f"eval {label}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="step", ylabel="implicit reward", title=f"{run.name}: rewards")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    s, v = run.series("train", "preference_accuracy")
    ax2.plot(s, smooth(v), color="tab:blue", lw=2, label="train batches (smoothed)")
    es, ev = run.series("eval", "preference_accuracy")
    if len(es):
        ax2.plot(es, ev, "o-", color="tab:orange", label="held-out pairs")
    ax2.set(xlabel="step", ylabel="chosen reward > rejected", title="preference accuracy", ylim=(-0.02, 1.02))
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out / "preference.png")


def fig_grpo(run: Run, out: Path) -> Path | None:
    """A GRPO run: the mean reward of the sampled completions (and its spread within groups, what the advantages
    are made of) and the held-out greedy reward; the completions' length and how many hit the limit; the KL to
    the reference and the clipped share of tokens."""
    steps, reward = run.series("train", "reward")
    if not len(steps):
        return None
    pyplot = plt()
    fig, (ax, ax2, ax3) = pyplot.subplots(1, 3, figsize=(15, 4))
    ax.plot(steps, reward, color="tab:blue", alpha=0.3, lw=1)
    ax.plot(steps, smooth(reward), color="tab:blue", lw=2, label="sampled completions (smoothed)")
    s, v = run.series("train", "reward_std_in_group")
    ax.plot(s, smooth(v), color="tab:purple", lw=1.5, ls="--", label="std within groups (smoothed)")
    es, ev = run.series("eval", "reward")
    if len(es):
        ax.plot(es, ev, "o-", color="tab:orange", label="held-out prompts, greedy")
    ax.set(xlabel="step", ylabel="reward", title=f"{run.name}: reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    s, v = run.series("train", "completion_length")
    ax2.plot(s, smooth(v), color="tab:green", lw=2, label="mean completion length")
    ax2b = ax2.twinx()
    s, v = run.series("train", "clipped_completions")
    ax2b.plot(s, smooth(v), color="tab:gray", lw=1.5, ls="--", label="share at the length limit")
    ax2b.set(ylim=(-0.02, 1.02), ylabel="share at the limit")
    ax2.set(xlabel="step", ylabel="tokens", title="completions")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper left", fontsize=8)
    ax2b.legend(loc="upper right", fontsize=8)
    for key, color, label in (("kl", "tab:red", "KL to the reference"), ("clip_ratio", "tab:brown", "clipped tokens")):
        s, v = run.series("train", key)
        if len(s):
            ax3.plot(s, smooth(v), color=color, lw=2, label=label)
    ax3.set(xlabel="step", title="KL and clipping")
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out / "grpo.png")


def fig_lr(run: Run, out: Path) -> Path | None:
    rows = run.kind("train")
    keys = sorted({k for r in rows for k in r if k == "lr" or k.startswith("lr_")})
    if not keys:
        return None
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4))
    for k in keys:
        s, v = run.series("train", k)
        label = {"lr": "lr (base group" + (", LoRA+ A)" if len(keys) > 1 else ")"), "lr_B": "lr of B (LoRA+)",
                 "lr_embedding": "lr of embedding B (LoRA+)"}.get(k, k)
        ax.plot(s, v, lw=2, label=label)
    vals = np.concatenate([run.series("train", k)[1] for k in keys])
    pos = vals[vals > 0]
    if len(keys) > 1 and len(pos) and pos.max() / pos.min() > 5:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="learning rate", title=f"{run.name}: learning rate per parameter group")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return save(fig, out / "lr.png")


def _heatmap(ax: Any, names: list[str], grid: np.ndarray, *, vmax: float, cmap: str, fmt: str = "{:.0f}") -> Any:
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(grid.shape[1]), [str(i) for i in range(grid.shape[1])])
    if grid.size <= 400:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                        color="white" if v < 0.5 * vmax else "black")
    return im


def fig_rank_allocation(run: Run, out: Path) -> list[Path]:
    """The final rank per layer and module (a heatmap) and the rank budget over training (a rank allocator's)."""
    ranks = run.kind("ranks")
    if not ranks:  # (drawn for the variants whose recipe names it)
        return []
    pyplot = plt()
    r = run.config.get("adapter", {}).get("r", 8)
    names, grid = _grid(ranks[-1]["ranks"])
    fig, ax = pyplot.subplots(figsize=(max(6, 0.5 * grid.shape[1] + 3), max(2.5, 0.45 * len(names) + 1.5)))
    im = _heatmap(ax, names, grid, vmax=r, cmap="viridis")
    fig.colorbar(im, ax=ax, label="rank kept")
    ax.set(xlabel="layer", ylabel="module", title=f"{run.name} ({run.variant}): final rank per layer and module\n"
                                                    f"(of initial r={r}, at step {ranks[-1]['step']})")
    fig.tight_layout()
    paths = [save(fig, out / "rank_allocation.png")]
    fig, ax = pyplot.subplots(figsize=(7, 4))
    s, tot = run.series("ranks", "total")
    ax.plot(s, tot, lw=2, label="total rank kept")
    opt = run.config.get("adapter", {}).get(run.variant, {})  # the variant's own section (target_r, tinit, ...)
    target = opt.get("target_r")
    cells = int(np.isfinite(grid).sum())
    if target:
        ax.axhline(target * cells, color="tab:red", ls="--", label=f"target budget ({target} x {cells} weights)")
    ax.axhline(r * cells, color="gray", ls=":", label=f"initial budget ({r} x {cells})")
    steps = run.config.get("train", {}).get("steps")
    # The allocator's step t is the 0-based count: logged step t + 1.
    if opt.get("tinit") is not None:
        ax.axvline(opt["tinit"] + 1, color="tab:gray", alpha=0.6, lw=1, label="pruning starts after (tinit)")
    if opt.get("tfinal") is not None and steps:
        ax.axvline(steps - opt["tfinal"] + 1, color="tab:gray", alpha=0.6, lw=1, ls="-.",
                   label="target budget from (steps - tfinal)")
    ax.set(xlabel="step", ylabel="sum of ranks over adapted weights", title=f"{run.name} ({run.variant}): rank budget over training")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(save(fig, out / "rank_budget.png"))
    return paths


def fig_active_ranks(run: Run, out: Path) -> Path | None:
    """Ranks still active per layer and module over training, and their total (gates driven to zero)."""
    rows = run.kind("ranks")
    if not rows:
        return None
    pyplot = plt()
    labels, series = [], []
    for path in sorted(rows[-1]["ranks"]):
        per = np.array([np.atleast_1d(r["ranks"][path]) for r in rows], float)  # [time, layer]
        for layer in range(per.shape[1]):
            labels.append(f"{_module(path)} L{layer}" if per.shape[1] > 1 else _module(path))
            series.append(per[:, layer])
    grid = np.array(series)
    steps = [r["step"] for r in rows]
    r = run.config.get("adapter", {}).get("r", 8)
    fig, (ax, ax2) = pyplot.subplots(2, 1, figsize=(9, max(4.5, 0.22 * len(labels) + 3)),
                                  gridspec_kw={"height_ratios": [max(2, len(labels) / 6), 1]}, sharex=False)
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=r, interpolation="nearest",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, len(labels) - 0.5, -0.5))
    ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 20 else 9)
    ax.set(xlabel="step", ylabel="module, layer", title=f"{run.name} ({run.variant}): active ranks (non-zero gates, of r={r})")
    fig.colorbar(im, ax=ax, label="active ranks")
    ax2.plot(steps, grid.sum(axis=0), lw=2)
    ax2.set_xlim(ax.get_xlim())
    ax2.set(xlabel="step", ylabel="total active ranks")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, out / "active_ranks.png")


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def closest_peer(run: Run, peers: list[Run]) -> Run | None:
    """The LoRA/DoRA run on the other side of ``run`` (DoRA vs LoRA) of the same base model whose config
    differs least from ``run``'s (name, output directory and variant aside); the newest on a tie."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()}

    ignore = {"name.", "train.output_dir.", "adapter.variant."}
    mine = {k: v for k, v in flat(run.config).items() if k not in ignore}
    side = scatter_side(run.variant)
    fits = [p for p in peers if scatter_side(p.variant) not in (None, side) and p.model_path == run.model_path
            and p.kind("weights")]
    if not fits:
        return None

    def distance(p: Run) -> tuple[int, float]:
        theirs = {k: v for k, v in flat(p.config).items() if k not in ignore}
        diff = sum(mine.get(k) != theirs.get(k) for k in set(mine) | set(theirs))
        return diff, -(p.path / "metrics.jsonl").stat().st_mtime

    return min(fits, key=distance)


def fig_magnitude_direction(run: Run, peers: list[Run], out: Path, *, all_peers: bool = False) -> Path | None:
    """ΔM vs ΔD per layer at each checkpoint for one module, a panel per run (this one first).

    A run's own report shows it beside at most one run of the other kind (DoRA vs LoRA) of the same base:
    the one whose config is closest (``closest_peer``). ``all_peers`` (the comparison page) shows every
    LoRA/DoRA run given, three panels to a row."""
    if scatter_side(run.variant) is None or not run.kind("weights"):
        return None
    if all_peers:
        others = [p for p in peers if scatter_side(p.variant) is not None and p.kind("weights")]
    else:
        others = [p for p in [closest_peer(run, peers)] if p is not None]
    runs = [run, *others]
    pyplot = plt()
    module = _pick_module(runs[0].kind("weights")[-1]["dM"])
    cols = min(3, len(runs))
    rows_n = -(-len(runs) // cols)
    fig, axes = pyplot.subplots(rows_n, cols, figsize=(5.4 * cols, 4.6 * rows_n + 0.6), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, runs):
        rows = r.kind("weights")
        cmap = pyplot.get_cmap("viridis")
        xs, ys = [], []
        for i, row in enumerate(rows):
            if module not in row["dM"]:
                continue
            dm, dd = np.atleast_1d(row["dM"][module]), np.atleast_1d(row["dD"][module])
            ax.scatter(dd, dm, color=cmap(i / max(1, len(rows) - 1)), s=28, label=f"step {row['step']}", zorder=3)
            for layer, (x, y) in enumerate(zip(dd, dm)):
                if len(dd) <= 12 and i == len(rows) - 1:
                    ax.annotate(f"L{layer}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            xs.extend(dd)
            ys.extend(dm)
        k = _slope(np.array(xs), np.array(ys))
        ax.set(xlabel="ΔD (direction change, 1 - cos)", ylabel="ΔM (magnitude change)")
        ax.set_title(_wrap(f"{r.name} ({r.variant}): {module}", 48) + f"\nslope of ΔM on ΔD: {k:+.3g}", fontsize=10)
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(_wrap("Magnitude vs direction change per layer (DoRA paper, Fig. 2): LoRA's slope is positive, "
                       "DoRA's can be negative", 60 * cols), fontsize=9)
    fig.tight_layout()
    return save(fig, out / "magnitude_direction.png")


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=True)) or text


def _pick_module(paths: dict[str, Any]) -> str:
    """The query projection where there is one (the paper's Figure 2), else the first adapted weight."""
    for pat in ("q_proj", "query", "c_attn", "attn"):
        hit = sorted(p for p in paths if pat in p)
        if hit:
            return hit[0]
    return sorted(paths)[0]


def fig_layer_importance(run: Run, out: Path) -> Path | None:
    """Each layer's importance and the cumulative selection against the threshold (LoRA-drop's reshape report,
    the rows the run logs under its variant's name)."""
    rows = run.kind(run.variant)
    if not rows:
        return None
    row = rows[-1]
    pyplot = plt()
    labels, imp, kept = [], [], []
    for path in sorted(row["importance"]):
        vals, keep = np.atleast_1d(row["importance"][path]), np.atleast_1d(row["keep"][path])
        for layer, (v, k) in enumerate(zip(vals, keep)):
            labels.append(f"{_module(path)} L{layer}" if len(vals) > 1 else _module(path))
            imp.append(float(v))
            kept.append(bool(k))
    imp_a, kept_a = np.array(imp), np.array(kept)
    fig, (ax, ax2) = pyplot.subplots(1, 2, figsize=(12, max(4, 0.22 * len(labels) + 1.5)))
    y = np.arange(len(labels))
    ax.barh(y[kept_a], imp_a[kept_a], color="tab:blue", label="keeps its own adapter")
    ax.barh(y[~kept_a], imp_a[~kept_a], color="tab:gray", label="shares one adapter per shape")
    ax.set_yticks(y, labels, fontsize=7 if len(labels) > 20 else 9)
    ax.invert_yaxis()
    ax.set(xlabel="importance (share of total ‖ΔW x‖²)", title=f"{run.name} ({run.variant}): layer importance at step {row['step']}")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    order = np.argsort(-imp_a)
    cum = np.cumsum(imp_a[order])
    ax2.plot(np.arange(1, len(cum) + 1), cum, "o-", ms=3, label="cumulative importance (most important first)")
    ax2.axhline(row["threshold"], color="tab:red", ls="--", label=f"threshold {row['threshold']:g}")
    ax2.axvline(int(kept_a.sum()) + 0.5, color="tab:blue", alpha=0.6, label=f"{int(kept_a.sum())} layers kept")
    ax2.set(xlabel="layers, by importance", ylabel="cumulative share", title="selection", ylim=(0, 1.05))
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save(fig, out / "layer_importance.png")


def fig_tasks(run: Run, out: Path) -> Path | None:
    evals = run.kind("eval")
    tasks = sorted({int(m.group(1)) for r in evals for k in r for m in [re.match(r"task(\d+)_loss$", k)] if m})
    if not tasks:
        return None
    adapter = run.config.get("adapter", {})
    section = adapter.get(adapter.get("variant", ""), {})
    listed = section.get("adapters") if isinstance(section, dict) else None  # many adapters: their names
    names = ([a.get("name") for a in listed] if listed else None) or run.config.get("data", {}).get("tasks") or \
        [f"task {t}" for t in tasks]
    metric = next((k for k in ("accuracy", "token_accuracy") if f"task{tasks[0]}_{k}" in evals[-1]), None)
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2 if metric else 1, figsize=(11 if metric else 6, 4), squeeze=False)
    for t in tasks:
        name = names[t] if t < len(names) else f"task {t}"
        s, v = run.series("eval", f"task{t}_loss")
        axes[0, 0].plot(s, v, "o-", label=str(name))
        if metric:
            s, v = run.series("eval", f"task{t}_{metric}")
            axes[0, 1].plot(s, v, "o-", label=str(name))
    axes[0, 0].set(xlabel="step", ylabel="eval loss", title=f"{run.name}: eval loss per task")
    if metric:
        axes[0, 1].set(xlabel="step", ylabel=metric.replace("_", " "), title=f"eval {metric.replace('_', ' ')} per task")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save(fig, out / "tasks.png")


