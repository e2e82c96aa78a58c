"""Chat data: conversations rendered with the chat template, the loss on every assistant turn and nothing else.
Reference: TRL's SFTTrainer (assistant_only_loss) on the same conversations and tokenizer: its labels that are
not -100 are our loss flags, token for token. Tokenizer: SmolLM2-135M-Instruct's (from its GGUF, `make assets`)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from train.config import ConfigError, DataConfig
from train.data import check_rows, read_examples, tokenize

GGUF = pathlib.Path(__file__).resolve().parents[2] / ".cache" / "assets" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's own template with TRL's generation markers around what the assistant writes after the generation
# prompt (its content, end-of-turn token and newline): renders the same text as the original.
SMOLLM2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endgeneration %}{% else %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    from lorax_variants.hf import gguf_tokenizer

    if not GGUF.is_file():
        pytest.fail(f"{GGUF} is missing: `make assets` fetches it (pinned, checksum checked)")
    return gguf_tokenizer(GGUF)


def _trl_template(name):
    import trl

    return (pathlib.Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def _conversations(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "the cat dog sat ran on mat a big small red why how yes no".split()
    say = lambda: " ".join(rng.choice(words, int(rng.integers(1, 9)))).capitalize() + rng.choice([".", "?", "!"])  # noqa: E731
    out = []
    for _ in range(n):
        turns = [{"role": "system", "content": say()}] if rng.random() < 0.4 else []
        for _ in range(int(rng.integers(1, 4))):
            turns += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
        out.append(turns)
    return out


def _trl_masks(tok, template, conversations, tmp_path):
    """TRL's token ids and assistant-only loss flags (labels != -100) per conversation."""
    import copy

    import datasets
    import torch
    import transformers as T
    from trl import SFTConfig, SFTTrainer

    theirs = copy.deepcopy(tok)
    theirs.chat_template = template
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=2))
    args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, report_to=[], max_length=None,
                     use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=theirs,
                         train_dataset=datasets.Dataset.from_list([{"messages": c} for c in conversations]))
    return [(list(r["input_ids"]), [int(x != -100) for x in r["labels"]]) for r in trainer.train_dataset]


def _ours(tok, conversations, template, tmp_path, **kw):
    import datasets

    cfg = DataConfig(messages_field="messages", packing=False, seq_len=512, chat_template=template, **kw)
    data, _ = tokenize(datasets.Dataset.from_list([{"messages": c} for c in conversations]), cfg, "causal_lm", tok,
                       "mem")
    out = []
    for ids, mask, loss in zip(data.arrays["input_ids"], data.arrays["attention_mask"], data.arrays["loss_mask"]):
        n = int(mask.sum())
        out.append((ids[:n].tolist(), loss[:n].tolist()))
    return out


@pytest.mark.parametrize("case", ["smollm2_own_template", "qwen2_5_training_template"])
def test_assistant_tokens_equal_trl_token_for_token(tok, tmp_path, case):
    conversations = _conversations(24)
    if case == "smollm2_own_template":  # ours: SmolLM2's template as it ships (no markers: rendered prefixes)
        assert tok.apply_chat_template(conversations[0], tokenize=False) == tok.apply_chat_template(
            conversations[0], tokenize=False, chat_template=SMOLLM2_MARKED)
        ours_template, theirs = None, SMOLLM2_MARKED
    else:  # a Qwen-style template with generation markers, as TRL ships it, on both sides
        path = tmp_path / "qwen2_5_training.jinja"
        path.write_text(_trl_template("qwen2_5_training"))
        ours_template, theirs = str(path), path.read_text()
    ours = _ours(tok, conversations, ours_template, tmp_path)
    ref = _trl_masks(tok, theirs, conversations, tmp_path)
    for (ids, loss), (ref_ids, ref_loss) in zip(ours, ref):
        assert ids == ref_ids
        # our loss flag of the first token is 0 (nothing predicts it); TRL's label there is never a target either
        assert loss[1:] == ref_loss[1:]
        assert sum(loss) > 0
    # every assistant turn of a multi-turn conversation is in the loss
    multi = next(i for i, c in enumerate(conversations) if sum(t["role"] == "assistant" for t in c) == 3)
    ids, loss = ours[multi]
    spans = np.flatnonzero(np.diff(np.r_[0, loss, 0]) == 1)
    assert len(spans) == 3


def test_loss_on_all_covers_every_token(tok, tmp_path):
    conversations = _conversations(3)
    for ids, loss in _ours(tok, conversations, None, tmp_path, loss_on="all"):
        assert loss[1:] == [1] * (len(ids) - 1)


def test_a_template_that_re_renders_earlier_turns_is_refused_naming_it(tok, tmp_path):
    """Qwen3's template writes an empty reasoning block into the last assistant turn only: rendered prefixes do
    not find the turns, so without generation markers the conversation is refused, naming the template."""
    path = tmp_path / "qwen3.jinja"
    path.write_text(_trl_template("qwen3"))
    with pytest.raises(ConfigError, match=r"data.chat_template: chat template file .*qwen3.jinja renders the turns "
                                          r"before assistant turn \d+ differently.*generation.*conversation 1 of 'mem'"):
        _ours(tok, _conversations(1, seed=3), str(path), tmp_path)


BAD = {
    "unknown_role": ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                     r"turn 1 has role 'robot'; the roles are \['system', 'user', 'assistant'\]"),
    "empty": ([], "an empty conversation"),
    "no_assistant": ([{"role": "user", "content": "hi"}], "no assistant turn"),
    "null": (None, "null where a list of turns belongs"),
    "null_content": ([{"role": "user", "content": None}, {"role": "assistant", "content": "a"}],
                     r"turn 1 \(user\) has no content"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_conversation_is_named_by_file_row_and_field(tmp_path, case):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [good, good, BAD[case][0], good]))
    cfg = DataConfig(messages_field="messages")
    ds = read_examples(cfg, str(path))
    with pytest.raises(ConfigError, match=rf"data.messages_field: row 3 of {path} has {BAD[case][1]}"):
        check_rows(ds, cfg, "causal_lm", str(path))
    kept, skipped = check_rows(ds, DataConfig(messages_field="messages", skip_bad_rows=True), "causal_lm", str(path))
    assert skipped == 1 and len(kept) == 3


def test_a_conversation_longer_than_seq_len_is_refused_under_truncation_error(tok, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"messages": c} for c in _conversations(4)])
    with pytest.raises(ConfigError, match=r"data.truncation=error: example \d of 'mem' has \d+ tokens, more than "
                                          r"data.seq_len=24"):
        tokenize(ds, DataConfig(messages_field="messages", seq_len=24, truncation="error"), "causal_lm", tok, "mem")


def test_packed_conversations_keep_their_assistant_flags(tok, tmp_path):
    import datasets

    conversations = _conversations(12, seed=5)
    alone = _ours(tok, conversations, None, tmp_path)
    ds = datasets.Dataset.from_list([{"messages": c} for c in conversations])
    data, _ = tokenize(ds, DataConfig(messages_field="messages", seq_len=256), "causal_lm", tok, "mem")
    found = []
    for ids, seg, loss in zip(data.arrays["input_ids"], data.arrays["segment_ids"], data.arrays["loss_mask"]):
        for k in range(1, int(seg.max()) + 1):
            where = seg == k
            found.append((ids[where].tolist(), loss[where].tolist()))
    assert sorted(found) == sorted(alone)
