"""Peak resident memory and time of preparing chat SFT data (read, check, tokenize with the chat template, pack)
at 1x, 10x and 100x a demo-sized dataset, each in a fresh process, with SmolLM2's tokenizer (``make assets``).

    python bench/bench_data_prep.py [--base 3000] [--scales 1,10,100] [--app PATH-TO-ANOTHER-CHECKOUT] [--work DIR]

The conversations are synthetic (1-3 exchanges of 5-40 words, a system turn in 40% of them), written once as
jsonl. Printed per scale: examples, rows, packing efficiency, peak RSS (GiB), its growth over the 1x run, and
seconds; the first run of a scale tokenizes, a second run (``cached``) reads the tokens back from the
``datasets`` cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / ".cache" / "assets" / "SmolLM2-135M-Instruct.Q4_1.gguf"

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from train.config import DataConfig
from train.data import load_data
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2], local_files_only=True)
cfg = DataConfig(source=sys.argv[1], messages_field="messages", seq_len=1024)
train, _, _ = load_data(cfg, "causal_lm", tok)
rows = len(train)
eff = train.stats.get("real_tokens", 0) / max(train.stats.get("row_tokens", 1), 1)
print(json.dumps({"examples": train.stats["examples"], "rows": rows, "efficiency": eff,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "s": time.perf_counter() - t0}))
"""


def _write(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array("the a cat dog sat ran on mat why how what is are we you they big small red blue green "
                     "house tree river city night day light water fire earth".split())
    say = lambda: " ".join(rng.choice(words, int(rng.integers(5, 41))))  # noqa: E731
    with path.open("w") as f:
        for _ in range(n):
            turns = [{"role": "system", "content": say()}] if rng.random() < 0.4 else []
            for _ in range(int(rng.integers(1, 4))):
                turns += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
            f.write(json.dumps({"messages": turns}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=int, default=3000, help="conversations at 1x (the chat demo's size)")
    ap.add_argument("--scales", default="1,10,100")
    ap.add_argument("--app", default=str(ROOT))
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        sys.path.insert(0, str(ROOT))
        from lorax_variants.hf import gguf_tokenizer

        if not GGUF.is_file():
            raise SystemExit(f"{GGUF} is missing: run `make assets`")
        gguf_tokenizer(GGUF).save_pretrained(tok_dir)
    env = dict(os.environ, PYTHONPATH=str(a.app), HF_DATASETS_CACHE=str(work / "hf-cache"), JAX_PLATFORMS="cpu")
    print(f"{'scale':>6s} {'run':7s} {'examples':>9s} {'rows':>7s} {'packed':>7s} {'peak GiB':>9s} {'vs 1x':>7s} "
          f"{'seconds':>8s}", flush=True)
    base_peak = None
    for scale in (int(x) for x in a.scales.split(",")):
        data = work / f"chat-{scale}x.jsonl"
        if not data.is_file():
            _write(data, a.base * scale)
        for run in ("first", "cached"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(data), str(tok_dir)], env=env, cwd=a.app,
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            m = json.loads(out.stdout.strip().splitlines()[-1])
            peak = m["peak_kb"] / 2**20
            base_peak = base_peak or peak
            print(f"{scale:>5d}x {run:7s} {m['examples']:9d} {m['rows']:7d} {m['efficiency']:7.1%} {peak:9.2f} "
                  f"{peak / base_peak:7.2f} {m['s']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
