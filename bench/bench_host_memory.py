"""Host memory of the training app over a run: peak RSS, RSS at step 10 and at the last step (growth: flat is
the goal), and seconds per step, for each malloc policy, in the same script:

- ``glibc``: the C library's defaults (``LORAX_KEEP_HOST_MEMORY=0``);
- ``before``: what the app set before (one arena, never mmap, never trim: the heap only grows);
- ``after``: what the app sets now (``lorax_variants.runtime.keep_host_memory``).

Models: SmolLM2-135M (its GGUF from ``make assets``, with its tokenizer) and a 270M-class model (Gemma 3 270M's
shapes: vocab 262,144, d 640, 18 layers; random init with transformers, SmolLM2's tokenizer). LoRA r=8 on every
projection, batch 4 x 128 tokens, float32, State of the Union text if ``.cache/assets/sotu`` is there (``make
demo-lm``), else a synthetic corpus.

    python bench/bench_host_memory.py [--steps 100] [--models smollm2,gemma270m] [--policies glibc,before,after]
                                      [--app PATH-TO-ANOTHER-CHECKOUT]

RSS is sampled from /proc every 50 ms and matched to the step ``metrics.jsonl`` has reached.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / ".cache" / "assets"

# The policy the app applied before: one arena, no mmap for large blocks, no trimming.
BEFORE = """
import ctypes, ctypes.util
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
assert all(libc.mallopt(p, v) == 1 for p, v in ((-8, 1), (-4, 0), (-1, -1)))
"""
RUN = """
import sys
{prelude}
from train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _models(work: Path, names: list[str]) -> dict[str, Path]:
    from lorax_variants.hf import from_gguf, gguf_tokenizer, save_pretrained

    gguf = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise SystemExit(f"{gguf} is missing: run `make assets`")
    out = {}
    smol = work / "smollm2"
    if not (smol / "config.json").is_file():
        model, params = from_gguf(gguf)
        save_pretrained(smol, model, params, overwrite=True)
        gguf_tokenizer(gguf).save_pretrained(smol)
    if "smollm2" in names:
        out["smollm2"] = smol
    if "gemma270m" in names:
        g = work / "gemma270m"
        if not (g / "config.json").is_file():
            import torch
            import transformers as T

            cfg = T.Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                     max_position_embeddings=32768, query_pre_attn_scalar=256, sliding_window=512,
                                     layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                                  for i in range(18)])
            torch.manual_seed(0)
            T.Gemma3ForCausalLM(cfg).save_pretrained(g)
            gguf_tokenizer(gguf).save_pretrained(g)
        out["gemma270m"] = g
    return out


def _data(work: Path) -> Path:
    sotu = ASSETS / "sotu"
    path = work / "data.jsonl"
    if sotu.is_dir():
        texts = [f.read_text(errors="replace") for f in sorted(sotu.glob("*.txt"))]
    else:
        from tests import hf_models as H

        texts = H.lm_texts(4000)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _step(metrics: Path) -> int:
    try:
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return 0
    return max((r["step"] for r in rows if r.get("kind") == "train"), default=0)


def measure(model: Path, data: Path, policy: str, steps: int, out: Path, app: Path = ROOT) -> dict[str, float]:
    args = [f"model.path={model}", f"data.source={data}", "data.seq_len=128", "train.batch_size=4",
            f"train.steps={steps}", "train.log_every=1", "train.progress=false", "train.samples=0",
            "train.report=false", f"train.output_dir={out}", "adapter.r=8", "adapter.alpha=16"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(app))
    env.pop("XLA_FLAGS", None)
    if policy in ("glibc", "before"):
        env["LORAX_KEEP_HOST_MEMORY"] = "0"
    code = RUN.format(prelude=BEFORE if policy == "before" else "")
    proc = subprocess.Popen([sys.executable, "-c", code, *[a for kv in args for a in ("--set", kv)]], cwd=app,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    by_step: dict[int, int] = {}
    peak = 0
    while proc.poll() is None:
        rss = _rss_kb(proc.pid)
        if rss is not None:
            peak = max(peak, rss)
            s = _step(out / "metrics.jsonl")
            by_step[s] = max(by_step.get(s, 0), rss)
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{model.name} / {policy} exited {proc.returncode}:\n{err[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    at = lambda s: max(v for k, v in by_step.items() if k <= s) / 2**20  # noqa: E731 - GiB
    return {"peak": peak / 2**20, "at10": at(10), "at_end": at(steps - 1), "s_per_step": summary["seconds_per_step"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--models", default="smollm2,gemma270m")
    ap.add_argument("--policies", default="glibc,before,after")
    ap.add_argument("--work", default=None, help="keep the converted models here (default: a temp dir)")
    ap.add_argument("--app", default=str(ROOT), help="the checkout whose training app runs (e.g. a git worktree of "
                    "an earlier commit, for a before/after figure)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    models, data = _models(work, a.models.split(",")), _data(work)
    print(f"{'model':10s} {'policy':7s} {'peak GiB':>9s} {'step 10':>8s} {'step ' + str(a.steps):>9s} "
          f"{'growth':>7s} {'s/step':>7s} {'vs glibc':>9s}", flush=True)
    for name, path in models.items():
        base = None
        for policy in a.policies.split(","):
            out = work / f"run-{name}-{policy}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            m = measure(path, data, policy, a.steps, out, Path(a.app))
            base = base or m
            print(f"{name:10s} {policy:7s} {m['peak']:9.2f} {m['at10']:8.2f} {m['at_end']:9.2f} "
                  f"{m['at_end'] - m['at10']:+7.2f} {m['s_per_step']:7.3f} {m['s_per_step'] / base['s_per_step']:9.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
