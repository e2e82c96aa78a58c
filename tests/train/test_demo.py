"""`make demo`: the real MiniLM and the gensim polarity data load and train through the app.

The default run is shortened (a few steps of each run); the full demo (LoRA must beat head-only)
runs under the ``slow`` marker (``make test-all``)."""

import pytest

from train import demo


def test_demo_runs_shortened(tmp_path, capsys):
    demo.main(["--steps", "4", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "held-out accuracy on 50 Pang & Lee sentences" in out
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
