"""Preference pairs -> token rows: for each prompt, the chosen and the rejected completion, each as one padded
row ``[prompt tokens, completion tokens]`` whose loss flags cover the completion only (the tokens whose
log-probabilities the preference objectives sum).

Columns (``data.chosen_field``, ``data.rejected_field``, and ``data.prompt_field``):

Tokenized as TRL's ``DPOTrainer`` does, token for token (tested against it):

- strings: prompt + completion (+ the EOS token's text, ``data.add_eos``) tokenized as one text (the
  tokenizer's special tokens included); the completion is what follows the prompt's own token count. Where the
  boundary merges a prompt token with the completion's first (TRL warns), the pair is kept as TRL keeps it and
  counted (``prompt_merged`` in the data stats);
- conversations (lists of ``{role, content}`` turns; a completion may be one turn mapping): the prompt rendered
  with the chat template and its generation prompt, then prompt + completion rendered whole; the completion is
  what follows the prompt's tokens (its end-of-turn token included). Without a prompt column, chosen and
  rejected are whole conversations and their common leading turns are the prompt (TRL's ``extract_prompt``). A
  template that renders the prompt differently once a completion follows is refused, naming it.

Pairs are padded, one sequence per row, chosen at ``[:, 0]`` and rejected at ``[:, 1]`` (packing is for SFT).
A pair longer than ``data.seq_len`` is cut (``data.truncation: cut``: the prompt loses its first tokens, the turns
furthest from the replies, down to what the longer completion leaves but never below half the row, then the
completions lose their ends; counted), dropped (``drop``, counted) or refused (``error``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from train.chat import ROLES, apply_template, chat_template
from train.config import ConfigError, DataConfig

__all__ = ["check_pair", "encode_pairs"]


def _turns(value: Any) -> list[dict[str, str]] | None:
    """A conversation (or one turn) as a list of turns; ``None`` if it is not one."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str) for t in value):
        return None
    return [{"role": t["role"], "content": t["content"]} for t in value]


def check_pair(prompt: Any, chosen: Any, rejected: Any, with_prompt: bool) -> tuple[str, str] | None:
    """What is wrong with one pair (``None``: nothing): ``(the config field of the column at fault, what)``."""
    for field, v in (("data.chosen_field", chosen), ("data.rejected_field", rejected)):
        if isinstance(v, str):
            if not v.strip():
                return field, "an empty completion"
        elif _turns(v) is None:
            return field, f"{'null' if v is None else 'a ' + type(v).__name__} where text or turns belong"
        elif not any(t["content"].strip() for t in _turns(v)):
            return field, "a completion whose turns are empty"
    if isinstance(chosen, str) != isinstance(rejected, str):
        return "data.rejected_field", "turns where the chosen completion is text (or the other way round)"
    if with_prompt:
        if isinstance(chosen, str) and not isinstance(prompt, str):
            return "data.prompt_field", f"{'null' if prompt is None else 'a ' + type(prompt).__name__} where text belongs"
        if not isinstance(chosen, str) and not isinstance(prompt, str) and _turns(prompt) is None:
            return "data.prompt_field", "neither text nor turns"
    elif isinstance(chosen, str):
        return "data.prompt_field", "text completions without a prompt (name data.prompt_field)"
    return None


def _split_common(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> tuple[list, list, list]:
    """TRL's ``extract_prompt`` on turns: the leading turns both share are the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _chat_ids(tokenizer: Any, template: str, name: str, turns: list[dict[str, str]], **kw: Any) -> list[int]:
    return list(apply_template(tokenizer, turns, template, name, tokenize=True, return_dict=True, **kw)["input_ids"])


def _pair_tokens(tokenizer: Any, cfg: DataConfig, prompt: Any, chosen: Any, rejected: Any,
                 template: tuple[str, str] | None) -> tuple[int, list[int], list[int], bool]:
    """``(prompt length, prompt + chosen ids, prompt + rejected ids, whether a sequence's first tokens are not the
    prompt's)``, tokenized as TRL's ``DPOTrainer`` does: each whole sequence at once, the completion being what
    follows the prompt's own tokens."""
    if isinstance(chosen, str):
        eos = tokenizer.eos_token if cfg.add_eos else None
        p = list(tokenizer(prompt)["input_ids"])
        full = [list(tokenizer(prompt + (c + eos if eos and not c.endswith(eos) else c))["input_ids"])
                for c in (chosen, rejected)]
        return len(p), full[0], full[1], any(f[: len(p)] != p for f in full)
    text_t, name = template
    c, r = _turns(chosen), _turns(rejected)
    if prompt is None:
        p_turns, c, r = _split_common(c, r)
        if not p_turns or not c or not r:
            raise ConfigError("data.prompt_field: chosen and rejected share no leading turns to be the prompt (or one "
                              "is all prompt); name the prompt column")
    else:
        p_turns = _turns(prompt) or [{"role": "user", "content": prompt}]
    p = _chat_ids(tokenizer, text_t, name, p_turns, add_generation_prompt=True)
    full = [_chat_ids(tokenizer, text_t, name, p_turns + comp) for comp in (c, r)]
    if any(f[: len(p)] != p for f in full):
        raise ConfigError(f"data.chat_template: {name} renders the prompt differently once a completion follows, so "
                          "the completion's tokens cannot be told apart; give a template that does not "
                          "(data.chat_template: a file)")
    return len(p), full[0], full[1], False


def encode_pairs(ds: Any, cfg: DataConfig, tokenizer: Any, source: str, pad: int,
                 split: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, int], np.ndarray]:
    """Token rows ``[pairs, 2, seq_len]`` (``input_ids``, ``attention_mask``, ``loss_mask``), the data stats, and
    which rows of ``ds`` they are (pairs dropped by the truncation are not)."""
    T = cfg.seq_len
    template = chat_template(tokenizer, cfg.chat_template) if not isinstance(ds[0][cfg.chosen_field], str) else None
    prompts = ds[cfg.prompt_field][:] if cfg.prompt_field else [None] * len(ds)
    where = f"{split} of {source!r}" if split else repr(source)
    rows: list[tuple[list[int], list[int]]] = []
    kept: list[int] = []
    stats = {"examples": len(ds), "truncated": 0, "dropped_examples": 0, "truncated_tokens": 0, "prompt_merged": 0}
    for i, (p, c, r) in enumerate(zip(prompts, ds[cfg.chosen_field][:], ds[cfg.rejected_field][:])):
        try:
            n_prompt, *full, merged = _pair_tokens(tokenizer, cfg, p, c, r, template)
        except ConfigError as e:
            raise ConfigError(f"{e} (pair {i + 1} of {where})") from None
        stats["prompt_merged"] += int(merged)
        seqs = [(ids, [0] * n_prompt + [1] * (len(ids) - n_prompt)) for ids in full]
        longest = max(len(s[0]) for s in seqs)
        if longest > T:
            if cfg.truncation == "error":
                raise ConfigError(f"data.truncation=error: pair {i + 1} of {where} has a sequence of {longest} tokens, "
                                  f"more than data.seq_len={T}; raise data.seq_len, or set data.truncation to cut or "
                                  "drop")
            if cfg.truncation == "drop":
                stats["dropped_examples"] += 1
                continue
            # cut: the prompt loses its start (the turns furthest from the replies) down to what the longer
            # completion leaves, but keeps at least half the row; then the completions lose their ends
            keep = min(n_prompt, max(T - max(len(ids) - n_prompt for ids, _ in seqs), T // 2))
            cut = [(ids[n_prompt - keep:][:T], flags[n_prompt - keep:][:T]) for ids, flags in seqs]
            stats["truncated"] += 1
            stats["truncated_tokens"] += sum(max(0, len(ids) - T) for ids, _ in seqs)
            seqs = cut
        rows.append(tuple(seqs))
        kept.append(i)
    if not rows:
        raise ConfigError(f"data.truncation=drop: every pair of {where} is longer than data.seq_len={T}")
    n = len(rows)
    ids = np.full((n, 2, T), pad, np.int32)
    mask = np.zeros((n, 2, T), np.int32)
    loss = np.zeros((n, 2, T), np.int32)
    for k, pair in enumerate(rows):
        for side, (s_ids, s_flags) in enumerate(pair):
            m = len(s_ids)
            ids[k, side, :m], mask[k, side, :m], loss[k, side, :m] = s_ids, 1, s_flags
    stats["pairs"] = n
    stats["real_tokens"], stats["row_tokens"] = int(mask.sum()), int(mask.size)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}, stats, np.asarray(kept, np.int64)
