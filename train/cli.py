"""Command line: ``python -m train --config configs/NAME.yaml [--set key=value ...] [--dry-run] [--plan TOPOLOGY]
[--resume] [--force-base]``;
``python -m train export --checkpoint RUN_DIR --format merged|peft --out DIR`` (see ``train.export``);
``python -m train report RUN_DIR [RUN_DIR ...]`` (figures and a page, see ``train.report``);
``python -m train eval --checkpoint RUN_DIR --harness TASKS`` (lm-evaluation-harness, see ``train.evaluate``).

Bad input (config, paths, data, checkpoints) and paths that cannot be written exit with status 2
and one message naming the field or path at fault; ``--debug`` shows the Python traceback instead.
Non-finite training (more than ``train.max_nonfinite`` skipped steps) exits 3; SIGTERM/SIGINT save a
checkpoint and exit 128 + the signal number.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train", description="LoRA-family fine-tuning from a YAML config.")
    ap.add_argument("--config", "-c", help="YAML config (configs/*.yaml); omitted: all defaults")
    ap.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set train.steps=10 --set adapter.r=4 (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (model, mesh, parameters, bytes per "
                    "device, steps, tokens) and exit without training")
    ap.add_argument("--plan", metavar="TOPOLOGY", help="compile the run's train step for a TPU slice without one "
                    "(v5p-8, v5e-16, v6e-8, ...: train.topology) and print per chip what it holds against the "
                    "chip's memory, whether it fits, and the step's FLOPs; needs make libtpu")
    ap.add_argument("--resume", action="store_true", default=None,
                    help="continue from the output dir's latest checkpoint (automatic when one exists)")
    ap.add_argument("--fresh", dest="resume", action="store_false",
                    help="refuse to start if the output dir already has checkpoints")
    ap.add_argument("--force-base", action="store_true", help="resume even when model.path holds other weights "
                    "than the checkpoint was trained on (a warning is logged)")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("export", "report", "eval"):
        sub = __import__(f"train.{'evaluate' if argv[0] == 'eval' else argv[0]}", fromlist=["main"])
        return _guarded(lambda: sub.main(argv[1:]), "--debug" in argv)
    args = _parser().parse_args(argv)
    if args.plan:
        from train.topology import prepare_libtpu

        prepare_libtpu()  # before jax is imported
    from train.checkpoint import CheckpointMismatch
    from train.config import ConfigError, load
    from train.plan import dry_run
    from train.run import Interrupted, NonFinite, run  # before the try: its except clauses name these

    try:
        cfg = load(args.config, args.set)
        if args.plan:
            from train.topology import compile_plan, format_compile_plan

            print(format_compile_plan(compile_plan(cfg, args.plan)), flush=True)
            return 0
        if args.dry_run:
            dry_run(cfg)
            return 0
        run(cfg, resume=args.resume, force_base=args.force_base, host_memory=True)  # see lorax_variants/runtime.py
        return 0
    except Interrupted as e:
        print(f"train: {e}", file=sys.stderr)
        return 128 + e.signum
    except NonFinite as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, CheckpointMismatch, OSError, ValueError) as e:
        if args.debug:
            raise
        print(f"train: error: {_describe(e)}", file=sys.stderr)
        return 2


def _describe(e: BaseException) -> str:
    """The message; an OS error (a path that cannot be written, a full disk) also says what kind it is."""
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError)):
        return f"{type(e).__name__}: {e}"
    return str(e)


def _guarded(fn: Any, debug: bool) -> int:
    """Run a subcommand: bad input is one line on stderr and status 2 (``--debug``: the traceback)."""
    from train.checkpoint import CheckpointMismatch
    from train.config import ConfigError

    try:
        fn()
        return 0
    except (ConfigError, CheckpointMismatch, OSError, ValueError) as e:
        if debug:
            raise
        print(f"train: error: {_describe(e)}", file=sys.stderr)
        return 2
