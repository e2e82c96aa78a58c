"""What a person sees: a progress bar, metrics as JSONL and TensorBoard events (figures: ``train.report``).

Only process 0 writes; every other process keeps quiet. ``metrics.jsonl`` opens with a ``run`` row naming
the run (``run_id``, kept in every checkpoint): a resume that finds a file of another run, or lines that
are not JSON before the last one, moves that file aside (``metrics.jsonl.other-run`` /
``metrics.jsonl.damaged``, never deleted), keeps what it can, and says so.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Metrics", "read_jsonl"]


class Metrics:
    def __init__(self, out: Path, total_steps: int, start_step: int, *, active: bool, progress: bool,
                 run_id: str | None = None):
        self.out, self.active = out, active
        self.bar = None
        self.jsonl = self.tb = None
        self.notes: list[str] = []  # what was found wrong with the file and done about it, for the log
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        fresh = _truncate(out / "metrics.jsonl", start_step, total_steps, run_id, self.notes)
        self.jsonl = open(out / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter

        # Events past the checkpoint this run starts from were logged by a run that was killed: TensorBoard
        # drops them (they are logged again, with the same values, as the steps are redone).
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        if fresh and run_id is not None:
            self.write("run", 0, {"run_id": run_id})
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: (float(v) if not isinstance(v, (str, list, dict)) else v) for k, v in values.items()}
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **clean}) + "\n")
        self.jsonl.flush()
        for k, v in clean.items():
            if isinstance(v, float):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=True)

    def text(self, tag: str, step: int, text: str) -> None:
        if self.active:
            self.tb.add_text(tag, text, step)

    def echo(self, line: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        self.tb.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a torn last line (a write cut off by a kill) is left out; any other line that
    is not a JSON object is an error naming the file and the line."""
    rows, bad = _read_rows(path)
    if bad:
        i, line = bad[0]
        raise ValueError(f"{path}: line {i} is not JSON: {line[:80]!r} (a resume moves a damaged file aside)")
    return rows


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """(the rows that read, the (line number, text) of the others but a torn last one)."""
    if not Path(path).exists():
        return [], []
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows, bad = [], []
    for n, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            rows.append(row)
        except ValueError:
            if n == len(lines) - 1 and not text.endswith("\n"):
                break  # torn by a kill mid-write
            bad.append((i, line))
    return rows, bad


def _aside(path: Path, why: str) -> Path:
    dest, n = path.with_name(f"{path.name}.{why}"), 1
    while dest.exists():
        dest, n = path.with_name(f"{path.name}.{why}.{n}"), n + 1
    path.rename(dest)
    return dest


def _truncate(path: Path, start_step: int, total_steps: int, run_id: str | None, notes: list[str]) -> bool:
    """Keep the rows up to ``start_step`` (the checkpoint a run starts from): the rows after it came from a
    run that was killed before its next checkpoint and are about to be logged again (as is the final
    evaluation when the run resumes from its last step). A file of another run is moved aside, and so is a
    damaged one (its readable rows kept). True when the file starts empty (its ``run`` row to be written)."""
    if not path.exists():
        if start_step > 0:
            notes.append(f"note: {path} is missing; its rows up to step {start_step} are lost (the run goes on)")
        return True
    from lorax_variants.hf.safetensors_io import write_text_atomic

    rows, bad = _read_rows(path)
    ids = {r.get("run_id") for r in rows if r.get("kind") == "run"}
    if start_step == 0:  # no checkpoint: whatever is there came from a run that left none, and is redone
        rows, bad = [], []
    elif run_id is not None and ids and ids != {run_id}:
        notes.append(f"warning: {path} holds the metrics of another run (run_id {sorted(map(str, ids))}, this run "
                     f"{run_id}); moved to {_aside(path, 'other-run')}, and the metrics start again here")
        return True
    if bad:
        copy = _aside(path, "damaged")
        notes.append(f"warning: {path}: line {bad[0][0]} (and {len(bad) - 1} more) is not JSON; the file is kept "
                     f"as {copy}, its {len(rows)} readable rows carried on")
    keep = [r for r in rows if r.get("step", 0) < start_step or r.get("step", 0) == start_step and not (
        r.get("kind") == "eval" and start_step == total_steps)]
    if start_step > 0 and not any(r.get("kind") == "train" for r in keep):
        notes.append(f"note: {path} has no training rows up to step {start_step} (cut short?); the run goes on")
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
    return not keep
