"""`make demo`: the real MiniLM and the Rotten Tomatoes reviews (fetched by make) load and train through the app.

The default run is shortened (a few steps of each run); the full demo (LoRA must beat head-only)
runs under the ``slow`` marker (``make test-all``)."""

import pytest

from train import demo


@pytest.mark.slow  # `make test-slow` (CI runs it after the default run): the demo's whole pipeline, shortened
def test_demo_runs_shortened(tmp_path, capsys):
    demo.main(["--steps", "4", "--eval-batches", "2", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "held-out accuracy on 64 Rotten Tomatoes reviews" in out  # 2 batches of 32 of the 2,562 held out
    assert "head-only" in out and "LoRA" in out
    assert (tmp_path / "lora" / "adapters.safetensors").is_file()
    assert (tmp_path / "export-peft" / "adapter_config.json").is_file()
    assert (tmp_path / "export-merged" / "model.safetensors").is_file()
    page = (tmp_path / "comparison" / "index.html").read_text()
    assert ">head-only<" in page and ">lora<" in page and "compare_bars.png" in page
    assert (tmp_path / "lora" / "report" / "index.html").is_file()


@pytest.mark.slow
def test_full_demo_lora_beats_head_only(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--no-progress"]) == 0


@pytest.mark.slow
def test_demo_lm_shortened(tmp_path, capsys):
    """`make demo-lm` in miniature: the GGUF becomes a transformers directory, LoRA trains on the addresses,
    the held-out perplexity drops (over 16 steps: 6 moved it up on these rows) and the PEFT export gives our
    logits in torch."""
    from train import demo_lm

    code = demo_lm.main(["--out", str(tmp_path), "--steps", "16", "--seq-len", "64", "--eval-rows", "8",
                         "--sample-tokens", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert "held-out perplexity:" in out and "transformers + peft give our logits" in out
    assert code == 0, out[-2000:]


def test_chat_demo_data_alternates_user_and_assistant_and_f1_is_squads():
    """The Chit-Chat chats as conversations: turns alternate, the first sender is the user, every conversation
    ends with an assistant turn; the demo's score is SQuAD's token F1."""
    from collections import Counter

    from train import demo_chat

    convs = demo_chat.conversations(demo_chat.ASSETS / "chitchat.json", 200, 6)
    assert len(convs) == 200
    for c in convs:
        roles = [t["role"] for t in c]
        assert roles[0] == "user" and roles[-1] == "assistant" and 2 <= len(c) <= 6
        assert all(a != b for a, b in zip(roles, roles[1:])) and all(t["content"] for t in c)
    ref, out = "the cat sat on the mat", "a cat sat on a mat today"
    common = sum((Counter(ref.split()) & Counter(out.split())).values())  # cat sat on mat: 4
    p, r = common / len(out.split()), common / len(ref.split())
    assert demo_chat.token_f1("", ref, out) == pytest.approx(2 * p * r / (p + r))
    assert demo_chat.token_f1("", "Yes!", "yes") == 1.0 and demo_chat.token_f1("", "no", "") == 0.0


@pytest.mark.slow
def test_demo_chat_shortened(tmp_path, capsys):
    """`make demo-chat` in miniature: chat template, assistant-only loss, packing, generation eval; it learns."""
    from train import demo_chat

    code = demo_chat.main(["--out", str(tmp_path), "--conversations", "64", "--held-out", "8", "--steps", "6",
                           "--seq-len", "128", "--gen-tokens", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert "held-out loss" in out and "generation eval" in out and "before:" in out
    assert code == 0, out[-2000:]
