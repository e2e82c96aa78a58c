"""Context parallelism (``models.context``): a sequence split over a ``context`` mesh axis, with fsdp and tensor
axes beside it, gives the one-device loss, adapter gradients and logits (packed rows, padding, sliding windows, GQA,
Qwen3's q/k norms, Gemma 3's local and global layers), and the tokens really are split over the devices."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.env import xla_env

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.models.context import ContextParallel
from lorax_variants.sharding import make_mesh
from tests import hf_models as H
from train.step import next_token_ce

jax.config.update("jax_default_matmul_precision", "highest")
cases, full = json.loads(sys.argv[1]), sys.argv[2] == "full"  # full: remat and the logits too
T = 64
rng = np.random.default_rng(0)
ids = jnp.asarray(rng.integers(1, 96, (2, T)), jnp.int32)
seg = np.ones((2, T), np.int32)
seg[0, 20:50], seg[0, 50:60], seg[0, 60:] = 2, 3, 0  # three documents and padding
seg[1, 37:] = 2
batch = {"input_ids": ids, "attention_mask": jnp.asarray(seg != 0, jnp.int32), "segment_ids": jnp.asarray(seg)}
keep = jnp.asarray((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0), jnp.float32)  # next tokens in the same document
out = {}
for name, meshes in cases.items():
    model = hf.from_config(H.CONFIGS[name]()[1], remat="full" if full else "none")
    model.mlp_chunk = 4  # the MLP in chunks of each device's own tokens
    tree = lv.adapt(model.init(jax.random.key(0)), lv.AdapterSpec(targets=r"layers/(attn|mlp)/\w+_proj",
                                                                   stacked=model.stacked, r=4), 1)
    tr, fr = lv.split(tree)
    tr = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape, x.dtype), tr)

    def loss(tr, fr):
        ce, _ = next_token_ce(model, lv.resolve_shared(lv.combine(tr, fr)), batch, chunk=4)
        return jnp.sum(ce * keep)

    ref_l, ref_g = jax.jit(jax.value_and_grad(loss))(tr, fr)
    real = seg != 0  # outputs at padding are not defined
    logits = lambda: np.asarray(jax.jit(lambda t: model.apply(lv.combine(t, fr), ids, segment_ids=batch["segment_ids"]))(tr))[real]  # noqa: E731
    ref_logits = logits() if full else None
    for m in meshes:
        shape = {k: v for k, v in m.items() if k != "balance"}
        model.context = ContextParallel(make_mesh(devices=jax.devices(), **shape), balance=m["balance"])
        l, g = jax.jit(jax.value_and_grad(loss))(tr, fr)
        h = jax.jit(lambda p: model.hidden(p, ids, device_order=True))(lv.combine(tr, fr))
        out[f"{name} {m}"] = {
            "loss": abs(float(l) - float(ref_l)) / abs(float(ref_l)),
            "grads": max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                         for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g))),
            "logits": float(np.max(np.abs(logits() - ref_logits)) / np.max(np.abs(ref_logits))) if full else 0.0,
            "nonzero": min(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref_g)),
            "local_tokens": h.sharding.shard_shape(h.shape)[1]}
        model.context = None
print(json.dumps(out))
"""

MIXED = {"context": 2, "fsdp": 2, "tensor": 2, "balance": True}
ALL8 = {"context": 8, "fsdp": 1, "balance": True}
UNBALANCED = {"context": 4, "fsdp": 2, "balance": False}


def _run(cases: dict, full: bool = False) -> dict:
    from tests.train.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases), "full" if full else "quick"],
                          env=xla_env(8, PYTHONPATH=str(ROOT)), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(got: dict) -> None:
    for case, r in got.items():
        assert r["loss"] < 1e-5 and r["grads"] < 1e-5 and r["logits"] < 1e-5, (case, r)
        assert r["nonzero"] > 0, case  # every adapter leaf has a gradient (the comparison is not of zeros)
        m = json.loads(case.split(" ", 1)[1].replace("'", '"').replace("True", "true").replace("False", "false"))
        assert r["local_tokens"] == 64 // m["context"], case  # each device holds its share of the tokens


@pytest.mark.slow  # CI's test-slow; the default run has context parallelism through the app (tests/train/test_sharded.py:
def test_context_parallel_equals_one_device():  # Llama, packed rows, on fsdp 2 x context 2 x tensor 2)
    _check(_run({"gemma3": [MIXED]}))  # sliding and global layers, q/k norms, GQA, packed rows (remat and logits: slow)


@pytest.mark.slow  # CI's test-slow
def test_context_parallel_meshes():
    _check(_run({"llama_gqa_untied": [MIXED, ALL8, UNBALANCED], "qwen3_windows": [MIXED, ALL8, UNBALANCED],
                 "gemma3": [MIXED, ALL8, UNBALANCED], "mistral_window": [MIXED]}, full=True))


def test_context_order_balances_causal_work():
    """Balanced: device i holds chunks i and 2n-1-i, so the causal work (keys each query sees) is the same on every
    device; unbalanced, the last device does most of it. Bad lengths are named."""
    import jax

    from lorax_variants.models.context import ContextParallel
    from lorax_variants.sharding import make_mesh

    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    n, t = 4, 64

    class FakeMesh:  # the order needs only the axis size
        shape = {"context": n}

    cp = ContextParallel(FakeMesh(), balance=True)  # type: ignore[arg-type]
    order = cp.order(t)
    assert sorted(order) == list(range(t))
    work = [(order[d * t // n:(d + 1) * t // n] + 1).sum() for d in range(n)]  # query at position p sees p + 1 keys
    assert len(set(work)) == 1
    flat = ContextParallel(FakeMesh(), balance=False).order(t)  # type: ignore[arg-type]
    assert list(flat) == list(range(t))
    with pytest.raises(ValueError, match="sequence length 60 must be a multiple of 8"):
        cp.order(60)
    assert ContextParallel(mesh).size == 1
    np.testing.assert_array_equal(ContextParallel(mesh).order(6), np.arange(6))
