"""Many adapters in one step against k separate steps, and against the masked-dense formulation.

    python bench/bench_multi_adapter.py [--d 512 --layers 4 --seq 128 --batch 16 --ks 1,4,16 --rounds 5]
    python bench/bench_multi_adapter.py --tpu v5p [--d 2048 --seq 512]   # compiled for a TPU, nothing run

Model: the tiny pre-norm transformer (stacked layers, scan), fp32, Adam; adapters on all 6 projections of
every layer, ranks cycling 8, 16, 32 and every fourth adapter DoRA. The batch's rows are split evenly
between the k adapters (sorted by adapter). Per k, the same rows and adapters three ways, timed in turns
in this process (medians over ``--rounds``):

- together: one jitted step of the k-adapter tree (``lv.adapters``, per-example batched matmuls), each
  adapter's loss a mean over its rows (``lv.adapter_means``), so each gets the gradient it would alone;
- separate: k jitted steps, adapter i alone (``lv.pick``) on its rows (one step per adapter, as k jobs would);
- masked: one step where every adapter runs over every row and a mask keeps each row's own (``impl="masked"``).

Printed: seconds per step of all k adapters and the ratios separate/together and masked/together (> 1:
together is faster), and each program's FLOPs from XLA's cost analysis (scan bodies counted once).

``--tpu v5p`` (needs ``make libtpu``): the same programs compiled for a TPU chip without one (deviceless, as
``bench_long_context.py``), the one step both ways (``ragged``: ``jax.lax.ragged_dot``, a native op of XLA:TPU;
``gather``), and their FLOPs and device bytes from XLA:TPU's analyses; no times.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

LIBTPU = Path(__file__).resolve().parents[1] / ".cache" / "libtpu"
if "--tpu" in sys.argv:  # before jax is imported: the CPU stays the default backend, XLA:TPU only compiles
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: processes may share libtpu
    sys.path.insert(0, str(LIBTPU))

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lorax_variants as lv  # noqa: E402
from lorax_variants.models import STACKED, TinyConfig, TinyTransformer  # noqa: E402
from suite import alternate  # noqa: E402

TARGETS = r"layers/(attn|mlp)/\w+_proj"
RANKS = (8, 16, 32)


def specs(k: int) -> dict[str, lv.AdapterSpec]:
    """k adapters: ranks cycling 8, 16, 32; every fourth one DoRA."""
    return {f"adapter{i}": lv.AdapterSpec(TARGETS, stacked=STACKED, r=RANKS[i % 3], alpha=2 * RANKS[i % 3],
                                          variant="dora" if i % 4 == 3 else "lora") for i in range(k)}


def token_sums(model: TinyTransformer, tree: Any, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: summed next-token cross-entropy and token count."""
    logits = model.apply(tree, ids[:, :-1]).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    return jnp.sum(nll, axis=-1), jnp.full(ids.shape[:1], ids.shape[1] - 1, jnp.float32)


def make_step(model: TinyTransformer, opt: optax.GradientTransformation, routes: np.ndarray | None, k: int) -> Callable:
    def loss_fn(trainable, frozen, ids):
        tree = lv.combine(trainable, frozen)
        if routes is None:  # one adapter alone on its rows: the plain mean
            sums, counts = token_sums(model, tree, ids)
            return jnp.sum(sums) / jnp.sum(counts)
        sums, counts = token_sums(model, lv.route(tree, routes), ids)
        return jnp.sum(lv.adapter_means(sums, counts, jnp.asarray(routes), k)[0])

    def step(trainable, opt_state, frozen, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step)


def flops(step: Callable, *args: Any) -> float:
    return float(step.lower(*args).compile().cost_analysis().get("flops", float("nan")))


def with_impl(tree: Any, impl: str) -> Any:
    return jax.tree.map(lambda n: n.replace(impl=impl) if isinstance(n, lv.MultiAdapterNode) else n, tree,
                        is_leaf=lambda n: isinstance(n, lv.MultiAdapterNode))


def run(a: argparse.Namespace) -> list[dict[str, float]]:
    config = TinyConfig(vocab_size=256, d_model=a.d, n_heads=max(1, a.d // 64), d_ff=4 * a.d, n_layers=a.layers,
                        max_len=a.seq + 1)
    model = TinyTransformer(config)
    params = model.init(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(2), (a.batch, a.seq + 1), 0, config.vocab_size)
    opt = optax.adam(1e-4)
    out = []
    for k in a.ks:
        if a.batch % k:
            raise SystemExit(f"--batch {a.batch} is not a multiple of k={k}")
        routes = np.sort(np.arange(a.batch) % k)
        tree = lv.adapters(params, specs(k), jax.random.key(1))
        tree = jax.tree.map(lambda x: x + 1e-3 if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
        calls, figures = {}, {}
        for impl in ("together", "masked"):
            trainable, frozen = lv.split(with_impl(tree, "gather" if impl == "together" else "masked"))
            step = make_step(model, opt, routes, k)
            state = [trainable, opt.init(trainable)]
            figures[impl] = flops(step, *state, frozen, ids)

            def call(step=step, state=state, frozen=frozen):
                state[0], state[1], loss = step(state[0], state[1], frozen, ids)
                loss.block_until_ready()
            calls[impl] = call
        singles = []
        step_alone = make_step(model, opt, None, 1)
        total = 0.0
        for i, name in enumerate(lv.adapter_names(tree)):
            trainable, frozen = lv.split(lv.pick(tree, name))
            rows = ids[routes == i]
            state = [trainable, opt.init(trainable)]
            total += flops(step_alone, *state, frozen, rows)
            singles.append((state, frozen, rows))
        figures["separate"] = total

        def separate():
            for state, frozen, rows in singles:
                state[0], state[1], loss = step_alone(state[0], state[1], frozen, rows)
            loss.block_until_ready()
        calls = {"together": calls["together"], "separate": separate, "masked": calls["masked"]}
        times = alternate(calls, a.rounds, warm=2, pause=0.2)
        row = {"k": k, **{f"{n}_s": t for n, t in times.items()}, **{f"{n}_flops": f for n, f in figures.items()}}
        print(f"k={k:3d}  together {times['together']:.3f} s  separate {times['separate']:.3f} s "
              f"(x{times['separate'] / times['together']:.2f})  masked {times['masked']:.3f} s "
              f"(x{times['masked'] / times['together']:.2f});  GFLOP together {figures['together'] / 1e9:.1f} "
              f"separate {figures['separate'] / 1e9:.1f} masked {figures['masked'] / 1e9:.1f}", flush=True)
        out.append(row)
    return out


def tpu_figures(a: argparse.Namespace) -> None:
    """FLOPs and device bytes of each program compiled for one TPU chip (abstract shapes, nothing allocated)."""
    from jax.experimental import topologies

    if not (LIBTPU / "libtpu").is_dir():
        raise SystemExit(f"--tpu needs the libtpu wheel unpacked in {LIBTPU}: run make libtpu")
    device = topologies.get_topology_desc(topology_name=f"{a.tpu}:2x2x1" if a.tpu in ("v4", "v5p") else f"{a.tpu}:2x2",
                                          platform="tpu").devices[0]
    place = jax.sharding.SingleDeviceSharding(device)
    on = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place), t)  # noqa: E731
    config = TinyConfig(vocab_size=256, d_model=a.d, n_heads=max(1, a.d // 64), d_ff=4 * a.d, n_layers=a.layers,
                        max_len=a.seq + 1)
    model = TinyTransformer(config)
    params = jax.eval_shape(lambda k: model.init(k), jax.random.key(0))
    opt = optax.adam(1e-4)
    print(f"compiled for TPU {a.tpu} ({device.device_kind}) without one: d={a.d} L={a.layers} seq={a.seq} "
          f"batch={a.batch}; FLOPs and bytes from XLA:TPU's analyses", flush=True)

    def figures(step: Callable, trainable: Any, frozen: Any, rows: int) -> tuple[float, float]:
        ids = jax.ShapeDtypeStruct((rows, a.seq + 1), jnp.int32, sharding=place)
        state = on((trainable, jax.eval_shape(opt.init, trainable)))
        compiled = step.lower(*state, on(frozen), ids).compile()
        mem = compiled.memory_analysis()
        used = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        return float(compiled.cost_analysis().get("flops", float("nan"))), float(used)

    print("| k | one step, ragged: GFLOP | GiB | one step, gather: GFLOP | GiB | k separate steps: GFLOP | masked: GFLOP "
          "| GiB | masked/ragged FLOPs |\n|---|---|---|---|---|---|---|---|---|")
    for k in a.ks:
        routes = np.sort(np.arange(a.batch) % k)
        tree = jax.eval_shape(lambda p: lv.adapters(p, specs(k), jax.random.key(1)), params)
        out = {}
        for impl in ("ragged", "gather", "masked"):
            trainable, frozen = lv.split(with_impl(tree, impl))
            out[impl] = figures(make_step(model, opt, routes, k), trainable, frozen, a.batch)
        step_alone, separate, seen = make_step(model, opt, None, 1), 0.0, {}
        for i, (name, spec) in enumerate(specs(k).items()):
            rows = int(np.sum(routes == i))
            if (spec.r, spec.variant, rows) not in seen:  # the same program for adapters of one rank and variant
                trainable, frozen = lv.split(lv.pick(tree, name))
                seen[spec.r, spec.variant, rows] = figures(step_alone, trainable, frozen, rows)[0]
            separate += seen[spec.r, spec.variant, rows]
        gib = 2.0**30
        print(f"| {k} | {out['ragged'][0] / 1e9:.1f} | {out['ragged'][1] / gib:.2f} | {out['gather'][0] / 1e9:.1f} | "
              f"{out['gather'][1] / gib:.2f} | {separate / 1e9:.1f} | {out['masked'][0] / 1e9:.1f} | {out['masked'][1] / gib:.2f} | "
              f"{out['masked'][0] / out['ragged'][0]:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tpu", help="compile for this TPU generation instead of timing (v5p, v5e, v6e; make libtpu)")
    a = ap.parse_args()
    if a.tpu:
        return tpu_figures(a)
    print(f"many adapters in one step: d={a.d} L={a.layers} seq={a.seq} batch={a.batch}, ranks {RANKS} "
          f"(every 4th DoRA), JAX {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    rows = run(a)
    print("\n| k | together s | separate s | separate/together | masked s | masked/together |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['together_s']:.3f} | {r['separate_s']:.3f} | {r['separate_s'] / r['together_s']:.2f}x "
              f"| {r['masked_s']:.3f} | {r['masked_s'] / r['together_s']:.2f}x |")


if __name__ == "__main__":
    main()
