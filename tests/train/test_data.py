"""Data: files of every format, packing, prompt masking, labels, deterministic host shares, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from train.config import ConfigError, DataConfig
from train.data import Batches, eval_batches, load_data, pack_lengths, read_examples, tokenize


@pytest.fixture(scope="module")
def tok(assets):
    return transformers.AutoTokenizer.from_pretrained(str(assets["llama"]), local_files_only=True)


@pytest.fixture(scope="module")
def bert_tok(assets):
    return transformers.AutoTokenizer.from_pretrained(str(assets["bert"]), local_files_only=True)


def _write(tmp_path, fmt: str, rows: list[dict]):
    import pandas as pd

    path = tmp_path / f"data.{fmt}"
    df = pd.DataFrame(rows)
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "txt":
        path.write_text("\n".join(r["text"] for r in rows) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "txt"])
def test_every_file_format_reads_the_same_texts(tmp_path, fmt):
    rows = [{"text": f"the cat sat {i}"} for i in range(5)]
    ds = read_examples(DataConfig(), str(_write(tmp_path, fmt, rows)))
    assert list(ds["text"]) == [r["text"] for r in rows]


def test_fasttext_from_a_package_file_with_encoding():
    cfg = DataConfig(format="fasttext", encoding="cp1252")
    ds = read_examples(cfg, "pkg:gensim/test/test_data/pang_lee_polarity.cor")
    assert len(ds) == 200 and sorted(set(ds["label"])) == ["neg", "pos"]
    assert sum(1 for x in ds["label"] if x == "pos") == 100


def test_stream_packing_concatenates_with_eos_and_cuts_rows(tok):
    import datasets

    texts = ["the cat sat", "the dog ran on the mat"]
    ds = datasets.Dataset.from_dict({"text": texts})
    data, _ = tokenize(ds, DataConfig(seq_len=4, packing="stream"), "causal_lm", tok, "mem")
    stream = [t for text in texts for t in tok(text)["input_ids"] + [tok.eos_token_id]]
    n = len(stream) // 4
    np.testing.assert_array_equal(data.arrays["input_ids"].reshape(-1), stream[: n * 4])
    assert data.arrays["loss_mask"].all() and data.stats["dropped_tokens"] == len(stream) - 4 * n


def _first_fit_decreasing(lengths, capacity):
    """The textbook algorithm, quadratic: each item, longest first (ties by index), into the first open bin with
    room, else a new bin."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, r in enumerate(room):
            if r >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@pytest.mark.parametrize("seed", range(4))
def test_pack_lengths_is_first_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    cap = int(rng.integers(8, 64))
    lengths = rng.integers(1, cap + 1, int(rng.integers(1, 300))).tolist()
    assert pack_lengths(np.array(lengths), cap) == _first_fit_decreasing(lengths, cap)


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "the cat dog sat ran on mat a big small red".split()
    return [{"q": " ".join(rng.choice(words, int(rng.integers(1, 6)))),
             "a": " ".join(rng.choice(words, int(rng.integers(1, 9))))} for _ in range(n)]


def test_packing_places_whole_examples_apart_and_keeps_every_loss_token(tok):
    """48 prompt/response pairs: packed rows hold every example whole (segment ids 1, 2, ... per row), the
    loss counts exactly the padded rows' targets, and packing needs fewer rows."""
    import datasets

    ds = datasets.Dataset.from_dict({k: [r[k] for r in _pairs(48)] for k in ("q", "a")})
    packed, _ = tokenize(ds, DataConfig(prompt_field="q", response_field="a", seq_len=32), "causal_lm", tok, "m")
    padded, _ = tokenize(ds, DataConfig(prompt_field="q", response_field="a", seq_len=32, packing=False),
                         "causal_lm", tok, "m")
    pa, pd_ = packed.arrays, padded.arrays
    docs = sorted(tuple(row[:int(m.sum())]) for row, m in zip(pd_["input_ids"], pd_["attention_mask"]))
    found = []
    for ids, seg, loss in zip(pa["input_ids"], pa["segment_ids"], pa["loss_mask"]):
        n_seg = int(seg.max())
        assert sorted(set(seg.tolist()) - {0}) == list(range(1, n_seg + 1))
        for k in range(1, n_seg + 1):
            where = np.nonzero(seg == k)[0]
            assert (np.diff(where) == 1).all()  # contiguous
            found.append(tuple(ids[where]))
            assert loss[where[0]] == 0  # a document's first token is no target
    assert sorted(found) == docs  # every example exactly once, whole
    def targets(a):
        m = a["loss_mask"][:, 1:] * a["attention_mask"][:, 1:]
        if "segment_ids" in a:
            m = m * (a["segment_ids"][:, 1:] == a["segment_ids"][:, :-1])
        return int(m.sum())
    assert targets(pa) == targets(pd_) > 0
    assert len(packed) < len(padded) and packed.stats["real_tokens"] == padded.stats["real_tokens"]
    assert packed.stats["real_tokens"] / packed.stats["row_tokens"] > 0.8


@pytest.mark.parametrize("policy", ["cut", "drop", "error"])
def test_an_example_longer_than_seq_len_is_cut_dropped_or_refused(tok, policy):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["the cat sat on the mat and the dog ran on the mat", "the cat"]})
    cfg = DataConfig(seq_len=6, truncation=policy)
    if policy == "error":
        with pytest.raises(ConfigError, match=r"data.truncation=error: example 1 of 'mem' has \d+ tokens"):
            tokenize(ds, cfg, "causal_lm", tok, "mem")
        return
    data, _ = tokenize(ds, cfg, "causal_lm", tok, "mem")
    long = tok("the cat sat on the mat and the dog ran on the mat")["input_ids"] + [tok.eos_token_id]
    if policy == "cut":
        assert data.stats["truncated"] == 1 and data.stats["truncated_tokens"] == len(long) - 6
        assert list(data.arrays["input_ids"][0]) == long[:6]
    else:
        assert data.stats["dropped_examples"] == 1 and len(data) == 1


def test_instruction_prompt_is_masked_out_of_the_loss(tok):
    import datasets

    ds = datasets.Dataset.from_dict({"q": ["the cat"], "a": ["sat on the mat"]})
    cfg = DataConfig(prompt_field="q", response_field="a", packing=False, seq_len=12)
    data, _ = tokenize(ds, cfg, "causal_lm", tok, "mem")
    prompt = tok("the cat")["input_ids"]
    answer = tok("sat on the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, loss = data.arrays["input_ids"][0], data.arrays["loss_mask"][0]
    n = len(prompt) + len(answer)
    np.testing.assert_array_equal(ids[:n], prompt + answer)
    np.testing.assert_array_equal(loss[:n], [0] * len(prompt) + [1] * len(answer))
    assert not loss[n:].any() and not data.arrays["attention_mask"][0, n:].any()


def test_truncation_is_counted(tok, bert_tok):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["the cat sat on the mat and the dog ran", "the cat"], "label": ["a", "b"]})
    data, _ = tokenize(ds, DataConfig(packing=False, seq_len=4), "causal_lm", tok, "mem")
    assert data.stats["truncated"] == 1
    data, names = tokenize(ds, DataConfig(seq_len=5), "sequence_classification", bert_tok, "mem")
    assert data.stats["truncated"] == 1 and names == ["a", "b"]
    assert data.arrays["input_ids"][0, 4] == bert_tok.sep_token_id  # [SEP] kept at the end


def test_labels_map_by_config_order_and_unknown_label_is_named(bert_tok):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["good", "bad", "good"], "label": ["pos", "neg", "pos"]})
    data, names = tokenize(ds, DataConfig(labels=["pos", "neg"], seq_len=6), "sequence_classification", bert_tok, "m")
    assert names == ["pos", "neg"] and data.arrays["labels"].tolist() == [0, 1, 0]
    with pytest.raises(ConfigError, match=r"labels \['neg'\] in 'm' are not in data.labels \['pos'\]"):
        tokenize(ds, DataConfig(labels=["pos"], seq_len=6), "sequence_classification", bert_tok, "m")


def test_missing_column_and_empty_data_are_named(tmp_path, tok):
    path = _write(tmp_path, "jsonl", [{"body": "the cat"}])
    cfg = DataConfig(source=str(path), seq_len=2)
    with pytest.raises(ConfigError, match=r"data.text_field: column 'text' is not in .*columns: \['body'\]"):
        load_data(cfg, "causal_lm", tok)
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_examples(DataConfig(), str(empty))
    with pytest.raises(ConfigError, match="no data file at"):
        read_examples(DataConfig(), str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="package 'no_such_pkg' is not installed"):
        read_examples(DataConfig(), "pkg:no_such_pkg/x.txt")


def test_batches_are_deterministic_cover_epochs_and_split_over_hosts(assets, tok):
    cfg = DataConfig(source=str(assets["lm"]), seq_len=8, eval_fraction=0.1)
    train, held, _ = load_data(cfg, "causal_lm", tok)
    again, held2, _ = load_data(cfg, "causal_lm", tok)
    np.testing.assert_array_equal(held.arrays["input_ids"], held2.arrays["input_ids"])
    whole = Batches(train, 8, seed=3)
    hosts = [Batches(train, 8, seed=3, process_index=i, process_count=2) for i in range(2)]
    steps_per_epoch = len(train) // 8
    seen = []
    for step in range(steps_per_epoch):
        rows = whole.rows(step)
        np.testing.assert_array_equal(np.concatenate([h.rows(step) for h in hosts]), rows)
        seen.extend(rows)
    assert len(set(seen)) == len(seen)  # one epoch: no row twice
    assert not np.array_equal(whole.rows(0), Batches(train, 8, seed=4).rows(0))
    np.testing.assert_array_equal(Batches(train, 8, seed=3).local(5)["input_ids"], whole.local(5)["input_ids"])


def test_each_host_prepares_only_its_slice_and_the_slices_make_the_whole(assets, tok, bert_tok):
    """data.host_shards: the hosts' slices hold every training example once (their documents and loss tokens
    add up to one process's), the eval split stays whole, and every host maps labels to the same classes."""
    cfg = DataConfig(source=str(assets["lm"]), seq_len=16, eval_fraction=0.1)
    whole, held, _ = load_data(cfg, "causal_lm", tok)
    parts = [load_data(cfg, "causal_lm", tok, shard=(i, 3)) for i in range(3)]
    docs = lambda d: sorted(tuple(ids[seg == k]) for ids, seg in zip(d.arrays["input_ids"], d.arrays["segment_ids"])
                            for k in range(1, int(seg.max()) + 1))  # noqa: E731
    assert sorted(sum((docs(p[0]) for p in parts), [])) == docs(whole)
    assert [p[0].stats["shard"] for p in parts] == [0, 1, 2] and {p[0].stats["shards"] for p in parts} == {3}
    for key in ("examples", "real_tokens"):
        assert sum(p[0].stats[key] for p in parts) == whole.stats[key]
    assert sum(int(p[0].arrays["loss_mask"].sum()) for p in parts) == int(whole.arrays["loss_mask"].sum())
    for _, h, _ in parts:
        np.testing.assert_array_equal(h.arrays["input_ids"], held.arrays["input_ids"])
    # classification: a label only one slice has still has one index everywhere
    cls = DataConfig(source=str(assets["cls"]), text_field="sentence", label_field="sentiment", seq_len=12)
    names = {tuple(load_data(cls, "sequence_classification", bert_tok, shard=(i, 40))[2]) for i in (0, 39)}
    assert names == {tuple(load_data(cls, "sequence_classification", bert_tok)[2])}
    with pytest.raises(ConfigError, match="data.source: 180 training examples .* cannot be shared by 200 hosts"):
        load_data(cfg, "causal_lm", tok, shard=(0, 200))


def test_sharded_batches_draw_each_hosts_part_from_its_own_rows(assets, tok):
    cfg = DataConfig(source=str(assets["lm"]), seq_len=16)
    parts = [load_data(cfg, "causal_lm", tok, shard=(i, 2))[0] for i in range(2)]
    hosts = [Batches(p, 8, seed=3, process_index=i, process_count=2, sharded=True) for i, p in enumerate(parts)]
    for h, p in zip(hosts, parts):
        per_epoch = len(p) // 4
        rows = np.concatenate([h.rows(s) for s in range(per_epoch)])
        assert len(rows) == per_epoch * 4 and len(set(rows.tolist())) == len(rows) and rows.max() < len(p)
        assert h.local(0)["input_ids"].shape == (4, 16)
        again = Batches(p, 8, seed=3, process_index=hosts.index(h), process_count=2, sharded=True)
        np.testing.assert_array_equal(again.rows(per_epoch + 1), h.rows(per_epoch + 1))  # deterministic, epoch 2
    assert hosts[0].epoch_of(len(parts[0]) // 4) == pytest.approx(len(parts[0]) // 4 * 4 / len(parts[0]))


def test_eval_batches_pad_with_rows_that_count_for_nothing(bert_tok):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["good"] * 5, "label": ["pos"] * 5})
    data, _ = tokenize(ds, DataConfig(seq_len=4), "sequence_classification", bert_tok, "m")
    batches = eval_batches(data, 4, 0)
    assert [b["labels"].tolist() for b in batches] == [[0, 0, 0, 0], [0, -1, -1, -1]]


def test_config_paths_are_not_followed_outside_where_they_point(tmp_path):
    with pytest.raises(ConfigError, match=r"data.source: 'pkg:gensim/\.\./\.\./x.txt' points outside package 'gensim'"):
        read_examples(DataConfig(), "pkg:gensim/../../x.txt")
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "private"}\n')
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": "the cat"}\n')
    (data / "b.jsonl").symlink_to(secret)
    with pytest.raises(ConfigError, match=r"data.source: \['b.jsonl'\] in .*data link outside that directory"):
        read_examples(DataConfig(), str(data))


def test_a_too_short_eval_split_is_named_with_what_to_change(tmp_path, tok):
    """Stream packing: enough data to train on, but the 2% held out is shorter than one row: the error names
    the eval split (not the file) and the fields to change. Packing whole examples keeps even one example."""
    rows = [{"prompt": f"the cat sat {i}", "response": "on the mat and then the dog ran home"} for i in range(200)]
    path = _write(tmp_path, "jsonl", rows)
    cfg = DataConfig(source=str(path), prompt_field="prompt", response_field="response", seq_len=128,
                     packing="stream", eval_fraction=0.02)
    assert len(load_data(DataConfig(**{**cfg.__dict__, "packing": True}), "causal_lm", tok)[1]) == 1
    with pytest.raises(ConfigError) as e:
        load_data(cfg, "causal_lm", tok)
    msg = str(e.value)
    assert "the eval split (4 of 200 examples" in msg and "data.eval_fraction" in msg and "data.eval_source" in msg
    train, held, _ = load_data(DataConfig(**{**cfg.__dict__, "eval_fraction": 0.2}), "causal_lm", tok)
    assert len(train) > 1 and len(held) >= 1


def test_tokenized_examples_are_cached_on_disk_and_reused(tok, tmp_path, monkeypatch):
    """The second load of the same file with the same tokenizer and settings reads the tokens back (the tokenizer
    is not called); a changed setting tokenizes again."""
    path = _write(tmp_path, "jsonl", [{"q": r["q"], "a": r["a"]} for r in _pairs(30, seed=1)])
    cfg = DataConfig(source=str(path), prompt_field="q", response_field="a", seq_len=32)
    first, _, _ = load_data(cfg, "causal_lm", tok)

    def refuse(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(type(tok), "__call__", refuse)
    again, _, _ = load_data(cfg, "causal_lm", tok)
    for k in first.arrays:
        np.testing.assert_array_equal(first.arrays[k], again.arrays[k])
    with pytest.raises(AssertionError, match="tokenized again"):
        load_data(DataConfig(**{**cfg.__dict__, "loss_on": "all"}), "causal_lm", tok)
