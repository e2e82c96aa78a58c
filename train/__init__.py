"""The fine-tuning app (config, data, loop, checkpoints, CLI). For now: the demo (`python -m train.demo`)."""
