"""`make demo` keeps working: a shortened run still shows the loss fall and merge == factored."""

from train import demo


def test_demo_loss_falls(capsys):
    assert demo.main(steps=60, batch=8) == 0
    out = capsys.readouterr().out
    assert "merged vs factored logits" in out and "loss fell from" in out
