"""`make demo`: the real MiniLM and the Rotten Tomatoes reviews (fetched by make) load and train through the app.

The default run is shortened (a few steps of each run); the full demo (LoRA must beat head-only)
runs under the ``slow`` marker (``make test-all``)."""

import pytest

from train import demo


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
    the held-out perplexity drops and the PEFT export gives our logits in torch."""
    from train import demo_lm

    code = demo_lm.main(["--out", str(tmp_path), "--steps", "6", "--seq-len", "64", "--eval-rows", "8",
                         "--sample-tokens", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert "held-out perplexity:" in out and "transformers + peft give our logits" in out
    assert code == 0, out[-2000:]
