"""What a person sees: a progress bar, metrics as JSONL and TensorBoard events (figures: ``train.report``).

Only process 0 writes; every other process keeps quiet.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Metrics", "read_jsonl"]


class Metrics:
    def __init__(self, out: Path, total_steps: int, start_step: int, *, active: bool, progress: bool):
        self.out, self.active = out, active
        self.bar = None
        self.jsonl = self.tb = None
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        _truncate(out / "metrics.jsonl", start_step, total_steps)
        self.jsonl = open(out / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter

        # Events past the checkpoint this run starts from were logged by a run that was killed: TensorBoard
        # drops them (they are logged again, with the same values, as the steps are redone).
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
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
    """The rows of a JSONL file; a torn last line (a write cut off by a kill) is left out."""
    if not Path(path).exists():
        return []
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return rows


def _truncate(path: Path, start_step: int, total_steps: int) -> None:
    """Keep the rows up to ``start_step`` (the checkpoint a run starts from): the rows after it came from a
    run that was killed before its next checkpoint and are about to be logged again (as is the final
    evaluation when the run resumes from its last step)."""
    if not path.exists():
        return
    from lorax_variants.hf.safetensors_io import write_text_atomic

    keep = [r for r in read_jsonl(path) if r.get("step", 0) < start_step or r.get("step", 0) == start_step and not (
        r.get("kind") == "eval" and start_step == total_steps)]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
