"""``python -m train report RUN_DIR [RUN_DIR ...] [--out DIR]``: figures of what a run did, and a page.

One run directory: ``RUN_DIR/report/`` gets PNGs (matplotlib, Agg) and ``index.html`` with the run's
config and summary. Written automatically at the end of every run. Several: each gets its report and
``--out`` (default: ``comparison/`` beside the first) gets a page with the variants side by side.

Figures, each drawn when the run has the data (``metrics.jsonl`` rows of kind train, eval, ranks,
weights, lora_drop, written by ``train.run``):
- ``loss.png``: train loss (raw and smoothed) and eval loss; the eval metric beside it.
- ``lr.png``: the learning rate of each parameter group (LoRA+: A's and B's).
- ``adalora_ranks.png``: AdaLoRA's final rank per layer and module (the paper's rank-allocation
  heatmap); ``adalora_budget.png``: the total rank over training against the target.
- ``sora_ranks.png``: SoRA's active ranks per layer and module over training, and their total.
- ``dora_scatter.png``: ΔM against ΔD per layer at each checkpoint (DoRA paper, Figure 2), for this
  run and any LoRA/DoRA run of the same base model given alongside or found beside it.
- ``lora_drop.png``: LoRA-drop's importance per layer, which layers kept their adapters, and the
  cumulative share against the threshold.
- ``tasks.png``: multi-task eval metrics per task.
"""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from train.metrics import read_jsonl

__all__ = ["report", "compare", "main"]

_ADAPTER_VARIANTS = ("lora", "rslora", "pissa", "lora_fa", "loraplus", "dora", "dylora", "vera", "qlora")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Run:
    """A run directory's config, summary and metrics rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{self.path}: not a run directory (no metrics.jsonl)")
        self.rows = read_jsonl(self.path / "metrics.jsonl")
        self.config = _json(self.path / "config.json")
        self.summary = _json(self.path / "summary.json")
        self.name = self.path.name
        self.variant = self.config.get("adapter", {}).get("variant", "?")

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("kind") == kind]

    def series(self, kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["step"], r[key]) for r in self.kind(kind) if isinstance(r.get(key), (int, float))]
        return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], float)) if pts else (np.array([]), np.array([]))

    @property
    def model_path(self) -> str | None:
        return self.config.get("model", {}).get("path")


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(fig: Any, path: Path) -> Path:
    """Save through a temporary file and rename (a report being rewritten is never seen half-drawn)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        _plt().close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _smooth(y: np.ndarray, frac: float = 0.1) -> np.ndarray:
    """Exponential moving average (debiased), span ~``frac`` of the points."""
    if len(y) < 5:
        return y
    a = min(1.0, 2.0 / (max(2, int(len(y) * frac)) + 1))
    out, m, w = np.empty_like(y), 0.0, 0.0
    for i, v in enumerate(y):
        m, w = (1 - a) * m + a * v, (1 - a) * w + a
        out[i] = m / w
    return out


def _module_layer(path: str) -> tuple[str, str]:
    """A short module name ('attn/q_proj') from a leaf path ('layers/attn/q_proj')."""
    parts = [p for p in path.split("/") if p not in ("layers", "blocks", "h", "encoder", "decoder")]
    return "/".join(parts[-2:]) if len(parts) > 1 else path, path


def _grid(values: dict[str, list]) -> tuple[list[str], np.ndarray]:
    """``{path: per-layer values}`` as module labels and a [module, layer] array (NaN where absent)."""
    names = sorted(values)
    flat = {k: np.atleast_1d(np.asarray(v, float)) for k, v in values.items()}
    layers = max(len(v) for v in flat.values())
    grid = np.full((len(names), layers), np.nan)
    for i, k in enumerate(names):
        grid[i, : len(flat[k])] = flat[k]
    return [_module_layer(k)[0] for k in names], grid


# --- figures ------------------------------------------------------------------------------------------

def fig_loss(run: Run, out: Path) -> Path | None:
    steps, loss = run.series("train", "loss")
    if not len(steps):
        return None
    plt = _plt()
    evals = run.kind("eval")
    metric = next((k for k in ("accuracy", "token_accuracy", "perplexity") if evals and k in evals[-1]), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(11 if metric else 7, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="train loss")
    ax.plot(steps, _smooth(loss), color="tab:blue", lw=2, label="train loss (smoothed)")
    es, el = run.series("eval", "loss")
    if len(es):
        ax.plot(es, el, "o-", color="tab:orange", label="eval loss")
    ax.set(xlabel="step", ylabel="loss (cross-entropy)", title=f"{run.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if metric:
        ms, mv = run.series("eval", metric)
        ax2 = axes[0, 1]
        ax2.plot(ms, mv, "o-", color="tab:green")
        ax2.set(xlabel="step", ylabel=metric.replace("_", " "), title=f"eval {metric.replace('_', ' ')}")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out / "loss.png")


def fig_lr(run: Run, out: Path) -> Path | None:
    rows = run.kind("train")
    keys = sorted({k for r in rows for k in r if k == "lr" or k.startswith("lr_")})
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
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
    return _save(fig, out / "lr.png")


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


def fig_adalora(run: Run, out: Path) -> list[Path]:
    ranks = run.kind("ranks")
    if run.variant != "adalora" or not ranks:
        return []
    plt = _plt()
    r = run.config.get("adapter", {}).get("r", 8)
    names, grid = _grid(ranks[-1]["ranks"])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * grid.shape[1] + 3), max(2.5, 0.45 * len(names) + 1.5)))
    im = _heatmap(ax, names, grid, vmax=r, cmap="viridis")
    fig.colorbar(im, ax=ax, label="rank kept")
    ax.set(xlabel="layer", ylabel="module", title=f"{run.name}: AdaLoRA final rank per layer and module\n"
                                                    f"(of initial r={r}, at step {ranks[-1]['step']})")
    fig.tight_layout()
    paths = [_save(fig, out / "adalora_ranks.png")]
    fig, ax = plt.subplots(figsize=(7, 4))
    s, tot = run.series("ranks", "total")
    ax.plot(s, tot, lw=2, label="total rank kept")
    target = run.config.get("optim", {}).get("adalora_target_r")
    cells = int(np.isfinite(grid).sum())
    if target:
        ax.axhline(target * cells, color="tab:red", ls="--", label=f"target budget ({target} x {cells} weights)")
    ax.axhline(r * cells, color="gray", ls=":", label=f"initial budget ({r} x {cells})")
    opt, steps = run.config.get("optim", {}), run.config.get("train", {}).get("steps")
    # The allocator's step t is the 0-based count: logged step t + 1.
    if opt.get("adalora_tinit") is not None:
        ax.axvline(opt["adalora_tinit"] + 1, color="tab:gray", alpha=0.6, lw=1, label="pruning starts after (tinit)")
    if opt.get("adalora_tfinal") is not None and steps:
        ax.axvline(steps - opt["adalora_tfinal"] + 1, color="tab:gray", alpha=0.6, lw=1, ls="-.",
                   label="target budget from (steps - tfinal)")
    ax.set(xlabel="step", ylabel="sum of ranks over adapted weights", title=f"{run.name}: AdaLoRA rank budget over training")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / "adalora_budget.png"))
    return paths


def fig_sora(run: Run, out: Path) -> Path | None:
    rows = run.kind("ranks")
    if run.variant != "sora" or not rows:
        return None
    plt = _plt()
    labels, series = [], []
    for path in sorted(rows[-1]["ranks"]):
        per = np.array([np.atleast_1d(r["ranks"][path]) for r in rows], float)  # [time, layer]
        for layer in range(per.shape[1]):
            labels.append(f"{_module_layer(path)[0]} L{layer}" if per.shape[1] > 1 else _module_layer(path)[0])
            series.append(per[:, layer])
    grid = np.array(series)
    steps = [r["step"] for r in rows]
    r = run.config.get("adapter", {}).get("r", 8)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, max(4.5, 0.22 * len(labels) + 3)),
                                  gridspec_kw={"height_ratios": [max(2, len(labels) / 6), 1]}, sharex=False)
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=r, interpolation="nearest",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, len(labels) - 0.5, -0.5))
    ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 20 else 9)
    ax.set(xlabel="step", ylabel="module, layer", title=f"{run.name}: SoRA active ranks (non-zero gates, of r={r})")
    fig.colorbar(im, ax=ax, label="active ranks")
    ax2.plot(steps, grid.sum(axis=0), lw=2)
    ax2.set_xlim(ax.get_xlim())
    ax2.set(xlabel="step", ylabel="total active ranks")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out / "sora_ranks.png")


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def fig_dora(run: Run, peers: list[Run], out: Path) -> Path | None:
    """ΔM vs ΔD per layer at each checkpoint, one panel per run (this one first), one module each."""
    if run.variant not in ("dora", "lora", "rslora") or not run.kind("weights"):
        return None
    runs = [run, *(p for p in peers if p.kind("weights") and (p.variant == "dora") != (run.variant == "dora"))]
    plt = _plt()
    module = _pick_module(runs[0].kind("weights")[-1]["dM"])
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        rows = r.kind("weights")
        cmap = plt.get_cmap("viridis")
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
        ax.set(xlabel="ΔD (direction change, 1 - cos)", ylabel="ΔM (magnitude change)",
               title=f"{r.name} ({r.variant}): {module}\nslope of ΔM on ΔD: {k:+.3g}")
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Magnitude vs direction change per layer (DoRA paper, Fig. 2): LoRA's slope is positive, "
                 "DoRA's can be negative", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "dora_scatter.png")


def _pick_module(paths: dict[str, Any]) -> str:
    """The query projection where there is one (the paper's Figure 2), else the first adapted weight."""
    for pat in ("q_proj", "query", "c_attn", "attn"):
        hit = sorted(p for p in paths if pat in p)
        if hit:
            return hit[0]
    return sorted(paths)[0]


def fig_lora_drop(run: Run, out: Path) -> Path | None:
    rows = run.kind("lora_drop")
    if not rows:
        return None
    row = rows[-1]
    plt = _plt()
    labels, imp, kept = [], [], []
    for path in sorted(row["importance"]):
        vals, keep = np.atleast_1d(row["importance"][path]), np.atleast_1d(row["keep"][path])
        for layer, (v, k) in enumerate(zip(vals, keep)):
            labels.append(f"{_module_layer(path)[0]} L{layer}" if len(vals) > 1 else _module_layer(path)[0])
            imp.append(float(v))
            kept.append(bool(k))
    imp_a, kept_a = np.array(imp), np.array(kept)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, max(4, 0.22 * len(labels) + 1.5)))
    y = np.arange(len(labels))
    ax.barh(y[kept_a], imp_a[kept_a], color="tab:blue", label="keeps its own adapter")
    ax.barh(y[~kept_a], imp_a[~kept_a], color="tab:gray", label="shares one adapter per shape")
    ax.set_yticks(y, labels, fontsize=7 if len(labels) > 20 else 9)
    ax.invert_yaxis()
    ax.set(xlabel="importance (share of total ‖ΔW x‖²)", title=f"{run.name}: LoRA-drop importance at step {row['step']}")
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
    return _save(fig, out / "lora_drop.png")


def fig_tasks(run: Run, out: Path) -> Path | None:
    evals = run.kind("eval")
    tasks = sorted({int(m.group(1)) for r in evals for k in r for m in [re.match(r"task(\d+)_loss$", k)] if m})
    if not tasks:
        return None
    names = run.config.get("data", {}).get("tasks") or [f"task {t}" for t in tasks]
    metric = next((k for k in ("accuracy", "token_accuracy") if f"task{tasks[0]}_{k}" in evals[-1]), None)
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(11 if metric else 6, 4), squeeze=False)
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
    return _save(fig, out / "tasks.png")


# --- pages --------------------------------------------------------------------------------------------

CAPTIONS = {
    "loss.png": "Training loss (faint: every logged step; solid: smoothed) and evaluation loss.",
    "lr.png": "Learning rate of each parameter group. LoRA+ trains B at a multiple of A's rate.",
    "adalora_ranks.png": "AdaLoRA's rank allocation: the rank each layer and module kept at the end. "
                         "Layers that matter more to the task keep more of the budget.",
    "adalora_budget.png": "AdaLoRA's total rank over training: the allocator prunes from the initial budget "
                          "to the target on a cubic schedule.",
    "sora_ranks.png": "SoRA: ranks whose gate is still non-zero, per layer and module, as the proximal step "
                      "drives gates to zero.",
    "dora_scatter.png": "Magnitude change ΔM against direction change ΔD of the adapted weights, one point per "
                        "layer per checkpoint (DoRA paper, Figure 2).",
    "lora_drop.png": "LoRA-drop: each layer's importance (share of the adapters' output norm). Layers up to the "
                     "threshold of cumulative importance keep their own adapters; the rest share one.",
    "tasks.png": "Multi-task adapters: evaluation metrics per task.",
}


def _page(title: str, sections: list[str]) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}pre{background:#f6f6f6;padding:1em;"
             "overflow:auto;font-size:85%}figcaption{color:#555;margin-bottom:1.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>" + "".join(sections) + "</body></html>\n")


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def _figures_html(paths: list[Path], base: Path) -> str:
    out = []
    for p in paths:
        rel = p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix()
        out.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(p.name)}'>"
                   f"<figcaption>{html.escape(CAPTIONS.get(p.name, ''))}</figcaption></figure>")
    return "".join(out)


def _peers(run: Run, others: list[Run]) -> list[Run]:
    """Runs of the same base model among ``others`` and beside ``run`` (for the DoRA/LoRA scatter)."""
    found = {o.path.resolve(): o for o in others}
    parent = run.path.resolve().parent
    for d in sorted(parent.iterdir()) if parent.is_dir() else []:
        if d.is_dir() and d.resolve() != run.path.resolve() and d.resolve() not in found and (d / "metrics.jsonl").is_file():
            try:
                found[d.resolve()] = Run(d)
            except (OSError, ValueError):
                continue
    return [o for o in found.values() if o.path.resolve() != run.path.resolve() and o.model_path == run.model_path
            and o.variant in ("lora", "rslora", "dora") and o.kind("weights")]


def report(run_dir: str | Path, others: list[str | Path] = ()) -> Path:
    """Write ``run_dir/report/`` (figures + index.html); returns the page's path."""
    import matplotlib

    matplotlib.use("Agg")
    run = Run(run_dir)
    out = run.path / "report"
    out.mkdir(exist_ok=True)
    for stale in out.glob("*.png"):  # figures of an earlier report that no longer apply
        stale.unlink()
    peers = _peers(run, [Run(o) for o in others])
    figs: list[Path | None] = [fig_loss(run, out), fig_lr(run, out), *fig_adalora(run, out), fig_sora(run, out),
                               fig_dora(run, peers, out), fig_lora_drop(run, out), fig_tasks(run, out)]
    paths = [p for p in figs if p is not None]
    summary = {k: v for k, v in run.summary.items() if not isinstance(v, (dict, list))}
    for k, v in (run.summary.get("eval") or {}).items():
        summary[f"eval {k}"] = v
    sections = [f"<h2>Summary</h2>{_table([summary]) or '<p>(the run has not finished: no summary.json)</p>'}",
                f"<h2>Figures</h2>{_figures_html(paths, out)}",
                f"<h2>Config</h2><pre>{html.escape(json.dumps(run.config, indent=2))}</pre>"]
    from lorax_variants.hf.safetensors_io import write_text_atomic

    page = out / "index.html"
    write_text_atomic(page, _page(f"Run report: {run.name} ({run.variant})", sections))
    return page


def compare(run_dirs: list[str | Path], out: str | Path) -> Path:
    """A page comparing runs: final metrics, trainable parameters, step time, loss curves, ΔM/ΔD."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [Run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    rows = []
    for r in runs:
        s, ev = r.summary, r.summary.get("eval") or {}
        rows.append({"run": r.name, "variant": r.variant, "trainable params": s.get("trainable_params"),
                     "final train loss": s.get("final_train_loss"), "eval loss": ev.get("loss"),
                     "eval accuracy": ev.get("accuracy", ev.get("token_accuracy")),
                     "seconds/step": s.get("seconds_per_step"),
                     "throughput": s.get("tokens_per_second", s.get("examples_per_second"))})
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in runs:
        st, lo = r.series("train", "loss")
        if len(st):
            (line,) = axes[0].plot(st, _smooth(lo), lw=2, label=f"{r.name} ({r.variant})")
            es, el = r.series("eval", "loss")
            if len(es):
                axes[1].plot(es, el, "o-", color=line.get_color(), label=f"{r.name} ({r.variant})")
    axes[0].set(xlabel="step", ylabel="train loss (smoothed)", title="train loss")
    axes[1].set(xlabel="step", ylabel="eval loss", title="eval loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / "compare_loss.png"))
    names = [f"{r['run']}\n({r['variant']})" for r in rows]
    panels = [("eval accuracy" if any(r["eval accuracy"] is not None for r in rows) else "eval loss", False),
              ("trainable params", True), ("seconds/step", False)]
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 2.7 * len(rows) + 3), 4.2))
    for ax, (key, log) in zip(axes, panels):
        vals = [float(r[key]) if r[key] is not None else np.nan for r in rows]
        finite = [v for v in vals if np.isfinite(v) and v > 0]
        log = log and bool(finite) and max(finite) / min(finite) > 20
        bars = ax.bar(range(len(rows)), vals, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, labels=[_fmt(v) if np.isfinite(v) else "n/a" for v in vals], fontsize=8)
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        label = {"eval accuracy": "eval accuracy (LM: next-token)", "seconds/step": "seconds per step"}.get(key, key)
        ax.set(ylabel=label, title=label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(_save(fig, out / "compare_bars.png"))
    dora = next((r for r in runs if r.variant == "dora" and r.kind("weights")), None)
    if dora is not None:
        scatter = fig_dora(dora, [r for r in runs if r is not dora and r.model_path == dora.model_path
                                  and r.variant in ("lora", "rslora") and r.kind("weights")], out)
        if scatter is not None:
            paths.append(scatter)
    links = "".join(f"<li><a href='{html.escape(_rel(r.path / 'report' / 'index.html', out))}'>{html.escape(r.name)}</a>"
                    f" ({html.escape(r.variant)})</li>" for r in runs)
    from lorax_variants.hf.safetensors_io import write_text_atomic

    page = out / "index.html"
    write_text_atomic(page, _page(f"Comparison of {len(runs)} runs", [
        f"<h2>Runs</h2>{_table(rows)}<ul>{links}</ul>", f"<h2>Figures</h2>{_figures_html(paths, out)}"]))
    return page


def _rel(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())


def main(argv: list[str]) -> list[Path]:
    ap = argparse.ArgumentParser(prog="python -m train report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", help="run output directories (metrics.jsonl, config.json, summary.json)")
    ap.add_argument("--out", help="several runs: the comparison page's directory (default: comparison/ beside the first)")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    a = ap.parse_args(argv)
    pages = [report(d, [o for o in a.run_dirs if o != d]) for d in a.run_dirs]
    if len(a.run_dirs) > 1:
        pages.append(compare(a.run_dirs, a.out or Path(a.run_dirs[0]).resolve().parent / "comparison"))
    for p in pages:
        print(f"wrote {p}")
    return pages
