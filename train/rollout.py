"""GRPO's data and rollouts: prompts in, sampled completions, rewards and the rows of the update out.

Prompts come from ``data.prompt_field`` (text, tokenized as SFT's prompts; or conversations, rendered with the
chat template and its generation prompt). Each step takes ``train.batch_size / group_size`` prompts, samples
``group_size`` completions of each with the KV cache (``generate``, the current adapters, the run's sampling
settings, a key that is a pure function of the seed and the step, so a resumed run samples the same), scores
them with the user's reward function ``fn(prompt, completion, row) -> float`` (the prompt as text, the
completion decoded without special tokens, the data row as a dict), and lays out the update's rows right-padded:
prompt, then the completion up to and including its stop token (the loss mask), ``data.seq_len`` long.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from train.chat import apply_template, chat_template
from train.config import ConfigError, DataConfig, import_function

__all__ = ["reward_function", "encode_prompts", "rollout", "group_stats", "score_completion"]


def reward_function(spec: str) -> Any:
    """The function ``module:function`` names (``objective.grpo.reward``), or a named error."""
    if not spec:
        raise ConfigError("objective.grpo.reward: name the reward function as module:function (called with prompt, "
                          "completion, row; returning a number)")
    return import_function(spec, "objective.grpo.reward")


def _prompt_text(tokenizer: Any, value: Any, template: tuple[str, str] | None) -> tuple[str, list[int]]:
    if isinstance(value, str):
        return value, list(tokenizer(value)["input_ids"])
    text_t, name = template
    text = apply_template(tokenizer, [{"role": t["role"], "content": t["content"]} for t in value], text_t, name,
                          add_generation_prompt=True)
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(ds: Any, cfg: DataConfig, tokenizer: Any, source: str, pad: int, width: int,
                   split: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, int], list[str], list[dict]]:
    """Prompt rows ``[n, width]`` (right-padded ``input_ids``, ``attention_mask``, and ``index``: the row of
    ``ds``), the data stats, the prompts as text and the rows as dicts. A prompt longer than ``width`` (the row
    length less the completion's) loses its start (``data.truncation: cut``), is left out (``drop``) or refused
    (``error``); counted."""
    values = ds[cfg.prompt_field][:]
    template = None if all(isinstance(v, str) for v in values) else chat_template(tokenizer, cfg.chat_template)
    where = f"{split} of {source!r}" if split else repr(source)
    stats = {"examples": len(ds), "truncated": 0, "dropped_examples": 0, "truncated_tokens": 0}
    kept, texts, encoded = [], [], []
    for i, v in enumerate(values):
        text, ids = _prompt_text(tokenizer, v, template)
        if len(ids) > width:
            if cfg.truncation == "error":
                raise ConfigError(f"data.truncation=error: prompt {i + 1} of {where} has {len(ids)} tokens, more than "
                                  f"data.seq_len less objective.grpo.max_completion_length = {width}")
            if cfg.truncation == "drop":
                stats["dropped_examples"] += 1
                continue
            stats["truncated"] += 1
            stats["truncated_tokens"] += len(ids) - width
            ids = ids[-width:]
        kept.append(i)
        texts.append(text)
        encoded.append(ids)
    if not kept:
        raise ConfigError(f"data.seq_len: every prompt of {where} is longer than {width} tokens (data.seq_len less "
                          "objective.grpo.max_completion_length)")
    ids = np.full((len(kept), width), pad, np.int32)
    mask = np.zeros((len(kept), width), np.int32)
    for k, e in enumerate(encoded):
        ids[k, : len(e)], mask[k, : len(e)] = e, 1
    rows = ds.select(kept).to_list()
    stats["prompts"] = len(kept)
    return {"input_ids": ids, "attention_mask": mask, "index": np.arange(len(kept), dtype=np.int32)}, stats, texts, rows


def score_completion(fn: Any, spec: str, prompt: str, completion: str, row: dict) -> float:
    """The reward function's score of one completion; an exception or a non-number is an error naming it."""
    try:
        value = fn(prompt, completion, row)
    except Exception as e:  # noqa: BLE001 - the user's function: named, with what it was given
        raise ConfigError(f"objective.grpo.reward: {spec} raised {type(e).__name__}: {e} (on the completion "
                          f"{completion[:80]!r})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ConfigError(f"objective.grpo.reward: {spec} returned {value!r} for the completion {completion[:80]!r}; "
                          "it must return a finite number")
    return float(value)


def rollout(model: Any, tree: Any, tokenizer: Any, prompts: dict[str, np.ndarray], texts: list[str],
            rows: list[dict], settings: Any, fn: Any, key: Any, stops: list[int], seq_len: int) -> dict[str, Any]:
    """``group_size`` sampled completions of each prompt (``prompts``: this step's prompt rows), their rewards,
    and the update's rows ``[B, seq_len]``: ``input_ids``, ``attention_mask``, ``loss_mask`` (completion tokens,
    the stop token included), with each completion's ``reward``, ``length`` and whether it hit the length limit."""
    import jax

    g = settings.group_size
    ids = np.repeat(prompts["input_ids"], g, axis=0)
    mask = np.repeat(prompts["attention_mask"], g, axis=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = ids.shape[1]
    out = np.asarray(jax.device_get(model.generate(
        tree, ids, attention_mask=mask, max_new_tokens=settings.max_completion_length,
        temperature=settings.temperature, top_p=None if settings.top_p >= 1.0 else settings.top_p,
        top_k=settings.top_k, stop_tokens=stops, pad_token_id=pad, key=key)))
    b = len(ids)
    rows_ids = np.full((b, seq_len), pad, np.int32)
    rows_mask = np.zeros((b, seq_len), np.int32)
    rows_loss = np.zeros((b, seq_len), np.int32)
    rewards, lengths, clipped = np.zeros(b), np.zeros(b, np.int32), np.zeros(b, bool)
    stop_set = set(stops)
    for i in range(b):
        n_prompt = int(mask[i].sum())
        gen = out[i, width:].tolist()
        end = next((k + 1 for k, t in enumerate(gen) if t in stop_set), None)
        clipped[i] = end is None
        comp = gen[: end if end is not None else len(gen)]
        row = ids[i, :n_prompt].tolist() + comp
        rows_ids[i, : len(row)], rows_mask[i, : len(row)] = row, 1
        rows_loss[i, n_prompt: len(row)] = 1
        lengths[i] = len(comp)
        text = tokenizer.decode([t for t in comp if t not in stop_set], skip_special_tokens=True)
        j = int(prompts["index"][i // g])
        rewards[i] = score_completion(fn, settings.reward, texts[j], text, rows[j])
    return {"input_ids": rows_ids, "attention_mask": rows_mask, "loss_mask": rows_loss, "reward": rewards,
            "length": lengths, "clipped": clipped}


def group_stats(rewards: np.ndarray, g: int) -> dict[str, float]:
    """The reward's mean, its std over the batch and its mean std within groups (TRL's ``reward``,
    ``reward_std``, and the spread GRPO's advantages need: 0 where a group's completions all score the same),
    and the share of groups whose completions all score the same."""
    groups = rewards.reshape(-1, g)
    within = groups.std(axis=1, ddof=1)
    return {"reward": float(rewards.mean()), "reward_std": float(rewards.std(ddof=1)) if len(rewards) > 1 else 0.0,
            "reward_std_in_group": float(within.mean()), "flat_groups": float(np.mean(within == 0))}
