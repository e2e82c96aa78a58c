"""The training loop: ``run(cfg)`` trains, evaluates, checkpoints and resumes; ``dry_run(cfg)`` plans.

Exact resume: batch ``step`` is a pure function of (data.seed, step), the step's RNG is
``fold_in(key(train.seed), step)``, and the trainable leaves and optimizer state come back from
the checkpoint bit for bit, so an interrupted and resumed run ends where an uninterrupted one does.
SIGTERM/SIGINT finish the current step, save a checkpoint and exit (codes 143/130).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import lorax_variants as lv
from lorax_variants.diagnostics import active_ranks, magnitude_direction
from lorax_variants.hf.auto import model_config
from lorax_variants.hf.safetensors_io import write_safetensors, write_text_atomic
from lorax_variants import recipes
from lorax_variants.recipes import recipe
from lorax_variants.sharding import state_shardings, to_host
from lorax_variants.tree import leaves_with_paths
from train import checkpoint as ckpt
from train.build import (Built, build, check_positions, init_distributed, load_tokenizer, micro_batch, model_dir,
                         rebuild)
from train.config import Config, ConfigError, config_digest, import_function, to_dict
from train.fingerprint import fingerprint
from train.data import Batches, TokenData, eval_batches, load_data, load_routed, packing_efficiency
from train.lock import RunLock
from train.metrics import Metrics
from train.optim import build_optimizer, lr_groups
from train.rollout import group_stats, reward_function, rollout, score_completion
from train.step import StepFns, make_steps, pair_rows

__all__ = ["run", "restore", "Interrupted", "NonFinite", "Result"]


class Interrupted(Exception):
    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved")
        self.signum, self.step = signum, step


class NonFinite(Exception):
    """More non-finite steps than ``train.max_nonfinite``: the run stops without saving."""


def _nonfinite_message(step: int, mm: dict[str, Any], trainable: Any, skipped: int, limit: int | None) -> str:
    names = [p for p, _ in leaves_with_paths(trainable)]

    def where(key: str, what: str) -> str:
        ok = np.asarray(mm[key])
        bad = [names[i] if len(names) == len(ok) else f"leaf {i}" for i in np.flatnonzero(~ok)]
        return f"; {what} not finite (or overflowing in their norm) in {len(bad)} of {len(ok)} trainable leaves: " + ", ".join(bad[:6]) + (
            ", ..." if len(bad) > 6 else "") if bad else ""

    of = "" if limit is None else f" ({skipped} of train.max_nonfinite={limit})"
    return (f"step {step}: loss {float(mm['loss']):.4g}" + where("finite_grads", "gradients")
            + where("finite_params", "updated values") + f"; update skipped{of}")


@dataclasses.dataclass
class Prepared:
    cfg: Config
    tokenizer: Any
    train: TokenData
    eval: TokenData | None
    labels: list[str] | None
    built: Built
    optimizer: Any
    opt_abstract: Any
    opt_sh: Any
    base: tuple[str, str | None] = ("", None)  # the base model directory and its fingerprint (real runs)


def _prepare(cfg: Config, abstract: bool) -> Prepared:
    init_distributed(cfg)
    path = model_dir(cfg)
    tokenizer = load_tokenizer(path)
    hf_config = model_config(path)  # read once: the positions check and the model both use it
    check_positions(cfg, hf_config)  # before reading any data
    table = routes(cfg)
    shard = (jax.process_index(), jax.process_count()) if cfg.data.host_shards else (0, 1)
    grpo = cfg.objective.settings(cfg.train.objective) if cfg.train.objective == "grpo" else None
    if grpo is not None:
        if jax.process_count() > 1:
            raise ConfigError("train.objective=grpo: rollouts run on one process so far (the mesh's devices of one "
                              "host); multi-host GRPO is not supported yet")
        reward_function(grpo.reward)  # a wrong name fails now, not after the first rollout
    if table is not None:  # many adapters: each adapter's rows from its task label or its own source
        train, held, labels = load_routed(cfg.data, cfg.model.task, tokenizer, table, shard)
    else:
        width = cfg.data.seq_len - grpo.max_completion_length if grpo is not None else None
        train, held, labels = load_data(cfg.data, cfg.model.task, tokenizer, shard=shard, prompt_width=width)
    if shard[1] > 1:  # the run's figures are every host's together
        train.stats = _all_hosts(train.stats, len(train)) | {"host_examples": train.stats["examples"],
                                                             "host_rows": len(train)}
    if cfg.train.gen_eval:
        score_function(cfg.train.gen_eval_score)  # a wrong name fails now, not after training
    num_labels = None
    if "task_ids" in train.arrays and table is None and int(train.arrays["task_ids"].max()) >= n_routes(cfg):
        raise ConfigError(f"adapter.{cfg.adapter.variant}: {n_routes(cfg)} adapters but data.task_field has task "
                          f"index {int(train.arrays['task_ids'].max())}")
    if cfg.model.task == "sequence_classification":
        num_labels = cfg.model.num_labels or len(labels)
        if num_labels < len(labels):
            raise ConfigError(f"model.num_labels={num_labels} but the data has {len(labels)} labels: {labels}")
    vocab = train.arrays["input_ids"].max()
    built = build(cfg, num_labels=num_labels, abstract=abstract, hf_config=hf_config)
    micro_batch(cfg, built.mesh)
    model_vocab = getattr(built.model.config, "vocab_size", None)
    if model_vocab is not None and vocab >= model_vocab:
        raise ConfigError(f"model.path: the tokenizer produced token id {vocab}, beyond the model's vocab_size "
                          f"{model_vocab} (tokenizer and model do not match)")
    base = (str(path), None if abstract else fingerprint(path))  # read once, recorded in every checkpoint
    p = _with_optimizer(Prepared(cfg, tokenizer, train, held, labels, built, None, None, None, base), built)
    if abstract:
        return p
    init = recipes.init_recipe(cfg.adapter.init)
    p = _init_from_data(p, init) if init.from_data is not None else p
    if getattr(cfg.objective.settings(cfg.train.objective), "reference", None) == "precomputed":
        _reference_logps(p)
    return p


def _reference_logps(p: Prepared) -> None:
    """``reference: precomputed``: every pair's summed completion log-probabilities under the initial adapted
    model (before any step), as ``ref_logps`` [pairs, 2] beside the token rows of the train and eval data.
    Deterministic, so a resumed run computes the same ones."""
    cfg = p.cfg
    if jax.process_count() > 1:
        raise ConfigError(f"objective.{cfg.train.objective}.reference: precomputed runs on one process so far; use "
                          "base (the adapters switched off in the step)")
    fns = _steps(p)
    n = cfg.train.batch_size
    for data in (p.train, p.eval):
        if data is None:
            continue
        out = []
        for start in range(0, len(data), n):
            chunk = {k: v[start:start + n] for k, v in data.arrays.items() if k != "ref_logps"}
            real = len(chunk["input_ids"])
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], n - real, 0)]) if real < n else v for k, v in chunk.items()}
            arrays = {k: jax.make_array_from_process_local_data(fns.batch_sharding(v.ndim, False), v)
                      for k, v in chunk.items()}  # in the data's order (routed rows are not grouped here)
            out.append(np.asarray(jax.device_get(fns.pair_logps(p.built.trainable, p.built.frozen, arrays)))[:real])
        data.arrays["ref_logps"] = np.concatenate(out).astype(np.float32)


def _init_from_data(p: Prepared, init: recipes.InitRecipe) -> Prepared:
    """An init that reads the first training batches (``InitRecipe.from_data``: LoRA-GA's gradient, EVA's input
    components, ...): the loop's loss, forward and batches handed to the init's own module. Deterministic, so a
    resume or an export that prepares the run again gets the same adapters and bases."""
    cfg = p.cfg
    if init.single_host and jax.process_count() > 1:
        raise ConfigError(f"adapter.init={init.name}: it runs on one host's batches; multi-host runs are not supported "
                          "yet (initialize with lorax_variants and start from that tree)")
    model = p.built.model
    fns: list[StepFns] = []

    def steps() -> StepFns:
        if not fns:
            fns.append(_steps(p))
        return fns[0]

    def forward(tree: Any, b: dict[str, Any]) -> Any:
        packed = {"segment_ids": jnp.asarray(b["segment_ids"])} if "segment_ids" in b else {}
        return model.apply(tree, jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]), **packed)

    def token_mask(b: dict[str, Any]) -> np.ndarray:
        m = np.asarray(b["attention_mask"]).astype(bool)
        return m & np.asarray(b["loss_mask"]).astype(bool) if "loss_mask" in b else m

    def global_batches(n: int) -> list[Any]:
        batches = Batches(p.train, cfg.train.batch_size, cfg.data.seed, jax.process_index(), jax.process_count(),
                          sharded="shards" in p.train.stats)
        return _global_batches(batches, steps(), range(n))

    def host_batches(n: int) -> list[Any]:
        batches = Batches(p.train, cfg.train.batch_size, cfg.data.seed, 0, 1)
        return [batches.local(i) for i in range(min(n, max(1, len(p.train) // cfg.train.batch_size)))]

    data = recipes.InitData(loss=lambda tree, b: steps().loss(tree, b), forward=forward, token_mask=token_mask,
                            global_batches=global_batches, host_batches=host_batches, seed=cfg.adapter.seed)
    tree = lv.combine(p.built.trainable, p.built.frozen)
    try:
        tree = init.from_data(cfg.adapter.init_settings(), tree, data)
    except ValueError as e:
        raise ConfigError(f"adapter.init={init.name}: {e}") from None
    if jax.process_index() == 0 and init.describe is not None:
        print(f"{cfg.name}: {init.describe(cfg.adapter.init_settings())}", flush=True)
    return _with_optimizer(p, rebuild(p.built, tree))


def _all_hosts(stats: dict[str, int], rows: int) -> dict[str, int]:
    """``stats`` of this host's shard summed over the processes (the same keys on every host), with the
    ``rows`` of them all; ``shard`` dropped."""
    from jax.experimental import multihost_utils

    keys = sorted(k for k in stats if k not in ("shard", "shards"))
    local = np.array([stats[k] for k in keys] + [rows], np.int64)
    total = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1).sum(0)
    return {k: int(v) for k, v in zip(keys, total[:-1])} | {"rows": int(total[-1]), "shards": stats["shards"]}


def routes(cfg: Config) -> list[Any] | None:
    """The adapters rows are routed to, with where their rows come from (many adapters), else None."""
    variant = recipe(cfg.adapter.variant)
    return variant.routes(cfg.adapter.settings()) if variant.routes is not None else None


def n_routes(cfg: Config) -> int:
    """How many adapters rows are routed to (multi-task's tasks, or many adapters)."""
    table = routes(cfg)
    if table is not None:
        return len(table)
    variant = recipe(cfg.adapter.variant)
    return variant.tasks(cfg.adapter.settings()) if variant.tasks is not None else 1


def _with_optimizer(p: Prepared, built: Built) -> Prepared:
    """``p`` with ``built`` and the optimizer (and its state's shardings) for its trainable tree."""
    optimizer = build_optimizer(p.cfg, built.trainable, lv.combine(built.trainable, built.frozen), built.model.stacked)
    opt_abstract = jax.eval_shape(optimizer.init, built.trainable)
    opt_sh = state_shardings(opt_abstract, built.trainable, built.trainable_sh, NamedSharding(built.mesh, P()))
    return dataclasses.replace(p, built=built, optimizer=optimizer, opt_abstract=opt_abstract, opt_sh=opt_sh)


def _steps(p: Prepared) -> Any:
    cfg, b = p.cfg, p.built
    return make_steps(
        b.model, cfg.model.task, p.optimizer, mesh=b.mesh, trainable_sh=b.trainable_sh, frozen_sh=b.frozen_sh,
        opt_sh=p.opt_sh, compute_dtype=cfg.model.compute_dtype, dropout=cfg.adapter.dropout > 0,
        variant=recipe(cfg.adapter.variant), settings=cfg.adapter.settings(), n_tasks=n_routes(cfg),
        loss_chunk=cfg.model.loss_chunk, objective=cfg.train.objective,
        objective_settings=cfg.objective.settings(cfg.train.objective),
    )


def _reshape_at(cfg: Config) -> int | None:
    """The step after which the variant reshapes its tree (LoRA-drop's selection), if it does."""
    reshape = recipe(cfg.adapter.variant).reshape
    return reshape.at(cfg.adapter.settings(), cfg.train.steps) if reshape else None


def _global_batches(batches: Batches, fns: Any, steps: range) -> list[dict[str, Any]]:
    """The training batches of ``steps``, each as global arrays sharded over the mesh (rows, not accumulation)."""
    return [{k: jax.make_array_from_process_local_data(fns.batch_sharding(v.ndim, False), v)
             for k, v in batches.local(i).items()} for i in steps]


def _reshape_choice(p: Prepared, trainable: Any, frozen: Any, batches: Batches, fns: Any,
                    step: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The variant's reshaping decision after ``step`` steps, made on the next training batches."""
    cfg, model = p.cfg, p.built.model
    reshape, settings = recipe(cfg.adapter.variant).reshape, cfg.adapter.settings()
    sample = _global_batches(batches, fns, range(step, step + reshape.batches(settings)))
    if sample and sample[0]["input_ids"].ndim == 3:  # preference pairs: their chosen and rejected rows
        sample = [pair_rows(b) for b in sample]
    apply = lambda tree, b: model.apply(  # noqa: E731
        tree, b["input_ids"], b["attention_mask"], **({"segment_ids": b["segment_ids"]} if "segment_ids" in b else {}))
    return reshape.decide(settings, apply, lv.combine(trainable, frozen), sample, model.stacked)


def _reshaped(p: Prepared, trainable: Any, frozen: Any, choice: dict[str, np.ndarray]) -> Prepared:
    tree = recipe(p.cfg.adapter.variant).reshape.apply(lv.combine(trainable, frozen), choice)
    return _with_optimizer(p, rebuild(p.built, tree))


def _meta(cfg: Config, p: Prepared, step: int, choice: dict[str, np.ndarray] | None = None,
          run_id: str | None = None) -> dict[str, Any]:
    b = p.built
    return {
        "run_id": run_id,
        "reshape": {k: np.asarray(v).tolist() for k, v in choice.items()} if choice is not None else None,
        "step": step, "rows_consumed": step * cfg.train.batch_size, "config": to_dict(cfg),
        "base_model": p.base[0], "base_fingerprint": p.base[1],
        "adapter_spec": b.spec.to_dict() if b.spec else None, "quant_spec": b.quant.to_dict() if b.quant else None,
        "variant": cfg.adapter.variant, "task": cfg.model.task, "labels": p.labels,
        "seeds": {"adapter": cfg.adapter.seed, "train": cfg.train.seed, "data": cfg.data.seed},
        "trainable": [[path, list(x.shape)] for path, x in lv.leaves_with_paths(b.trainable)],
        "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
        "data_source": cfg.data.source, "seq_len": cfg.data.seq_len,
        "data_shards": p.train.stats.get("shards", 1),  # hosts that each prepared a slice of the data
        "optimizer": {k: v for k, v in dataclasses.asdict(cfg.optim).items()},
    }


def _grouped(local: dict[str, np.ndarray], accum: int = 1) -> dict[str, np.ndarray]:
    """Each micro-batch's rows grouped by adapter when rows are routed (grouped matmuls need it; the order of
    rows in a batch changes nothing else)."""
    if "task_ids" not in local:
        return local
    ids = local["task_ids"].reshape(accum, -1)
    order = np.concatenate([m * ids.shape[1] + lv.sort_by_adapter(row) for m, row in enumerate(ids)])
    return {k: v[order] for k, v in local.items()}


def _global_batch(local: dict[str, np.ndarray], accum: int, steps_fns: Any) -> dict[str, jax.Array]:
    local = _grouped(local, accum)
    out = {}
    for k, v in local.items():
        v = v.reshape(accum, v.shape[0] // accum, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(steps_fns.batch_sharding(v.ndim), v)
    return out


def evaluate_all(p: Prepared, fns: Any, trainable: Any, frozen: Any) -> dict[str, float]:
    """The eval of the run's objective: GRPO's held-out reward, else the held-out loss (and generation eval)."""
    if p.cfg.train.objective == "grpo":
        return _reward_eval(p, trainable, frozen)
    return _eval(p, fns, trainable, frozen) | _gen_eval(p, trainable, frozen)


def _reward_eval(p: Prepared, trainable: Any, frozen: Any) -> dict[str, float]:
    """GRPO: the mean reward of greedy completions (KV cache, up to ``max_completion_length``) of the held-out
    prompts (the first ``train.eval_batches`` x ``train.batch_size``; 0: all)."""
    cfg, s = p.cfg, p.cfg.objective.grpo
    n = len(p.eval) if not cfg.train.eval_batches else min(len(p.eval), cfg.train.eval_batches * cfg.train.batch_size)
    texts, rows = p.eval.prompt_rows
    arrays = p.eval.arrays
    asks = [{"ids": arrays["input_ids"][i, : int(arrays["attention_mask"][i].sum())].tolist()} for i in range(n)]
    answers = greedy_answers(p.built.model, lv.combine(trainable, frozen), p.tokenizer, asks, s.max_completion_length,
                             cfg.train.batch_size)
    fn = reward_function(s.reward)
    scores = [score_completion(fn, s.reward, texts[i], a, rows[i]) for i, a in enumerate(answers)]
    return {"reward": float(np.mean(scores)), "prompts": float(n)}


def _eval(p: Prepared, fns: Any, trainable: Any, frozen: Any) -> dict[str, float]:
    cfg = p.cfg
    sums: dict[str, Any] = {}
    for batch in eval_batches(p.eval, cfg.train.batch_size, cfg.train.eval_batches, jax.process_index(),
                              jax.process_count()):
        arrays = {k: jax.make_array_from_process_local_data(fns.batch_sharding(v.ndim, False), v)
                  for k, v in _grouped(batch).items()}
        out = jax.device_get(fns.eval(trainable, frozen, arrays))
        sums = {k: sums.get(k, 0.0) + np.asarray(v, np.float64) for k, v in out.items()}

    pairs = cfg.train.objective in ("dpo", "ipo", "simpo")

    def metrics(loss_sum: Any, count: Any, correct: Any, chosen: Any = 0.0, rejected: Any = 0.0) -> dict[str, float]:
        n = max(float(count), 1.0)
        if pairs:  # the held-out preference accuracy and TRL's reward metrics
            return {"loss": float(loss_sum) / n, "pairs": float(count), "preference_accuracy": float(correct) / n,
                    "rewards_chosen": float(chosen) / n, "rewards_rejected": float(rejected) / n,
                    "rewards_margin": (float(chosen) - float(rejected)) / n}
        res = {"loss": float(loss_sum) / n, "examples" if cfg.model.task != "causal_lm" else "tokens": float(count)}
        if cfg.model.task == "sequence_classification":
            res["accuracy"] = float(correct) / n
        else:
            res["perplexity"] = math.exp(min(res["loss"], 50.0))
            res["token_accuracy"] = float(correct) / n
        return res

    extra = ("rewards_chosen", "rewards_rejected") if pairs else ()
    res = metrics(sums["loss_sum"], sums["count"], sums["correct"], *(sums[k] for k in extra))
    for t in range(len(sums.get("task_count", []))):
        for k, v in metrics(sums["task_loss_sum"][t], sums["task_count"][t], sums["task_correct"][t],
                            *(sums[f"task_{k}"][t] for k in extra)).items():
            res[f"task{t}_{k}"] = v
    return res


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


def stop_tokens(tokenizer: Any) -> list[int]:
    """EOS and the end-of-turn tokens of common chat templates that the tokenizer has."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return sorted(set(ids) | {vocab[t] for t in END_OF_TURN if t in vocab})


def score_function(spec: str) -> Any:
    """``exact_match`` (outputs equal to the reference, both stripped), or the function ``module:function``
    names, called as ``fn(prompt, reference, output)`` and returning a number."""
    if spec == "exact_match":
        return lambda prompt, reference, output: float(output.strip() == reference.strip())
    return import_function(spec, "train.gen_eval_score")


def greedy_answers(model: Any, tree: Any, tokenizer: Any, asks: list[dict[str, Any]], max_new_tokens: int,
                   batch: int) -> list[str]:
    """Greedy answers (KV cache, up to ``max_new_tokens``, stopping at EOS or end of turn) to ``asks`` (each with
    its prompt's token ``ids``), decoded without special tokens, ``batch`` prompts per ``generate`` call."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_tokens(tokenizer)
    batch = min(max(1, batch), len(asks))
    width = max(len(a["ids"]) for a in asks)  # one shape for every group: one compilation
    texts = []
    for start in range(0, len(asks), batch):
        group = asks[start:start + batch]
        ids = np.full((batch, width), pad, np.int32)  # rows past the group's: padding only, their output unread
        mask = np.zeros((batch, width), np.int32)
        for i, a in enumerate(group):
            ids[i, : len(a["ids"])], mask[i, : len(a["ids"])] = a["ids"], 1
        out = np.asarray(jax.device_get(model.generate(tree, ids, attention_mask=mask, stop_tokens=stops,
                                                       max_new_tokens=max_new_tokens, pad_token_id=pad)))
        for row in out[: len(group), width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))  # after a stop: padding
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def _gen_eval(p: Prepared, trainable: Any, frozen: Any) -> dict[str, float]:
    """Greedy answers to the first ``train.gen_eval`` held-out prompts (:func:`greedy_answers`, up to
    ``train.gen_eval_tokens``), scored: ``{"gen_score": mean, "gen_examples": n}``."""
    cfg = p.cfg
    asks = (p.eval.prompts or [])[: cfg.train.gen_eval] if p.eval is not None else []
    if not cfg.train.gen_eval or not asks:
        return {}
    fn = score_function(cfg.train.gen_eval_score)
    texts = greedy_answers(p.built.model, lv.combine(trainable, frozen), p.tokenizer, asks,
                           cfg.train.gen_eval_tokens, cfg.train.batch_size)
    scores = []
    for a, text in zip(asks, texts):
        try:
            scores.append(float(fn(a["prompt"], a["reference"], text)))
        except Exception as e:  # noqa: BLE001 - the user's function: named, with what it was given
            raise ConfigError(f"train.gen_eval_score: {cfg.train.gen_eval_score} failed on a held-out example "
                              f"({type(e).__name__}: {e})") from None
    return {"gen_score": float(np.mean(scores)), "gen_examples": float(len(scores))}


def _samples(p: Prepared, trainable: Any, frozen: Any) -> list[str]:
    cfg, model = p.cfg, p.built.model
    if cfg.model.task != "causal_lm" or not cfg.train.samples or p.eval is None:
        return []
    rows = p.eval.arrays["input_ids"][: cfg.train.samples]
    rows = (rows[:, 0] if rows.ndim == 3 else rows)[:, :8]  # pairs: the chosen row's start
    tree = lv.combine(trainable, frozen)
    tok = p.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    routed = p.eval.arrays.get("task_ids")  # each sample through its own adapter
    out = np.asarray(jax.device_get(model.generate(tree, rows, max_new_tokens=cfg.train.sample_tokens,
                                                   stop_tokens=tok.eos_token_id, pad_token_id=pad,
                                                   task_ids=None if routed is None else routed[: len(rows)])))
    return [f"{tok.decode(r[:8])!r} -> {tok.decode(r[8:], skip_special_tokens=True)!r}" for r in out]


@dataclasses.dataclass
class State:
    trainable: Any
    frozen: Any
    opt_state: Any
    key: Any
    keep: dict[str, np.ndarray] | None  # the variant's reshaping choice (LoRA-drop's selection), once made
    step: int
    notes: list[str] = dataclasses.field(default_factory=list)  # what the restore let through and must be logged
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # kept by every checkpoint


def restore(p: Prepared, saver: ckpt.Checkpointer, step: int | None, *,
            force_base: bool = False) -> tuple[Prepared, State]:
    """The state at checkpoint ``step`` (``None``: the initial state), checked against this run
    (``force_base``: a checkpoint of other base weights is let through, with a note)."""
    cfg = p.cfg
    keep, saved = None, None
    if step is not None:
        saved = saver.meta(step)
        if saved.get("reshape") is not None:  # the checkpoint is past the variant's reshaping (LoRA-drop's selection)
            keep = {k: np.asarray(v, bool) for k, v in saved["reshape"].items()}
            p = _reshaped(p, p.built.trainable, p.built.frozen, keep)
    b = p.built
    key = jax.random.key(cfg.train.seed)
    trainable, frozen = b.trainable, b.frozen
    opt_state = jax.jit(p.optimizer.init, out_shardings=p.opt_sh)(trainable)
    if step is None:
        return p, State(trainable, frozen, opt_state, key, None, 0)
    current = _meta(cfg, p, step, keep)
    note = ckpt.check_base(saved, current, saver.directory / str(step), force_base)
    ckpt.check_meta(saved, current, saver.directory / str(step))
    notes = [note] if note else []
    if saved.get("data_shards", 1) != current["data_shards"]:
        notes.append(f"warning: the checkpoint's run prepared its data as {saved.get('data_shards', 1)} host "
                     f"slice(s), this one as {current['data_shards']}: the batches from step {step} on are not "
                     "those of an uninterrupted run (data.host_shards)")
    like = {"trainable": jax.tree.leaves(trainable), "opt_state": jax.tree.leaves(opt_state),
            "key": np.asarray(jax.random.key_data(key))}
    variant = recipe(cfg.adapter.variant)
    if variant.extras is not None:
        like["extras"] = variant.extras(frozen)
    state = saver.restore(step, like)
    trainable = jax.tree.unflatten(jax.tree.structure(trainable), state["trainable"])
    opt_state = jax.tree.unflatten(jax.tree.structure(opt_state), state["opt_state"])
    if "extras" in state:
        frozen = variant.with_extras(frozen, state["extras"])
    return p, State(trainable, frozen, opt_state, jax.random.wrap_key_data(jnp.asarray(state["key"])), keep, step,
                    notes, saved.get("run_id") or uuid.uuid4().hex)


def run(cfg: Config, *, resume: bool | None = None, force_base: bool = False,
        host_memory: bool = False) -> "Result":
    """Train per ``cfg``; resume from ``train.output_dir`` if it has a checkpoint (``resume=None``: auto;
    ``force_base``: even one trained on other base weights, with a warning in the log; ``host_memory``: once
    the model is loaded, ``lorax_variants.runtime.keep_host_memory`` for this process, as the CLI does).

    Writes ``adapters.safetensors`` (the trainable leaves by path, the run's meta as metadata),
    ``summary.json``, ``metrics.jsonl``, TensorBoard events and ``report/`` (figures); returns the
    summary and the final trees."""
    p = _prepare(cfg, abstract=False)
    if host_memory:
        from lorax_variants.runtime import keep_host_memory

        keep_host_memory(jax.default_backend())  # XLA:CPU's step temporaries reuse their pages
    out = Path(cfg.train.output_dir)
    lead = jax.process_index() == 0
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, active=lead):  # before anything in the directory is read, cleaned or written
        return _train(p, out, lead, resume, force_base)


def _train(p: Prepared, out: Path, lead: bool, resume: bool | None, force_base: bool) -> "Result":
    """Restore (or start), then the loop's named steps until the last step, a stop or an interrupt."""
    t = p.cfg.train
    saver = ckpt.Checkpointer(out, t.keep)
    latest = saver.latest()
    if latest is not None and resume is False:
        raise ConfigError(f"train.output_dir: {out} already has checkpoints (step {latest}); pass --resume to continue "
                          "or choose another directory")
    if latest is None and resume:
        raise ConfigError(f"--resume: {saver.directory} has no checkpoint")
    if latest is not None and latest > t.steps:  # never relabel or prune a run that went further
        raise ConfigError(f"train.steps={t.steps}: {out} holds a checkpoint at step {latest}, past this run's end; "
                          f"set train.steps to {latest} or more to continue it, or choose another train.output_dir "
                          "to start fresh (nothing was changed)")
    p, s = _restore_latest(p, saver, lead, force_base)
    if lead:  # only once the checkpoint (if any) is known to belong to this run: a refused run changes nothing
        write_text_atomic(out / "config.json", json.dumps(to_dict(p.cfg), indent=2))  # config_digest reads it back
        for stale in out.glob(".adapters.safetensors.*"):  # the temporary file of a write that was killed
            stale.unlink()
    loop = _Loop(p, s, saver, out, lead)
    try:
        if t.stop_at is not None and t.stop_at <= s.step < t.steps:
            loop.metrics.echo(f"already at step {s.step}, at or past train.stop_at={t.stop_at}: nothing to do; raise "
                              "train.stop_at (or unset it) to go on")
            return loop.stopped(s.step)
        with _signals() as stop:
            for step in range(s.step, t.steps):
                done = loop.train_step(step)
                loop.reshape(done)
                loop.log(done, flush=bool(stop))
                loop.evaluate(done)
                if loop.checkpoint(done, stop):
                    return loop.stopped(done)
            loop.finish()
    finally:
        loop.close()
    return loop.result()


def _restore_latest(p: Prepared, saver: ckpt.Checkpointer, lead: bool, force_base: bool) -> tuple[Prepared, State]:
    """The state of the latest checkpoint that reads back whole (the initial state if there is none).

    A damaged step (a file cut short, zeroed, replaced or missing) is passed over for the one before it;
    once a good one is found, the damaged steps after it are moved to ``damaged-checkpoints/`` (never
    deleted) and the move is logged. If no step reads back, nothing is moved and the error names each."""
    damaged: list[ckpt.CheckpointDamaged] = []
    for step in reversed(saver.steps()):
        try:
            note = saver.verify(step)
            q, s = restore(p, saver, step, force_base=force_base)
        except ckpt.CheckpointDamaged as e:
            damaged.append(e)
            continue
        s.notes += [note] if note else []
        if damaged:
            for e in damaged:
                where = saver.set_aside(e.step) if lead else saver.directory.parent / ckpt.DAMAGED
                s.notes.append(f"warning: {e}; moved to {where}; resuming from step {step}")
            _barrier("set_aside")
            saver.reload()
        return q, s
    if damaged:
        raise ckpt.CheckpointDamaged(damaged[0].step, damaged[0].path, damaged[0].reason + "".join(
            f"; and step {e.step}: {e.path}: {e.reason}" for e in damaged[1:])
            + "; no checkpoint reads back (nothing was changed): restore the files, or start fresh in another "
            "train.output_dir")
    return restore(p, saver, None)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class _signals:
    """SIGTERM/SIGINT recorded (not raised) while the loop runs: it saves and stops at the step's end."""

    def __enter__(self) -> list[int]:
        self.stop: list[int] = []
        self.handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.handlers[sig] = signal.signal(sig, lambda signum, _frame: self.stop.append(signum))
            except ValueError:  # not the main thread
                pass
        return self.stop

    def __exit__(self, *exc: Any) -> None:
        for sig, h in self.handlers.items():
            signal.signal(sig, h)


class _Loop:
    """The training loop's state and its steps: ``train_step``, ``reshape`` (the variant's one-time change of
    the tree), ``log`` (metrics and the non-finite policy), ``evaluate``, ``checkpoint`` (and stops), ``finish``
    (final eval, samples, save), ``result`` (summary and adapters)."""

    def __init__(self, p: Prepared, s: State, saver: ckpt.Checkpointer, out: Path, lead: bool):
        cfg, t = p.cfg, p.cfg.train
        self.p, self.cfg, self.t, self.saver, self.out, self.lead = p, cfg, t, saver, out, lead
        self.trainable, self.frozen, self.opt_state, self.key = s.trainable, s.frozen, s.opt_state, s.key
        self.keep, self.start = s.keep, s.step
        self.variant = recipe(cfg.adapter.variant)
        self.fns = _steps(p)
        self.grpo = cfg.objective.grpo if cfg.train.objective == "grpo" else None
        per_step = t.batch_size // self.grpo.group_size if self.grpo is not None else t.batch_size  # GRPO: prompts
        self.batches = Batches(p.train, per_step, cfg.data.seed, jax.process_index(), jax.process_count(),
                               sharded="shards" in p.train.stats)
        if self.grpo is not None:
            self.reward_fn, self.stops = reward_function(self.grpo.reward), stop_tokens(p.tokenizer)
        self.groups = lr_groups(cfg, self.trainable, p.built.model.stacked)
        self.run_id = s.run_id
        self.metrics = Metrics(out, t.steps, s.step, active=lead, progress=t.progress, run_id=s.run_id)
        self.pending: list[tuple[int, dict[str, Any]]] = []  # metrics of queued steps, on the device
        self.checked: list[tuple[int, dict[str, Any]]] = []  # fetched and passed by the non-finite policy, to log
        self.skipped, self.tokens, self.t0, self.elapsed = 0, 0.0, time.perf_counter(), 0.0
        self.row: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.lm = cfg.model.task == "causal_lm"
        b = p.built
        if s.step == 0:
            self.metrics.echo(f"{cfg.name}: {b.counts.trainable:,} trainable of {b.counts.total:,} params; "
                              f"{p.train.stats['examples']} examples -> {p.train.stats.get('rows', len(p.train))} rows "
                              f"({p.train.stats['truncated']} truncated"
                              + (f", {p.train.stats['dropped_examples']} longer than data.seq_len left out"
                                 if p.train.stats.get("dropped_examples") else "")
                              + (f", {'packed' if cfg.data.packing and cfg.train.objective == 'sft' else 'padded'} at "
                                 f"{packing_efficiency(p.train.stats):.1%} real tokens"
                                 if p.train.stats.get("row_tokens") else "")
                              + (f", {p.train.stats['skipped_rows']} bad rows left out by data.skip_bad_rows"
                                 if p.train.stats.get("skipped_rows") else "")
                              + (f"; each of {p.train.stats['shards']} hosts prepared its own slice"
                                 if "shards" in p.train.stats else "") + ")")
        if "shards" in p.train.stats:  # every host says what it read
            print(f"host {jax.process_index()} of {p.train.stats['shards']}: {p.train.stats['host_examples']} "
                  f"training examples -> {p.train.stats['host_rows']} rows", flush=True)
        if s.step:
            self.metrics.echo(f"{cfg.name}: resumed from step {s.step} ({saver.directory / str(s.step)})")
        for note in s.notes + self.metrics.notes:  # what the restore let through or set aside: shown and logged
            self.metrics.echo(note)
            self.metrics.write("event", s.step, {"message": note})
        self.metrics.write("config", s.step, {"config_sha256": config_digest(to_dict(cfg))})  # the config.json of now

    def train_step(self, step: int) -> int:
        """One optimizer step; the clock starts after the first (compiling) one. Returns the steps done."""
        local, host = self._grpo_batch(step) if self.grpo is not None else (self.batches.local(step), {})
        batch = _global_batch(local, self.t.grad_accum, self.fns)
        self.trainable, frozen, self.opt_state, m = self.fns.train(self.trainable, self.frozen, self.opt_state,
                                                                   batch, jnp.int32(step), self.key)
        m = dict(m, **host)
        self.frozen = self.frozen if frozen is None else frozen  # None: the variant leaves them as they were
        self.pending.append((step, m))
        if step == self.start:
            jax.block_until_ready(m)
            self.t0 = time.perf_counter()
        self._police(keep_last=True)  # the step before this one (done by now): the step just queued keeps running
        return step + 1

    def _grpo_batch(self, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """GRPO: this step's prompts, ``group_size`` sampled completions each with the current adapters, their
        rewards and advantages, as the update's rows; and the rollout's metrics."""
        s, p, accum = self.grpo, self.p, self.t.grad_accum
        prompts = self.batches.local(step)
        texts, rows = p.train.prompt_rows
        key = jax.random.fold_in(jax.random.fold_in(self.key, step), 0x5EED)  # a pure function of (seed, step)
        jax.block_until_ready(self.trainable)  # the last update done: the rollout's clock is the rollout's alone
        start = time.perf_counter()
        roll = rollout(p.built.model, lv.combine(self.trainable, self.frozen), p.tokenizer, prompts, texts, rows, s,
                       self.reward_fn, key, self.stops, self.cfg.data.seq_len)
        seconds = time.perf_counter() - start
        adv = np.asarray(lv.objectives.group_advantages(jnp.asarray(roll["reward"]), s.group_size, s.scale_rewards))
        b = len(adv)
        items = float((roll["loss_mask"][:, 1:] * roll["attention_mask"][:, 1:]).sum())
        local = {k: roll[k] for k in ("input_ids", "attention_mask", "loss_mask")}
        local |= {"advantages": adv.astype(np.float32), "share": np.full(b, 1.0 / accum, np.float32),
                  "num_items": np.full(b, items, np.float32)}
        host = group_stats(roll["reward"], s.group_size) | {
            "completion_length": float(roll["length"].mean()), "clipped_completions": float(roll["clipped"].mean()),
            "rollout_seconds": seconds}
        return local, host

    def _police(self, keep_last: bool = False) -> None:
        """The non-finite policy, every step: fetch the pending steps' metrics (all but the one just queued
        with ``keep_last``), count non-finite ones, and stop at the limit before anything is saved."""
        n = len(self.pending) - (1 if keep_last else 0)
        if n <= 0:
            return
        fetched, self.pending = jax.device_get(self.pending[:n]), self.pending[n:]
        for s, mm in fetched:
            self.checked.append((s, mm))
            if not bool(mm["finite"]):
                self._nonfinite(s, mm)

    def reshape(self, done: int) -> None:
        """The variant's one-time change of the tree (LoRA-drop's selection) when its step comes."""
        if done != _reshape_at(self.cfg) or self.keep is not None:
            return
        p = self.p
        self.keep, report = _reshape_choice(p, self.trainable, self.frozen, self.batches, self.fns, done)
        message = report.pop("message", None)
        self.metrics.write(self.variant.name, done, report)
        before = (self.trainable, self.frozen, self.opt_state)
        self.p = _reshaped(p, self.trainable, self.frozen, self.keep)
        self.trainable, self.frozen = self.p.built.trainable, self.p.built.frozen
        self.opt_state = _carry_state(self.p, *before, self.keep, done)
        self.fns = _steps(self.p)
        if message:
            self.metrics.echo(f"step {done}: {message}")

    def log(self, done: int, flush: bool = False) -> None:
        """Every ``log_every`` steps (and at the end or a stop): the pending steps' metrics, the non-finite
        policy, the variant's rank budget, the progress line."""
        t = self.t
        if not ((t.log_every and done % t.log_every == 0) or done == t.steps or flush):
            return
        self._police()
        self._write_rows()
        if self.variant.tracks_ranks:  # the rank budget as it shrinks
            ranks = active_ranks(self.trainable, self.opt_state)
            self.metrics.write("ranks", done, {"total": float(sum(int(v.sum()) for v in ranks.values())),
                                               "ranks": {k: v.tolist() for k, v in ranks.items()}})
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        unit = "tok/s" if self.lm else "ex/s"  # what the step counts: target tokens, or examples
        shown = {"loss": f"{self.row['loss']:.4f}", "lr": f"{self.row['lr']:.2e}", unit: f"{rate:,.1f}"}
        if "reward" in self.row:
            shown = {"reward": f"{self.row['reward']:.3f}"} | shown
        self.metrics.progress(done, shown)

    def _write_rows(self) -> None:
        """The checked steps' rows into the metrics."""
        for s, mm in self.checked:
            self.tokens += float(mm["tokens"]) if s > self.start else 0.0
            self.row = row = {k: float(v) for k, v in mm.items() if not k.startswith("finite")}
            row |= {name: float(fn(s)) for name, fn in self.groups.items()}
            if self.lm:
                row.pop("accuracy", None)
            self.metrics.write("train", s + 1, row)
        self.checked = []

    def _nonfinite(self, s: int, mm: dict[str, Any]) -> None:
        t = self.t
        self.skipped += 1
        self.metrics.echo(_nonfinite_message(s + 1, mm, self.trainable, self.skipped, t.max_nonfinite))
        if t.max_nonfinite is not None and self.skipped > t.max_nonfinite:
            self._write_rows()  # up to and including this step
            last = self.saver.latest()
            raise NonFinite(
                f"{self.skipped} steps with a non-finite loss or gradients, more than train.max_nonfinite="
                f"{t.max_nonfinite}; stopped at step {s + 1} without saving"
                + (f" (the last checkpoint, step {last}, is intact)" if last is not None else "")
                + "; lower optim.lr, set optim.clip_norm, or check the data")

    def evaluate(self, done: int) -> None:
        """Every ``eval_every`` steps (the last step's eval is ``finish``'s)."""
        t = self.t
        if self.p.eval is not None and t.eval_every and done % t.eval_every == 0 and done != t.steps:
            self.last_eval = evaluate_all(self.p, self.fns, self.trainable, self.frozen)
            self.metrics.write("eval", done, self.last_eval)
            self.metrics.echo(f"eval @ {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in self.last_eval.items()))

    def checkpoint(self, done: int, stop: list[int]) -> bool:
        """Every ``checkpoint_every`` steps; on a signal save and raise ``Interrupted``; at ``train.stop_at``
        save and return True (the loop ends there)."""
        t = self.t
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done != t.steps:
            self.save(done)
        if stop:
            self.save(done)
            raise Interrupted(stop[0], done)
        if t.stop_at is not None and done == t.stop_at and done != t.steps:
            self.save(done)
            self.metrics.echo(f"stopped at train.stop_at={done}; checkpoint saved, run again to resume")
            return True
        return False

    def save(self, step: int) -> None:
        """A checkpoint of this step (once): trainable and optimizer leaves, the key, the variant's extras."""
        self._police()  # a step past the non-finite limit stops the run before anything is saved
        if self.saver.latest() == step:
            return
        state = {"trainable": jax.tree.leaves(self.trainable), "opt_state": jax.tree.leaves(self.opt_state),
                 "key": np.asarray(jax.random.key_data(self.key))}
        if self.variant.extras is not None:
            state["extras"] = self.variant.extras(self.frozen)
        # Logged first: a kill during the save leaves a row past the last checkpoint, dropped on resume and redone.
        _weight_changes(self.metrics, self.cfg, step, self.trainable, self.frozen)
        self.saver.save(step, state, _meta(self.cfg, self.p, step, self.keep, self.run_id))

    def finish(self) -> None:
        """After the last step: the final eval, samples, the last checkpoint."""
        t = self.t
        self._police()
        self.elapsed = time.perf_counter() - self.t0
        if self.p.eval is not None:
            self.last_eval = evaluate_all(self.p, self.fns, self.trainable, self.frozen)
            self.metrics.write("eval", t.steps, self.last_eval)
        for i, s in enumerate(_samples(self.p, self.trainable, self.frozen)):
            self.metrics.echo(f"sample {i}: {s}")
            self.metrics.text("samples", t.steps, s)
        self.save(t.steps)

    def stopped(self, done: int) -> "Result":
        return Result({"stopped_at": done, "output_dir": str(self.out)}, self.trainable, self.frozen, self.opt_state,
                      self.p.built, self.p)

    def close(self) -> None:
        self.metrics.close()
        self.saver.close()

    def result(self) -> "Result":
        """The summary (and the variant's part of it), ``adapters.safetensors``, ``summary.json``, the report."""
        cfg, t, b, out = self.cfg, self.t, self.p.built, self.out
        summary = {
            "name": cfg.name, "variant": cfg.adapter.variant, "steps": t.steps, "resumed_from": self.start or None,
            "trainable_params": b.counts.trainable, "total_params": b.counts.total,
            "final_train_loss": self.row.get("loss"), "eval": self.last_eval, "skipped_steps": self.skipped,
            "seconds": self.elapsed, "seconds_per_step": self.elapsed / max(1, t.steps - self.start - 1),
            ("tokens_per_second" if self.lm else "examples_per_second"): self.tokens / max(self.elapsed, 1e-9),
            "data": dict(self.p.train.stats, packing_efficiency=packing_efficiency(self.p.train.stats)),
            "output_dir": str(out), "run_id": self.run_id,
            "config_sha256": config_digest(to_dict(cfg)),
        }
        summary |= self.variant.summary(self.opt_state)
        table = routes(cfg)
        if table is not None:  # eval's task<i>_* metrics are these adapters'
            summary["routes"] = [r.name for r in table]
        host = to_host(self.trainable)
        if self.lead:
            write_safetensors(out / "adapters.safetensors", dict(lv.leaves_with_paths(host)),
                              {"format": "lorax_variants", "meta": json.dumps(_meta(cfg, self.p, t.steps, self.keep, self.run_id))})
            write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
            if t.report:
                _report(out)
            print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}, indent=2), flush=True)
        return Result(summary, self.trainable, self.frozen, self.opt_state, b, self.p)


def _report(out: Path) -> None:
    """The figures and page; a drawing failure is reported, never the end of a finished run."""
    from train.report import report

    try:
        page = report(out)
        print(f"report: {page}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - the adapters are saved; a figure must not fail the run
        print(f"train: warning: the report could not be drawn ({type(e).__name__}: {e}); "
              f"retry with python -m train report {out} --debug", file=sys.stderr, flush=True)


def _weight_changes(metrics: Metrics, cfg: Config, step: int, trainable: Any, frozen: Any) -> None:
    """The DoRA paper's magnitude and direction change of every adapted weight (the report's scatter)."""
    if not recipe(cfg.adapter.variant).weight_changes:  # the base itself moves / no single merged weight
        return
    changes = magnitude_direction(lv.combine(trainable, frozen))
    if changes:
        metrics.write("weights", step, {"dM": {k: v[0].tolist() for k, v in changes.items()},
                                        "dD": {k: v[1].tolist() for k, v in changes.items()}})


def _carry_state(p: Prepared, trainable: Any, frozen: Any, opt_state: Any, keep: dict[str, np.ndarray],
                 step: int) -> Any:
    """The optimizer state after LoRA-drop's selection: the moments of what stays (kept layers' adapters,
    other trained leaves) carried over, the shared set's from the layer it starts from; a chain whose state
    does not follow the parameters that way starts afresh (its count, and so the schedule, goes on)."""
    carried = recipe(p.cfg.adapter.variant).reshape.carry(opt_state, trainable, frozen, keep, p.built.mask)
    if jax.tree.structure(carried) == jax.tree.structure(p.opt_abstract):
        return jax.device_put(carried, p.opt_sh)
    return _set_count(jax.jit(p.optimizer.init, out_shardings=p.opt_sh)(p.built.trainable), step)


def _set_count(opt_state: Any, step: int) -> Any:
    """Every ``count`` of an Optax state set to ``step`` (schedules continue after a re-init)."""
    def one(kp: Any, x: Any) -> Any:
        last = kp[-1] if kp else None
        if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "count":
            return jnp.full_like(x, step)
        return x

    return jax.tree_util.tree_map_with_path(one, opt_state)


@dataclasses.dataclass
class Result:
    summary: dict[str, Any]
    trainable: Any
    frozen: Any
    opt_state: Any
    built: Built
    prepared: Prepared | None = None  # the run's tokenizer and data (held-out prompts included)
