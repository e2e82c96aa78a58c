"""``python -m train eval``: lm-evaluation-harness tasks on a run's checkpoint.

    python -m train eval --checkpoint runs/lora --harness hellaswag,arc_easy --limit 200
    python -m train eval --checkpoint runs/lora --harness my_task --include-path tasks/ --num-fewshot 5

The run is rebuilt from its ``config.json`` and its latest (or ``--step``) checkpoint restored and checked, as
``train export`` does; the adapted tree (any variant, the quantized base as trained) is scored by
``lorax_variants.harness.LoraxLM`` with the run's tokenizer. The results (lm-eval's ``results``, ``versions``,
``n-shot`` and ``config``, plus the run, step and task list) are written as JSON to ``--out`` (default
``RUN/harness_step<N>.json``; an existing file is refused unless ``--overwrite``) and lm-eval's table is printed.
lm-eval's tasks load their datasets through ``datasets``: tasks on the Hugging Face hub need the network;
local tasks (``--include-path`` with YAML over local files) do not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "evaluate"]


def evaluate(run_dir: str | Path, tasks: list[str], *, step: int | None = None, include_path: str | None = None,
             limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
             adapter: str | None = None, out: str | Path | None = None, overwrite: bool = False,
             force_base: bool = False, seed: int = 0) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    import lorax_variants as lv
    from lorax_variants.harness import LoraxLM
    from lorax_variants.hf.safetensors_io import atomic_file
    from train.config import ConfigError
    from train.export import restored_run

    if not tasks:
        raise ConfigError("--harness: no task named (a comma-separated list, e.g. --harness hellaswag,arc_easy)")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path: {include_path} is not a directory")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--harness: unknown task(s) {unknown} (lm-eval knows {len(manager.all_tasks)} tasks and "
                          f"groups; local ones come from --include-path)")
    run_dir = Path(run_dir)
    _, p, state, _ = restored_run(run_dir, step, force_base=force_base, verb="eval")
    which = state.step
    target = Path(out) if out is not None else run_dir / f"harness_step{which}.json"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    tree = lv.combine(state.trainable, state.frozen)
    lm = LoraxLM(p.built.model, tree, p.tokenizer, batch_size=batch_size, adapter=adapter, seed=seed)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
    print(make_table(results))
    record = {"run": str(run_dir), "step": which, "tasks": tasks, "limit": limit, "num_fewshot": num_fewshot,
              **{k: results.get(k) for k in ("results", "versions", "n-shot", "config")}}
    atomic_file(target, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str) + "\n"))
    print(f"wrote harness results to {target}", file=sys.stderr)
    return record


def main(argv: list[str]) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m train eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a run's output directory (config.json + checkpoints/)")
    ap.add_argument("--harness", required=True, help="lm-eval tasks or groups, comma-separated")
    ap.add_argument("--include-path", help="a directory of lm-eval task YAML files (local tasks)")
    ap.add_argument("--limit", type=float, help="at most this many documents per task (a fraction if < 1)")
    ap.add_argument("--num-fewshot", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--adapter", help="many adapters: the one to evaluate")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--out", help="results JSON (default RUN/harness_step<N>.json)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force-base", action="store_true", help="evaluate even if model.path now holds other weights "
                    "than the run was trained on")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    a = ap.parse_args(argv)
    return evaluate(a.checkpoint, [t for t in a.harness.split(",") if t], step=a.step, include_path=a.include_path,
                    limit=a.limit, num_fewshot=a.num_fewshot, batch_size=a.batch_size, adapter=a.adapter, out=a.out,
                    overwrite=a.overwrite, force_base=a.force_base, seed=a.seed)
