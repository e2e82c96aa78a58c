"""``python -m train report RUN_DIR [RUN_DIR ...] [--out DIR]``: figures of what a run did, and a page.

One run directory: ``RUN_DIR/report/`` gets PNGs (matplotlib, Agg) and ``index.html`` with the run's
config and summary. Written automatically at the end of every run. Several: each gets its report and
``--out`` (default: ``comparison/`` beside the first) gets a page with the variants side by side.

Figures, each drawn when the run has the data (``metrics.jsonl`` rows of kind train, eval, ranks,
weights, lora_drop, written by ``train.run``):
- ``loss.png``: train loss (raw and smoothed) and eval loss; the eval metric beside it.
- ``preference.png`` (preference objectives): chosen/rejected rewards, margin, preference accuracy.
- ``grpo.png`` (GRPO): rewards (sampled, within-group spread, held-out greedy), completion lengths, KL, clipping.
- ``lr.png``: the learning rate of each parameter group (e.g. A's and B's where they differ).
The variants' own figures, drawn for the runs whose recipe declares them (``Recipe.figures``):
- ``rank_allocation.png``: a rank allocator's final rank per layer and module (a heatmap);
  ``rank_budget.png``: the total rank over training against the target.
- ``active_ranks.png``: ranks with non-zero gates per layer and module over training, and their total.
- ``magnitude_direction.png``: ΔM against ΔD per layer at each checkpoint (DoRA paper, Figure 2), for this
  run and any LoRA/DoRA run of the same base model given alongside or found beside it.
- ``layer_importance.png``: each layer's importance, which layers kept their own adapters, and the
  cumulative share against the threshold.
- ``tasks.png``: multi-task eval metrics per task.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lorax_variants.recipes import RECIPES
from train.figures import (Run, fig_active_ranks, fig_layer_importance, fig_loss, fig_lr, fig_magnitude_direction, fig_preference, fig_grpo,
                           fig_rank_allocation, fig_tasks, plt, read_json, save, scatter_side, smooth)

__all__ = ["report", "compare", "main", "accuracy_label"]

# The figures a variant's recipe declares (``Recipe.figures``), by kind; ``magnitude_direction`` (the ΔM/ΔD
# scatter against LoRA-shaped runs) is drawn for every run that has a side in it.
VARIANT_FIGURES = {"rank_allocation": fig_rank_allocation, "active_ranks": fig_active_ranks,
                   "layer_importance": fig_layer_importance, "tasks": fig_tasks}

CAPTIONS = {
    "loss.png": "Training loss (faint: every logged step; solid: smoothed) and evaluation loss.",
    "preference.png": "Preference objective: the implicit rewards β·log(π/π_ref) of the chosen and the rejected "
                      "completions and their margin (for SimPO: β times the mean log-probability per token), and how "
                      "often the chosen one scores higher, on training batches and on held-out pairs.",
    "grpo.png": "GRPO: the mean reward of the sampled completions and its spread within each prompt's group (the "
                "advantages are made of it: a group whose completions all score the same teaches nothing), the "
                "held-out prompts' greedy reward; the completions' length and the share that hit "
                "max_completion_length; the KL to the reference (beta > 0) and the share of clipped tokens.",
    "lr.png": "Learning rate of each parameter group. LoRA+ trains B at a multiple of A's rate.",
    "rank_allocation.png": "Rank allocation: the rank each layer and module kept at the end. "
                         "Layers that matter more to the task keep more of the budget.",
    "rank_budget.png": "Total rank over training: the allocator prunes from the initial budget "
                          "to the target on a cubic schedule.",
    "active_ranks.png": "Ranks whose gate is still non-zero, per layer and module, as the proximal step "
                      "drives gates to zero.",
    "magnitude_direction.png": "Magnitude change ΔM against direction change ΔD of the adapted weights, one point per "
                        "layer per checkpoint (DoRA paper, Figure 2).",
    "layer_importance.png": "Each layer's importance (share of the adapters' output norm). Layers up to the "
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


def _kv_table(d: dict[str, Any]) -> str:
    if not d:
        return ""
    return "<table>" + "".join(f"<tr><th>{html.escape(k.replace('_', ' '))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                               for k, v in d.items()) + "</table>"


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
    """Candidates for the DoRA/LoRA scatter: ``others``, and the LoRA/DoRA runs of the same base model beside
    ``run`` (only their config is read for those that do not qualify)."""
    found = {o.path.resolve(): o for o in others}
    parent = run.path.resolve().parent
    for d in sorted(parent.iterdir()) if parent.is_dir() else []:
        if d.resolve() == run.path.resolve() or d.resolve() in found or not (d / "metrics.jsonl").is_file():
            continue
        try:  # the config first: only runs of the same base model and a LoRA/DoRA variant are read whole
            cfg = read_json(d / "config.json")
            if cfg.get("model", {}).get("path") == run.model_path and \
                    scatter_side(cfg.get("adapter", {}).get("variant")) is not None:
                found[d.resolve()] = Run(d)
        except (OSError, ValueError):
            continue
    return [o for o in found.values() if o.path.resolve() != run.path.resolve()]  # (fig_magnitude_direction picks among them)


def report(run_dir: str | Path, others: list[str | Path] = ()) -> Path:
    """Write ``run_dir/report/`` (figures + index.html); returns the page's path."""
    run = Run(run_dir)
    out = run.path / "report"
    out.mkdir(exist_ok=True)
    for stale in out.glob("*.png"):  # figures of an earlier report that no longer apply
        stale.unlink()
    peers = _peers(run, [Run(o) for o in others])
    own = RECIPES[run.variant].figures if run.variant in RECIPES else ()  # the variant's figures (its recipe's)
    figs: list[Path | None] = [fig_loss(run, out), fig_preference(run, out), fig_grpo(run, out), fig_lr(run, out),
                               fig_magnitude_direction(run, peers, out)]
    for name in (n for n in own if n in VARIANT_FIGURES):
        drawn = VARIANT_FIGURES[name](run, out)
        figs += drawn if isinstance(drawn, list) else [drawn]
    paths = [p for p in figs if p is not None]
    summary = {k: v for k, v in run.summary.items() if not isinstance(v, (dict, list))}
    for k, v in (run.summary.get("eval") or {}).items():
        summary[f"eval {k}"] = v
    gap = run.gaps()
    if gap:
        print(f"train report: warning: {gap}", file=sys.stderr)
    sections = [f"<h2>Summary</h2>{_kv_table(summary) or '<p>(the run has not finished: no summary.json)</p>'}"
                + (f"<p><b>Warning:</b> {html.escape(gap)}</p>" if gap else ""),
                f"<h2>Figures</h2>{_figures_html(paths, out)}",
                f"<h2>Config</h2><pre>{html.escape(json.dumps(run.config, indent=2))}</pre>"]
    from lorax_variants.hf.safetensors_io import write_text_atomic

    page = out / "index.html"
    write_text_atomic(page, _page(f"Run report: {run.name} ({run.variant})", sections))
    return page


def compare(run_dirs: list[str | Path], out: str | Path) -> Path:
    """A page comparing runs: final metrics, trainable parameters, step time, loss curves, ΔM/ΔD."""
    runs = [Run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pyplot = plt()
    rows = []
    for r in runs:
        s, ev = r.summary, r.summary.get("eval") or {}
        rows.append({"run": r.name, "variant": r.variant, "trainable params": s.get("trainable_params"),
                     "final train loss": s.get("final_train_loss"), "eval loss": ev.get("loss"),
                     "eval accuracy": ev.get("accuracy", ev.get("token_accuracy")),
                     "seconds/step": s.get("seconds_per_step"),
                     "throughput": s.get("tokens_per_second", s.get("examples_per_second"))})
    paths = []
    fig, axes = pyplot.subplots(1, 2, figsize=(12, 4.2))
    for r in runs:
        st, lo = r.series("train", "loss")
        if len(st):
            (line,) = axes[0].plot(st, smooth(lo), lw=2, label=f"{r.name} ({r.variant})")
            es, el = r.series("eval", "loss")
            if len(es):
                axes[1].plot(es, el, "o-", color=line.get_color(), label=f"{r.name} ({r.variant})")
    axes[0].set(xlabel="step", ylabel="train loss (smoothed)", title="train loss")
    axes[1].set(xlabel="step", ylabel="eval loss", title="eval loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save(fig, out / "compare_loss.png"))
    names = [f"{r['run']}\n({r['variant']})" for r in rows]
    labels = {"eval accuracy": accuracy_label(runs), "seconds/step": "seconds per step"}
    panels = [("eval accuracy" if any(r["eval accuracy"] is not None for r in rows) else "eval loss", False),
              ("trainable params", True), ("seconds/step", False)]
    fig, axes = pyplot.subplots(1, 3, figsize=(max(12, 2.7 * len(rows) + 3), 4.2))
    for ax, (key, log) in zip(axes, panels):
        vals = [float(r[key]) if r[key] is not None else np.nan for r in rows]
        finite = [v for v in vals if np.isfinite(v) and v > 0]
        log = log and bool(finite) and max(finite) / min(finite) > 20
        bars = ax.bar(range(len(rows)), vals, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, labels=[_fmt(v) if np.isfinite(v) else "n/a" for v in vals], fontsize=8)
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        label = labels.get(key, key)
        ax.set(ylabel=label, title=label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(save(fig, out / "compare_bars.png"))
    dora = next((r for r in runs if scatter_side(r.variant) == "decomposed" and r.kind("weights")), None)
    if dora is not None:
        scatter = fig_magnitude_direction(dora, [r for r in runs if r is not dora], out, all_peers=True)
        if scatter is not None:
            paths.append(scatter)
    links = "".join(f"<li><a href='{html.escape(_rel(r.path / 'report' / 'index.html', out))}'>{html.escape(r.name)}</a>"
                    f" ({html.escape(r.variant)})</li>" for r in runs)
    from lorax_variants.hf.safetensors_io import write_text_atomic

    page = out / "index.html"
    write_text_atomic(page, _page(f"Comparison of {len(runs)} runs", [
        f"<h2>Runs</h2>{_table(rows)}<ul>{links}</ul>", f"<h2>Figures</h2>{_figures_html(paths, out)}"]))
    return page


def accuracy_label(runs: list[Run]) -> str:
    """What the comparison's accuracy means: classification accuracy, next-token accuracy, or (mixed) both."""
    kinds = {"token" if "token_accuracy" in (r.summary.get("eval") or {}) else "cls"
             for r in runs if r.summary.get("eval")}
    if kinds == {"token"}:
        return "eval next-token accuracy"
    if kinds == {"cls", "token"}:
        return "eval accuracy (classification runs) / next-token accuracy (LM runs)"
    return "eval accuracy"


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
