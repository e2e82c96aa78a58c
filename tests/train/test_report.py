"""``python -m train report``: every figure drawn from a tiny real run is a valid, non-blank PNG with the
data it claims; the page links them; the comparison page covers every run; the numbers behind the
DoRA scatter are the paper's ΔM / ΔD computed independently here with numpy."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.train.conftest import cls_args, lm_args, main, train
from train.metrics import read_jsonl
from tests.close import assert_close

COMMON = ["train.steps=12", "train.checkpoint_every=4", "data.eval_fraction=0.1", "train.eval_every=4"]
RUNS = {
    "loraplus": ["adapter.variant=loraplus", "optim.lr=0.002", "optim.warmup_steps=4"],
    "adalora": ["adapter.variant=adalora", "adapter.r=4", "adapter.adalora.target_r=1", "adapter.adalora.tinit=2",
                "adapter.adalora.tfinal=3", "adapter.adalora.delta_t=1"],
    "sora": ["adapter.variant=sora", "adapter.sora.xi=0.09"],  # gates reach zero around step 11
    "lora": [],
    "dora": ["adapter.variant=dora"],  # after "lora": its report finds the LoRA run beside it
    "lora_drop": ["adapter.variant=lora_drop", "adapter.lora_drop.select_at=4", "adapter.lora_drop.threshold=0.6"],
}


# The runs of the figure kinds only one variant draws (LoRA+'s rate groups, SoRA's active ranks, LoRA-drop's
# importances, AdaLoRA's rank allocation): under `slow` (CI's `make test-slow`); the default run draws LoRA, DoRA and
# multi-task.
SLOW = ("loraplus", "sora", "lora_drop", "adalora")


class _Runs(dict):
    """Run directories by name, each trained the first time a test asks for it (once per module)."""

    def __init__(self, assets: dict[str, Path], d: Path):
        super().__init__()
        self.assets, self.d = assets, d

    def __missing__(self, name: str) -> Path:
        out = self.d / name
        if name == "multitask":
            train(cls_args(self.assets, out, "adapter.variant=multitask", "adapter.multitask.n_tasks=2",
                           "data.task_field=task", "data.tasks=[reviews, tweets]", "train.steps=12", "train.eval_every=4"))
        else:
            if name == "dora":
                self["lora"]  # noqa: B018 - first: DoRA's report finds the LoRA run beside it
            train(lm_args(self.assets, out, *COMMON, *RUNS[name]))
        self[name] = out
        return out


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> _Runs:
    return _Runs(assets, tmp_path_factory.mktemp("report_runs"))


def _slow(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _check_png(path: Path, min_size: tuple[int, int] = (500, 300)) -> np.ndarray:
    import matplotlib.image as mpimg

    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", path
    w, h = struct.unpack(">II", raw[16:24])
    assert w >= min_size[0] and h >= min_size[1], (path, w, h)
    img = mpimg.imread(path)  # decodes the whole file: a truncated PNG fails here
    rgb = img[..., :3]
    ink = np.any(rgb < 0.9, axis=-1).mean()  # share of pixels that are not (near) white
    assert ink > 0.03, (path, ink)
    edge = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3),
                           rgb[:, -2:].reshape(-1, 3)])
    assert np.all(edge > 0.9), path  # nothing drawn up to the border: no title or label cut off
    colours = len(np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0))
    assert colours > 20, (path, colours)  # lines, text, fills: not a flat image
    return img


def _figs(run: Path) -> set[str]:
    return {p.name for p in (run / "report").glob("*.png")}


@pytest.mark.parametrize("name", _slow([*RUNS, "multitask"]))
def test_every_run_writes_its_report_at_the_end(runs, name):
    run = runs[name]
    page = (run / "report" / "index.html").read_text()
    assert "loss.png" in _figs(run), name
    for fig in _figs(run):
        assert f"src='{fig}'" in page, (name, fig)
        _check_png(run / "report" / fig)
    assert "final train loss" in page and "<h2>Config</h2>" in page


@pytest.mark.slow
def test_loraplus_learning_rates_per_group(runs):
    run = runs["loraplus"]
    assert {"loss.png", "lr.png"} <= _figs(run)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    ratio = json.loads((run / "config.json").read_text())["adapter"]["loraplus"]["ratio"]
    assert all(abs(r["lr_B"] - ratio * r["lr"]) <= 1e-9 * ratio * max(r["lr"], 1e-12) for r in rows)
    assert rows[0]["lr"] < rows[-1]["lr"]  # the warmup the figure shows


@pytest.mark.slow
def test_adalora_rank_heatmap_and_budget(runs):
    run = runs["adalora"]
    assert {"rank_allocation.png", "rank_budget.png"} <= _figs(run)
    ranks = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "ranks"]
    totals = [r["total"] for r in ranks]
    assert totals[0] > totals[-1]  # the budget shrank
    final = ranks[-1]["ranks"]
    # The final pattern equals the summary's (the allocator's own state), and the budget matches the target.
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(int(np.sum(m)) for m in summary["adalora_ranks"]) == sorted(int(np.sum(v)) for v in final.values())
    assert totals[-1] == 1 * sum(np.size(v) for v in final.values())


@pytest.mark.slow
def test_sora_active_ranks_over_time(runs):
    run = runs["sora"]
    assert "active_ranks.png" in _figs(run)
    ranks = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "ranks"]
    assert len(ranks) == 12 and ranks[0]["total"] > ranks[-1]["total"]


def _paper_delta(w0: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DoRA paper §2.2 in numpy, per stacked layer: mean over output columns."""
    n0, n = np.linalg.norm(w0, axis=-2), np.linalg.norm(w, axis=-2)
    return np.abs(n - n0).mean(-1), (1 - (w0 * w).sum(-2) / (n0 * n)).mean(-1)


def test_dora_scatter_with_the_lora_run_beside_it(runs, assets):
    from lorax_variants.hf import from_pretrained
    from tests.train.conftest import adapters

    assert "magnitude_direction.png" in _figs(runs["dora"]) and "magnitude_direction.png" in _figs(runs["lora"])
    # The DoRA report found the LoRA run beside it: two panels (wider than one).
    with open(runs["dora"] / "report" / "magnitude_direction.png", "rb") as f:
        f.seek(16)
        width = struct.unpack(">I", f.read(4))[0]
    assert width > 1000
    # The logged ΔM/ΔD at the end equal the paper's formulas on the merged weights, computed here.
    _, base = from_pretrained(assets["llama"])
    saved = adapters(runs["dora"])
    row = [r for r in read_jsonl(runs["dora"] / "metrics.jsonl") if r["kind"] == "weights"][-1]
    assert row["step"] == 12
    w0 = np.asarray(base["layers"]["attn"]["q_proj"], np.float64)
    a, b = (saved[f"layers/attn/q_proj/{k}"].astype(np.float64) for k in ("lora_a", "lora_b"))
    m = saved["layers/attn/q_proj/magnitude"].astype(np.float64)
    v = w0 + (16.0 / 4) * a @ b  # alpha 16 (the default), r 4
    w = v / np.linalg.norm(v, axis=-2, keepdims=True) * m[:, None, :]
    dm, dd = _paper_delta(w0, w)
    assert_close(row["dM"]["layers/attn/q_proj"], dm, 2e-3)
    assert_close(row["dD"]["layers/attn/q_proj"], dd, 1e-3)


@pytest.mark.slow
def test_lora_drop_importance_and_threshold(runs):
    run = runs["lora_drop"]
    assert "layer_importance.png" in _figs(run)
    (row,) = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "lora_drop"]
    imp = np.concatenate([np.atleast_1d(v) for v in row["importance"].values()])
    keep = np.concatenate([np.atleast_1d(v) for v in row["keep"].values()])
    np.testing.assert_allclose(imp.sum(), 1.0, rtol=1e-5)
    # Kept: the most important layers, fewest whose share reaches the threshold (the paper's rule).
    order = np.argsort(-imp)
    n = int(np.searchsorted(np.cumsum(imp[order]), row["threshold"] - 1e-9) + 1)
    assert sorted(np.flatnonzero(keep)) == sorted(order[:n])


def test_multitask_per_task_metrics(runs):
    run = runs["multitask"]
    assert "tasks.png" in _figs(run)
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert all({"task0_accuracy", "task1_accuracy"} <= set(r) for r in evals)


def test_report_command_and_comparison_page(runs, tmp_path, capsys):
    kinds = ("lora", "dora")  # (AdaLoRA's run is under slow)
    dirs = [str(runs[k]) for k in kinds]
    code, err = main(["report", *dirs, "--out", str(tmp_path / "cmp")], capsys)
    assert code == 0, err
    page = (tmp_path / "cmp" / "index.html").read_text()
    for k in kinds:
        assert re.search(rf"<td>{k}</td><td>{k}</td><td>[\d,]+</td>", page), k  # run, variant, trainable params
    for fig in ("compare_loss.png", "compare_bars.png", "magnitude_direction.png"):
        _check_png(tmp_path / "cmp" / fig)
        assert f"src='{fig}'" in page
    links = re.findall(r"href='([^']+)'", page)
    assert sorted((tmp_path / "cmp" / h).resolve() for h in links) == sorted(
        (Path(d) / "report" / "index.html").resolve() for d in dirs)
    code, err = main(["report", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not a run directory" in err and "Traceback" not in err


def test_dora_scatter_shows_one_peer_however_many_siblings(runs, tmp_path):
    """Many LoRA runs beside a DoRA run: its own figure has two panels (it and the closest LoRA run);
    the comparison page holds them all, three panels to a row."""
    import shutil

    from train.config import config_digest
    from train.figures import Run, closest_peer
    from train.report import accuracy_label, compare, report

    parent = tmp_path / "many"
    dora = parent / "dora"
    shutil.copytree(runs["dora"], dora)
    shutil.copytree(runs["lora"], parent / "lora_same")
    for i in range(4):  # LoRA runs whose configs differ more from the DoRA run's
        d = parent / f"lora_r{i}"
        shutil.copytree(runs["lora"], d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["adapter"]["r"], cfg["optim"]["lr"] = 8 + i, 0.5
        (d / "config.json").write_text(json.dumps(cfg))
        summary = json.loads((d / "summary.json").read_text())  # as that run's own summary and metrics would say
        (d / "summary.json").write_text(json.dumps(summary | {"config_sha256": config_digest(cfg)}))
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        rows = [r | {"config_sha256": config_digest(cfg)} if r["kind"] == "config" else r for r in rows]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    peers = [Run(d) for d in sorted(parent.iterdir()) if d.name != "dora"]
    assert closest_peer(Run(dora), peers).name == "lora_same"
    report(dora)
    img = _check_png(dora / "report" / "magnitude_direction.png")
    assert 1000 < img.shape[1] < 1500, img.shape  # two panels, not six
    page = compare(sorted(parent.iterdir()), tmp_path / "cmp")
    big = _check_png(page.parent / "magnitude_direction.png")
    assert big.shape[1] < 2000 and big.shape[0] > 900, big.shape  # a 3 x 2 grid, not one row of six
    assert accuracy_label([Run(runs["multitask"])]) == "eval accuracy"
    assert accuracy_label([Run(runs["lora"])]) == "eval next-token accuracy"
    assert "classification" in accuracy_label([Run(runs["lora"]), Run(runs["multitask"])])
