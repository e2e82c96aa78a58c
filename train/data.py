"""Examples from local files or a package's data (HF ``datasets``) -> token arrays -> batches.

Causal LM: each example (a text, a prompt and response, a conversation) becomes one document of tokens. With
``packing: true`` documents are placed whole into ``seq_len`` rows (first-fit decreasing), each row carrying
segment ids (which document a token belongs to; the model attends within a document and restarts positions
at each) and a loss mask that leaves out every document's first token; nothing is split or dropped, and an
example longer than ``seq_len`` is cut, dropped or refused (``data.truncation``). ``packing: false`` pads one
example per row; ``packing: stream`` joins every document into one stream cut into rows (continued
pretraining: tokens attend across document boundaries). Instruction data (``prompt_field`` + ``response_field``) masks
the prompt out of the loss. Sequence classification: one padded row per example plus its label.

Bad rows (a null or a number where text belongs, a null label) are refused naming the file, the row
and the field, or left out and counted (``skipped_rows`` in the data stats) with ``data.skip_bad_rows``.

Batches are deterministic: global row ``i`` of the stream is ``perm(epoch)[i % N]`` with the
permutation seeded by ``(data.seed, epoch)``, so the data position of a run is just its step;
each host materializes only its rows of every global batch.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.resources
import os
from pathlib import Path
from typing import Any

import numpy as np

from train.chat import chat_template, check_conversation, render
from train.config import ConfigError, DataConfig
from train.pairs import check_pair, encode_pairs
from train.rollout import encode_prompts

__all__ = ["TokenData", "resolve", "read_examples", "tokenize", "load_data", "Batches", "pack_lengths",
           "packing_efficiency"]

_EXT = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text"}


def resolve(source: str, field: str) -> Path:
    """A config path: ``pkg:<package>/<path>`` resolves inside an installed package."""
    if source.startswith("pkg:"):
        package, _, rest = source[4:].partition("/")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise ConfigError(f"{field}: package {package!r} is not installed (from {source!r})") from None
        path = Path(str(root)) / rest
        if not path.resolve().is_relative_to(Path(str(root)).resolve()):
            raise ConfigError(f"{field}: {source!r} points outside package {package!r}")
    else:
        path = Path(os.path.expanduser(source))
    return path


def _files(source: str, field: str) -> list[Path]:
    if not source:
        raise ConfigError(f"{field} is empty: name a data file, directory, glob or pkg:<package>/<path>")
    path = resolve(source, field)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        outside = [p.name for p in files if not p.resolve().is_relative_to(path.resolve())]
        if outside:  # a link out of the directory the config named: not followed
            raise ConfigError(f"{field}: {outside} in {path} link outside that directory; copy the files in instead")
    elif any(c in str(path) for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path)))
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise ConfigError(f"{field}: no data file at {source!r}")
    return files


def _format(files: list[Path], fmt: str, field: str) -> str:
    if fmt != "auto":
        return "json" if fmt == "jsonl" else fmt
    kinds = {_EXT.get(p.suffix.lower()) for p in files}
    if len(kinds) != 1 or None in kinds:
        raise ConfigError(f"{field}: cannot tell the format of {[p.name for p in files][:5]}; set data.format")
    return kinds.pop()


def _fasttext(files: list[Path], encoding: str) -> dict[str, list[str]]:
    texts, labels = [], []
    for f in files:
        for n, line in enumerate(f.read_bytes().decode(encoding).splitlines(), 1):
            if not line.strip():
                continue
            head, _, text = line.strip().partition(" ")
            if not head.startswith("__label__"):
                raise ConfigError(f"{f}:{n}: fasttext lines start with __label__<name>, got {line[:40]!r}")
            labels.append(head[len("__label__"):])
            texts.append(text.strip())
    return {"text": texts, "label": labels}


def _file_of_row(files: list[Path], fmt: str, cfg: DataConfig, row: int) -> tuple[Path, int]:
    """(the file, the row within it) of global row ``row`` (0-based) of ``files`` read in order."""
    import datasets

    if len(files) == 1:
        return files[0], row
    for f in files:
        if fmt == "fasttext":
            n = len(_fasttext([f], cfg.encoding)["text"])
        else:
            kwargs = {"encoding": cfg.encoding} if fmt in ("text", "csv") else {}
            n = len(datasets.load_dataset(fmt, data_files=[str(f)], split="train", **kwargs))
        if row < n:
            return f, row
        row -= n
    return files[-1], row


class _Said(str):
    """What is wrong with a value, said in words (a conversation's fault)."""


def _kind(value: Any) -> str:
    if isinstance(value, _Said):
        return str(value)
    return "null" if value is None else f"a {type(value).__name__} ({value!r:.40})"


def loss_on(cfg: DataConfig) -> str:
    """Which tokens the loss covers: ``data.loss_on``, or for ``auto`` what the data's kind implies."""
    if cfg.loss_on != "auto":
        return cfg.loss_on
    return "assistant" if cfg.messages_field else "completion" if cfg.prompt_field else "all"


def _values(ds: Any, column: str) -> list[Any]:
    """A column's values as a list, read in one batch (iterating ``ds[column]`` decodes row by row: ~100x slower)."""
    return ds[column][:]


def check_rows(ds: Any, cfg: DataConfig, task: str, source: str, field: str = "data.source") -> tuple[Any, int]:
    """``ds`` without its bad rows, and how many were left out: a text column (``data.text_field``, the prompt
    and response fields) must hold a string, a label or task column a value (not null). A bad row is an
    error naming the file, the row and the field, unless ``data.skip_bad_rows`` leaves such rows out."""
    wanted: list[tuple[str, str, bool]] = []  # (config field, column, must be a string)
    bad: dict[int, tuple[str, str, Any]] = {}
    if cfg.chosen_field:  # preference pairs: each pair checked whole
        cols = [("data.chosen_field", cfg.chosen_field), ("data.rejected_field", cfg.rejected_field)]
        cols += [("data.prompt_field", cfg.prompt_field)] if cfg.prompt_field else []
        _columns(ds, cols, source)
        columns = dict(cols)
        prompts = _values(ds, cfg.prompt_field) if cfg.prompt_field else [None] * len(ds)
        for i, (p, c, r) in enumerate(zip(prompts, _values(ds, cfg.chosen_field), _values(ds, cfg.rejected_field))):
            wrong = check_pair(p, c, r, cfg.prompt_field is not None)
            if wrong is not None:
                bad[i] = (wrong[0], columns.get(wrong[0], cfg.chosen_field), _Said(wrong[1]))
    elif task == "sequence_classification":
        wanted += [("data.text_field", cfg.text_field, True), ("data.label_field", cfg.label_field, False)]
    elif cfg.messages_field:
        wanted.append(("data.messages_field", cfg.messages_field, False))
    elif cfg.prompt_field and cfg.response_field is None:  # prompts alone (GRPO): text or turns
        if cfg.prompt_field in ds.column_names:
            for i, v in enumerate(_values(ds, cfg.prompt_field)):
                wrong = None if isinstance(v, str) and v.strip() else "an empty prompt" if isinstance(v, str) else \
                    check_conversation(v, False)
                if wrong is not None:
                    bad[i] = ("data.prompt_field", cfg.prompt_field, _Said(wrong))
    elif cfg.prompt_field:
        wanted += [("data.prompt_field", cfg.prompt_field, True), ("data.response_field", cfg.response_field, True)]
    else:
        wanted.append(("data.text_field", cfg.text_field, True))
    if cfg.task_field:
        wanted.append(("data.task_field", cfg.task_field, False))
    dropped = {str(x) for x in cfg.drop_labels or []}  # rows data.drop_labels leaves out are not checked
    labels = _values(ds, cfg.label_field) if dropped and cfg.label_field in ds.column_names else None
    for what, column, text in wanted:
        if column not in ds.column_names:
            continue  # named by the tokenizer's column check
        for i, v in enumerate(_values(ds, column)):
            if what == "data.messages_field":
                wrong = check_conversation(v, loss_on(cfg) == "assistant")
                if wrong is not None and i not in bad:
                    bad[i] = (what, column, _Said(wrong))
            elif (v is None or (text and not isinstance(v, str))) and i not in bad and (
                    labels is None or str(labels[i]) not in dropped):
                bad[i] = (what, column, v)
    if not bad:
        return ds, 0
    if not cfg.skip_bad_rows:
        first = min(bad)
        what, column, v = bad[first]
        files = _files(source, field)
        path, row = _file_of_row(files, _format(files, cfg.format, field), cfg, first)
        raise ConfigError(f"{what}: row {row + 1} of {path} has {_kind(v)} in column {column!r}"
                          + ("" if column in (cfg.label_field, cfg.task_field, cfg.messages_field) or isinstance(v, _Said)
                             else ", not text")
                          + f" ({len(bad)} such row{'s' if len(bad) > 1 else ''} in {source!r}); fix the data, or set "
                          "data.skip_bad_rows: true to leave such rows out (counted in the data stats)")
    kept = ds.select([i for i in range(len(ds)) if i not in bad])
    if len(kept) == 0:
        raise ConfigError(f"{field}: every row of {source!r} is bad (e.g. {_kind(bad[min(bad)][2])} in column "
                          f"{bad[min(bad)][1]!r}); data.skip_bad_rows leaves nothing to train on")
    return kept, len(bad)


def read_examples(cfg: DataConfig, source: str, field: str = "data.source") -> Any:
    """A ``datasets.Dataset`` of the raw examples at ``source``."""
    import datasets

    files = _files(source, field)
    if all(p.stat().st_size == 0 for p in files):
        raise ConfigError(f"{field}: {source!r} is empty (0 bytes)")
    fmt = _format(files, cfg.format, field)
    if fmt == "fasttext":
        ds = datasets.Dataset.from_dict(_fasttext(files, cfg.encoding))
    else:
        kwargs = {"encoding": cfg.encoding} if fmt in ("text", "csv") else {}
        try:
            ds = datasets.load_dataset(fmt, data_files=[str(p) for p in files], split="train", **kwargs)
        except Exception as e:  # datasets wraps parse errors in many types
            if "corresponds to no data" in str(e):
                raise ConfigError(f"{field}: dataset {source!r} is empty") from None
            raise ConfigError(f"{field}: could not read {source!r} as {fmt}: {type(e).__name__}: {e}") from None
    if len(ds) == 0:
        raise ConfigError(f"{field}: dataset {source!r} is empty")
    return ds


@dataclasses.dataclass
class TokenData:
    """Token rows: ``input_ids``, ``attention_mask`` and ``loss_mask`` (LM) or ``labels`` (classification)."""

    arrays: dict[str, np.ndarray]
    stats: dict[str, int]
    # held-out chat or prompt/response examples for a generation eval: {"ids", "prompt", "reference"}
    prompts: list[dict[str, Any]] | None = None
    rows: np.ndarray | None = None  # which examples the rows are, where some were left out (preference pairs)
    prompt_rows: tuple[list[str], list[dict]] | None = None  # GRPO: each prompt as text, and its data row

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])


def _columns(ds: Any, wanted: list[tuple[str, str]], source: str) -> None:
    for field, name in wanted:
        if name not in ds.column_names:
            hint = ("; conversations (lists of {role, content} turns) are read with data.messages_field"
                    if field == "data.text_field" and any(c in ds.column_names for c in ("messages", "conversations"))
                    else "")
            raise ConfigError(f"{field}: column {name!r} is not in {source!r}; its columns: {ds.column_names}{hint}")


def _pad_id(tokenizer: Any) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def task_ids(ds: Any, cfg: DataConfig, source: str, index: dict[str, int] | None = None) -> np.ndarray:
    """Multi-task routing: one task index per example, from ``data.task_field`` (``index``: label -> adapter, for
    many adapters each naming its task label)."""
    _columns(ds, [("data.task_field", cfg.task_field)], source)
    raw = _values(ds, cfg.task_field)
    if index is not None:
        bad = sorted({str(v) for v in raw} - set(index))
        if bad:
            raise ConfigError(f"data.task_field: rows of {source!r} labelled {bad[:5]} go to no adapter; the adapters' "
                              f"task labels (adapter.many.adapters[].task) are {sorted(index)}")
        return np.array([index[str(v)] for v in raw], np.int32)
    if cfg.tasks:
        index = {n: i for i, n in enumerate(cfg.tasks)}
        bad = sorted({str(v) for v in raw} - set(index))
        if bad:
            raise ConfigError(f"data.task_field: tasks {bad[:5]} in {source!r} are not in data.tasks {cfg.tasks}")
        return np.array([index[str(v)] for v in raw], np.int32)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in raw):
        raise ConfigError(f"data.task_field: column {cfg.task_field!r} holds names, not task indices; list them "
                          "in data.tasks")
    return np.array(raw, np.int32)


def tokenize(ds: Any, cfg: DataConfig, task: str, tokenizer: Any, source: str,
             label_names: list[str] | None = None, split: str | None = None,
             index: dict[str, int] | None = None, prompt_width: int | None = None) -> tuple[TokenData, list[str] | None]:
    """Token rows for ``task`` (``causal_lm`` or ``sequence_classification``).

    ``split`` says which part of the data this is, for errors (``"the eval split (...)"``)."""
    if prompt_width is not None:  # prompts only (GRPO samples the completions)
        _columns(ds, [("data.prompt_field", cfg.prompt_field)], source)
        arrays, stats, texts, rows = encode_prompts(ds, cfg, tokenizer, source, _pad_id(tokenizer), prompt_width, split)
        return TokenData(arrays, stats, prompt_rows=(texts, rows)), None
    data, names = _tokenize(ds, cfg, task, tokenizer, source, label_names, split)
    if cfg.task_field is not None:
        ids = task_ids(ds, cfg, source, index)
        data.arrays["task_ids"] = ids if data.rows is None else ids[data.rows]
    return data, names


def _label_names(raw: list[Any], cfg: DataConfig) -> list[str]:
    if cfg.labels:
        return list(cfg.labels)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
        return [str(i) for i in range(max(raw) + 1)]
    return sorted({str(v) for v in raw}, key=lambda s: (len(s), s))


def label_names(ds: Any, cfg: DataConfig, source: str) -> list[str]:
    """The class names of ``ds``'s labels, in label-index order (``data.labels``, or the integers up to the
    largest, or the sorted names)."""
    _columns(ds, [("data.label_field", cfg.label_field)], source)
    return _label_names(_values(ds, cfg.label_field), cfg)


def _tokenize(ds: Any, cfg: DataConfig, task: str, tokenizer: Any, source: str,
              label_names: list[str] | None, split: str | None = None) -> tuple[TokenData, list[str] | None]:
    T, pad = cfg.seq_len, _pad_id(tokenizer)
    stats = {"examples": len(ds), "truncated": 0}
    if task == "sequence_classification":
        _columns(ds, [("data.text_field", cfg.text_field), ("data.label_field", cfg.label_field)], source)
        raw = _values(ds, cfg.label_field)
        names = label_names or _label_names(raw, cfg)
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(v) for v in raw} - set(index))
        if unknown:
            raise ConfigError(f"data.label_field: labels {unknown[:5]} in {source!r} are not in data.labels {names}")
        enc = tokenizer(_values(ds, cfg.text_field), truncation=False)["input_ids"]
        ids = np.full((len(enc), T), pad, np.int32)
        mask = np.zeros((len(enc), T), np.int32)
        for i, e in enumerate(enc):
            if len(e) > T:
                stats["truncated"] += 1
                e = e[: T - 1] + e[-1:]  # keep the closing special token ([SEP])
            ids[i, : len(e)], mask[i, : len(e)] = e, 1
        labels = np.array([index[str(v)] for v in raw], np.int32)
        return TokenData({"input_ids": ids, "attention_mask": mask, "labels": labels}, stats), names
    if cfg.chosen_field:
        arrays, pair_stats, kept = encode_pairs(ds, cfg, tokenizer, source, pad, split)
        return TokenData(arrays, stats | pair_stats, rows=kept), None
    if cfg.messages_field:
        _columns(ds, [("data.messages_field", cfg.messages_field)], source)
    elif cfg.prompt_field:
        _columns(ds, [("data.prompt_field", cfg.prompt_field), ("data.response_field", cfg.response_field)], source)
    else:
        _columns(ds, [("data.text_field", cfg.text_field)], source)
    ids, loss, lengths = encode(ds, cfg, tokenizer, source, split)
    return _rows(ids, loss, lengths, cfg, pad, source, split), None


def _tokenizer_digest(tokenizer: Any) -> str:
    """What identifies a tokenizer's output: its vocabulary and rules, special tokens and chat template."""
    import hashlib

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.all_special_tokens, tokenizer.eos_token_id,
                   getattr(tokenizer, "chat_template", None), getattr(tokenizer, "add_bos_token", None))).encode())
    return h.hexdigest()


def encode(ds: Any, cfg: DataConfig, tokenizer: Any, source: str,
           split: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every causal LM example's tokens and loss flags, as flat arrays ``(ids int32, loss int8, lengths)``.

    Through ``datasets.map`` (batched, 1,000 examples at a time): no Python list of all token ids is ever held,
    and where the examples come from files the result is cached on disk by ``datasets`` under a fingerprint of
    the examples, the tokenizer and the data settings, so the next run with the same ones reads it back."""
    import hashlib
    import json

    import pyarrow as pa

    how = loss_on(cfg)
    eos = tokenizer.eos_token_id
    template = name = None
    if cfg.messages_field:
        template, name = chat_template(tokenizer, cfg.chat_template)
    what = _where(source, split)

    def batch_fn(batch: dict[str, list[Any]], index: list[int]) -> dict[str, list[list[int]]]:
        out_ids, out_loss = [], []
        if cfg.messages_field:
            for i, turns in zip(index, batch[cfg.messages_field]):
                try:
                    ids, loss = render(tokenizer, turns, template, name, how)
                except ConfigError as e:
                    raise ConfigError(f"{e} (conversation {i + 1} of {what})") from None
                out_ids.append(ids)
                out_loss.append(loss)
            return {"ids": out_ids, "loss": out_loss}
        if cfg.prompt_field:
            prompts = tokenizer(batch[cfg.prompt_field])["input_ids"]
            responses = tokenizer(batch[cfg.response_field], add_special_tokens=False)["input_ids"]
            pieces = list(zip(prompts, responses))
        else:
            pieces = [(e, None) for e in tokenizer(batch[cfg.text_field])["input_ids"]]
        for prompt, response in pieces:
            ids = list(prompt) + list(response or [])
            loss = ([0] * len(prompt) + [1] * len(response) if response is not None and how == "completion"
                    else [1] * len(ids))
            if cfg.add_eos and eos is not None and (not ids or ids[-1] != eos):
                ids, loss = ids + [eos], loss + [1]
            out_ids.append(ids)
            out_loss.append(loss)
        return {"ids": out_ids, "loss": out_loss}

    settings = {k: getattr(cfg, k) for k in ("text_field", "prompt_field", "response_field", "messages_field",
                                             "add_eos")}
    key = json.dumps([ds._fingerprint, _tokenizer_digest(tokenizer), settings, how, template], sort_keys=True)
    import datasets

    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32")),
                                  "loss": datasets.Sequence(datasets.Value("int8"))})
    mapped = ds.map(batch_fn, batched=True, batch_size=1000, with_indices=True, remove_columns=ds.column_names,
                    features=features, new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
                    desc="tokenizing")
    ids_col = pa.concat_arrays(mapped.data.column("ids").chunks) if len(mapped) else pa.array([], pa.list_(pa.int32()))
    loss_col = pa.concat_arrays(mapped.data.column("loss").chunks) if len(mapped) else pa.array([], pa.list_(pa.int8()))
    lengths = ids_col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    flat_ids = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    flat_loss = loss_col.flatten().to_numpy(zero_copy_only=False).astype(np.int8, copy=False)
    return flat_ids, flat_loss, lengths


def _rows(flat_ids: np.ndarray, flat_loss: np.ndarray, lengths: np.ndarray, cfg: DataConfig, pad: int, source: str,
          split: str | None) -> TokenData:
    """Token rows of examples (flat ids and loss flags, each example's length): packed whole with segment ids
    (``packing: true``), one padded example per row (``false``), or one stream cut into rows (``stream``)."""
    T = cfg.seq_len
    stats = {"examples": len(lengths), "truncated": 0}
    if cfg.packing == "stream":  # continued pretraining: documents attend across their boundaries
        n = len(flat_ids) // T
        if n == 0:
            what = _where(source, split)
            raise ConfigError(f"data.seq_len={T}: {what} has only {len(flat_ids)} tokens, less than one packed "
                              f"sequence" + (f"; {_FIX_EVAL}" if split and "eval" in split else ""))
        stats["dropped_tokens"] = len(flat_ids) - n * T
        stats["real_tokens"] = stats["row_tokens"] = n * T
        ids = flat_ids[: n * T].reshape(n, T).astype(np.int32)
        loss = flat_loss[: n * T].reshape(n, T).astype(np.int32)
        return TokenData({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss}, stats)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    long = np.flatnonzero(lengths > T)
    if len(long) and cfg.truncation == "error":
        i = int(long[0])
        what = _where(source, split)
        raise ConfigError(f"data.truncation=error: example {i + 1} of {what} has {int(lengths[i])} tokens, more "
                          f"than data.seq_len={T} ({len(long)} such example{'s' if len(long) > 1 else ''}); raise "
                          f"data.seq_len, or set data.truncation to cut (keep its first {T} tokens) or drop (leave "
                          "such examples out); both are counted in the data stats")
    keep = np.ones(len(lengths), bool)
    if cfg.truncation == "drop":
        keep[long] = False
        stats["dropped_examples"], stats["truncated_tokens"] = int(len(long)), 0
    else:
        stats["truncated"] = int(len(long))
        stats["dropped_examples"], stats["truncated_tokens"] = 0, int(np.sum(lengths[long] - T))
    kept = np.flatnonzero(keep)
    if not len(kept):
        what = _where(source, split)
        raise ConfigError(f"data.truncation=drop: every example of {what} is longer than data.seq_len={T}")
    used = np.minimum(lengths[kept], T)
    groups = pack_lengths(used, T) if cfg.packing else [[i] for i in range(len(kept))]
    n = len(groups)
    ids = np.full((n, T), pad, np.int32)
    mask = np.zeros((n, T), np.int32)
    loss = np.zeros((n, T), np.int32)
    seg = np.zeros((n, T), np.int32)
    for r, group in enumerate(groups):
        at = 0
        for k, j in enumerate(group):
            i, m = int(kept[j]), int(used[j])
            a = int(starts[i])
            ids[r, at:at + m] = flat_ids[a:a + m]
            loss[r, at:at + m] = flat_loss[a:a + m]
            mask[r, at:at + m], seg[r, at:at + m] = 1, k + 1
            loss[r, at] = 0  # a document's first token is no target: nothing of this document comes before it
            at += m
    stats["real_tokens"], stats["row_tokens"] = int(used.sum()), n * T
    arrays = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}
    if cfg.packing:
        arrays["segment_ids"] = seg
    return TokenData(arrays, stats)


def _where(source: str, split: str | None) -> str:
    """The data an error is about: the split of ``source`` it was in, or ``source``."""
    return f"{split} of {source!r}" if split else repr(source)


def packing_efficiency(stats: dict[str, int]) -> float | None:
    """Real tokens / row tokens of causal LM rows (1.0: no padding), ``None`` for other data."""
    return stats["real_tokens"] / stats["row_tokens"] if stats.get("row_tokens") else None


def pack_lengths(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """First-fit decreasing: the examples (by index) of each row, longest first, each example placed whole in
    the first row with room for it (rows in the order they were opened; O(n log n) with a max-tree of the
    rows' free room). Every length must be at most ``capacity``."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [capacity] * (2 * size)  # leaves: each row's free room (rows not opened yet: all of it)
    rows: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        node = 1
        while node < size:  # the leftmost row with room: descend to the left child whenever it has room
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def _drop_labels(ds: Any, cfg: DataConfig, source: str) -> Any:
    """``ds`` without the rows whose label is in ``data.drop_labels``."""
    if not cfg.drop_labels:
        return ds
    _columns(ds, [("data.label_field", cfg.label_field)], source)
    drop = {str(x) for x in cfg.drop_labels}
    kept = ds.filter(lambda row: str(row[cfg.label_field]) not in drop)
    if len(kept) == 0:
        raise ConfigError(f"data.drop_labels={cfg.drop_labels} leaves no rows of {source!r}")
    return kept


_FIX_EVAL = ("raise data.eval_fraction, name a longer held-out file in data.eval_source, or lower data.seq_len "
             "(or set data.eval_fraction: 0 to train without eval)")


def load_data(cfg: DataConfig, task: str, tokenizer: Any, *, field: str = "data.source",
              index: dict[str, int] | None = None, shard: tuple[int, int] = (0, 1),
              prompt_width: int | None = None) -> tuple[TokenData, TokenData | None, list[str] | None]:
    """``(train, eval or None, label names)``; the eval split is fixed by ``data.seed``. ``field``: the config
    field that named ``cfg.source`` (for errors); ``index``: task label -> adapter (many adapters); ``shard``:
    ``(i, n)``: only the ``i``-th of ``n`` contiguous slices of the training examples is tokenized and packed
    (a host's share; the raw file is memory-mapped Arrow, the eval split stays whole). The train split's
    ``stats`` are its slice's, with ``shard`` recorded. ``prompt_width``: prompts only, up to that many tokens
    (GRPO)."""
    ds, skipped = check_rows(read_examples(cfg, cfg.source, field), cfg, task, cfg.source, field)
    ds = _drop_labels(ds, cfg, cfg.source)
    if cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    eval_ds, splits = None, (None, None)
    skipped_eval = 0
    if cfg.eval_source:
        eval_ds, skipped_eval = check_rows(read_examples(cfg, cfg.eval_source, "data.eval_source"), cfg, task,
                                           cfg.eval_source, "data.eval_source")
        eval_ds = _drop_labels(eval_ds, cfg, cfg.eval_source)
        splits = (None, "the eval data (data.eval_source)")
    elif cfg.eval_fraction > 0:
        order = np.random.default_rng(cfg.seed).permutation(len(ds))
        n, k = len(ds), max(1, int(round(cfg.eval_fraction * len(ds))))
        if k >= n:
            raise ConfigError(f"data.eval_fraction={cfg.eval_fraction} leaves no training examples of {n}")
        # Python ints: datasets fingerprints the index list by pickling it, and numpy scalars pickle ~1,000x slower
        eval_ds, ds = ds.select(sorted(order[:k].tolist())), ds.select(sorted(order[k:].tolist()))
        splits = (f"the training split ({n - k} of {n} examples)",
                  f"the eval split ({k} of {n} examples, held out by data.eval_fraction={cfg.eval_fraction})")
    names = None
    if shard[1] > 1:
        if task == "sequence_classification":  # every host's label index from all the labels
            names = label_names(ds, cfg, cfg.source)
        if len(ds) < shard[1]:
            raise ConfigError(f"{field}: {len(ds)} training examples in {cfg.source!r} cannot be shared by "
                              f"{shard[1]} hosts (data.host_shards: false gives every host all of them)")
        ds = ds.shard(num_shards=shard[1], index=shard[0], contiguous=True)
    train, names = tokenize(ds, cfg, task, tokenizer, cfg.source, names, split=splits[0], index=index,
                            prompt_width=prompt_width)
    if shard[1] > 1:
        train.stats["shard"], train.stats["shards"] = shard
    train.stats["skipped_rows"] = skipped  # bad rows of data.source left out (data.skip_bad_rows), before any split
    held = tokenize(eval_ds, cfg, task, tokenizer, cfg.eval_source or cfg.source, names,
                    split=splits[1], index=index, prompt_width=prompt_width)[0] if eval_ds is not None else None
    if held is not None:
        held.stats["skipped_rows"] = skipped_eval
        if task == "causal_lm" and (cfg.messages_field or cfg.prompt_field) and not cfg.chosen_field and \
                prompt_width is None:
            held.prompts = prompts(eval_ds, cfg, tokenizer, cfg.eval_source or cfg.source)
    return train, held, names


def prompts(ds: Any, cfg: DataConfig, tokenizer: Any, source: str) -> list[dict[str, Any]]:
    """What a generation eval asks and expects: for a conversation, the turns before its last assistant turn
    (rendered with the generation prompt) and that turn's text; for a prompt/response pair, the prompt's tokens
    (as in training) and the response."""
    out = []
    if cfg.messages_field:
        template, name = chat_template(tokenizer, cfg.chat_template)
        for turns in _values(ds, cfg.messages_field):
            last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
            if last is None:
                continue
            context = [{"role": t["role"], "content": t["content"]} for t in turns[:last]]
            text = tokenizer.apply_chat_template(context, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
            out.append({"ids": tokenizer(text, add_special_tokens=False)["input_ids"], "prompt": text,
                        "reference": turns[last]["content"], "context": context})
        return out
    for prompt, response in zip(_values(ds, cfg.prompt_field), _values(ds, cfg.response_field)):
        out.append({"ids": tokenizer(prompt)["input_ids"], "prompt": prompt, "reference": response})
    return out


def load_routed(cfg: DataConfig, task: str, tokenizer: Any, routes: list[Any],
                shard: tuple[int, int] = (0, 1)) -> tuple[TokenData, TokenData | None, list[str] | None]:
    """Rows for many adapters (``routes``: name, task label or source, in adapter order): the rows of
    ``data.source`` whose ``data.task_field`` is an adapter's label, and every row of an adapter's own source
    (split for eval by ``data.eval_fraction`` each); ``task_ids`` holds each row's adapter."""
    labelled = {r.task: i for i, r in enumerate(routes) if r.task is not None}
    parts: list[tuple[TokenData, TokenData | None]] = []
    names = cfg.labels
    if labelled:
        train, held, names = load_data(cfg, task, tokenizer, index=labelled, shard=shard)
        parts.append((train, held))
    for i, r in enumerate(routes):
        if r.source is None:
            continue
        if task == "sequence_classification" and not cfg.labels and len(routes) > 1:
            raise ConfigError("data.labels: with adapters reading their own sources, list the class names so that "
                              "every source's labels mean the same classes")
        own = dataclasses.replace(cfg, source=r.source, task_field=None, tasks=None, eval_source=None)
        train, held, names = load_data(own, task, tokenizer, field=f"adapter.many.adapters[{i}].source", shard=shard)
        for data in (train, held):
            if data is not None:
                data.arrays["task_ids"] = np.full(len(data), i, np.int32)
        parts.append((train, held))
    train = _concat([p[0] for p in parts])
    evals = [p[1] for p in parts if p[1] is not None]
    return train, _concat(evals) if evals else None, names


def _concat(parts: list[TokenData]) -> TokenData:
    keys = set(parts[0].arrays)
    arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in keys}
    stats = {k: sum(p.stats.get(k, 0) for p in parts) for k in dict.fromkeys(k for p in parts for k in p.stats)}
    return TokenData(arrays, stats)


class Batches:
    """Deterministic batches; ``local(step)`` is this host's share of batch ``step``.

    With ``data`` the whole training set (``sharded=False``), every host walks one permutation of it per epoch
    and takes its slice of each global batch: the batches of one process. With ``data`` this host's own shard
    of it (``sharded=True``, several processes), each host walks its own permutation of its rows and supplies
    ``batch_size / process_count`` rows of every batch."""

    def __init__(self, data: TokenData, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                 sharded: bool = False):
        if batch_size % process_count:
            raise ConfigError(f"train.batch_size={batch_size} must be divisible by the {process_count} processes")
        self.data, self.batch_size = data, batch_size
        self.seed = [seed, process_index] if sharded and process_count > 1 else [seed]
        if sharded:  # this host's rows only: its part of every batch, consecutive in its own order
            self.stride, self.lo, self.hi = batch_size // process_count, 0, batch_size // process_count
        else:
            self.stride = batch_size
            self.lo = process_index * batch_size // process_count
            self.hi = (process_index + 1) * batch_size // process_count
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            seed = [self.seed[0], epoch, *self.seed[1:]]
            self._perms = {epoch: np.random.default_rng(seed).permutation(len(self.data))}
        return self._perms[epoch]

    def rows(self, step: int) -> np.ndarray:
        n = len(self.data)
        stream = np.arange(step * self.stride + self.lo, step * self.stride + self.hi)
        return np.array([self._perm(int(i // n))[i % n] for i in stream], np.int64)

    def local(self, step: int) -> dict[str, np.ndarray]:
        rows = self.rows(step)
        return {k: v[rows] for k, v in self.data.arrays.items()}

    def epoch_of(self, step: int) -> float:
        return step * self.stride / len(self.data)


def eval_batches(data: TokenData, batch_size: int, limit: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Sequential eval batches (the last padded with rows that count for nothing), this host's share."""
    n = min(len(data), limit * batch_size) if limit else len(data)
    lo, hi = process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count
    out = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        real = idx < n
        idx = np.where(real, idx, 0)[lo:hi]
        batch = {k: v[idx].copy() for k, v in data.arrays.items()}
        ok = real[lo:hi]
        if "labels" in batch:
            batch["labels"] = np.where(ok, batch["labels"], -1).astype(np.int32)
        else:
            m = batch["loss_mask"]
            batch["loss_mask"] = m * ok.reshape(-1, *[1] * (m.ndim - 1)).astype(np.int32)
        out.append(batch)
    return out
