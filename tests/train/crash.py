"""``python -m tests.train.crash POINT N ARGS...``: ``python -m train ARGS...``, killed with SIGKILL
the ``N``-th time it reaches ``POINT``: fault injection for the kill tests (tests only).

Points, each inside a write that must never be seen half-done:
- ``ckpt_items``: saving a checkpoint, when orbax writes the ``meta`` item (the ``state`` item's
  arrays may still be in flight);
- ``ckpt_finalize``: every item of the checkpoint written to its temporary directory, before the
  commit marker and the rename;
- ``ckpt_delete``: deleting an old checkpoint (``train.keep``), after its first file is unlinked;
- ``adapters``: the final ``adapters.safetensors`` written to its temporary file, before the rename;
- ``metrics``: in the middle of writing a ``metrics.jsonl`` row (half the line on disk).
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    count = [0]

    def hit() -> bool:
        count[0] += 1
        return count[0] == n

    def die_before(cls: type, name: str) -> None:  # an async method of orbax: SIGKILL as it starts
        orig = getattr(cls, name)

        async def wrapper(self, *a, **k):
            if hit():
                _die()
            return await orig(self, *a, **k)

        setattr(cls, name, wrapper)

    if point == "ckpt_items":
        from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

        die_before(jh.JsonCheckpointHandler, "async_save")
    elif point == "ckpt_finalize":
        from orbax.checkpoint._src.path import atomicity

        die_before(atomicity.AtomicRenameTemporaryPath, "finalize")
    elif point == "ckpt_delete":
        import shutil

        orig_rmtree, orig_unlink = shutil.rmtree, os.unlink

        def rmtree(path, *a, **k):
            if ".trash" in str(path) and os.path.isdir(path) and any(os.scandir(path)) and hit():
                def unlink(p, *ua, **uk):  # the first file goes, then the process dies
                    orig_unlink(p, *ua, **uk)
                    _die()
                os.unlink = unlink
            return orig_rmtree(path, *a, **k)

        shutil.rmtree = rmtree
    elif point == "adapters":
        orig_replace = os.replace

        def replace(src, dst, *a, **k):
            if str(dst).endswith("adapters.safetensors") and hit():
                _die()
            return orig_replace(src, dst, *a, **k)

        os.replace = replace
    elif point == "metrics":
        from train import metrics

        orig_write = metrics.Metrics.write

        def write(self, kind, step, values):
            if self.active and kind == "train" and hit():
                import json

                line = json.dumps({"kind": kind, "step": step, **{k: float(v) for k, v in values.items()}})
                self.jsonl.write(line[: len(line) // 2])
                self.jsonl.flush()
                _die()
            return orig_write(self, kind, step, values)

        metrics.Metrics.write = write
    else:
        raise SystemExit(f"unknown crash point {point!r}")


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    from train.cli import main

    sys.exit(main(sys.argv[3:]))
