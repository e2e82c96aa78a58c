"""The typed config: YAML + ``base`` + ``--set``; every bad key or value names the field."""

from __future__ import annotations

import re

import pytest

from train.config import Config, ConfigError, load, to_dict


def test_defaults_overrides_and_types():
    cfg = load(None, ["train.steps=5", "adapter.r=4", "optim.lr=1e-3", "adapter.targets=[a, b]", "quant.kind=nf4",
                      "optim.clip_norm=null", "model.scan=false"])
    assert (cfg.train.steps, cfg.adapter.r, cfg.optim.lr) == (5, 4, 1e-3)
    assert isinstance(cfg.optim.lr, float) and cfg.adapter.targets == ["a", "b"]
    assert cfg.quant.kind == "nf4" and cfg.optim.clip_norm is None and cfg.model.scan is False
    assert isinstance(load(None), Config)
    assert to_dict(cfg)["train"]["steps"] == 5


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "unknown config key 'train.stpes' (did you mean train.steps?)"),
    ("trian.steps=3", "unknown config key 'trian' (did you mean train?)"),
    ("adapter.r=x", "adapter.r: expected an integer, got 'x'"),
    ("adapter.r=2.5", "adapter.r: expected an integer, got 2.5"),
    ("adapter.r=0", "adapter.r: must be at least 1, got 0"),
    ("optim.lr=-1", "optim.lr: must be positive, got -1.0"),
    ("model.task=summarize", "model.task: expected one of 'causal_lm', 'sequence_classification', got 'summarize'"),
    ("model.scan=maybe", "model.scan: expected true or false, got 'maybe'"),
    ("optim.clip_norm=x", "optim.clip_norm: expected float or null, got 'x'"),
    ("train=3", "train: expected a mapping"),
    ("adapter.dropout=1.5", "adapter.dropout: must be in [0, 1), got 1.5"),
    ("train.stop_at=500", "train.stop_at: must be in [1, train.steps=100]"),
    ("optim.warmup_steps=101", "optim.warmup_steps: must not exceed train.steps=100"),
    ("adapter.adalora.target_r=x", "adapter.adalora.target_r: expected an integer, got 'x'"),
    ("adapter.lora_drop.threshold=2", "adapter.lora_drop.threshold: must be in (0, 1], got 2.0"),
    ("adapter.sora.xii=1", "unknown config key 'adapter.sora.xii' (did you mean adapter.sora.xi?)"),
    ("adapter.variant=lorra", "adapter.variant: must be one of"),
    ("adapter.init=lora-ga", "adapter.init: must be one of ['eva', 'gaussian', 'kaiming', 'loftq', 'lora_ga', 'olora', "
                             "'pissa']"),
    ("adapter.loftq.iters=0", "adapter.loftq: LoftQ.iters must be a positive integer, got 0"),
    ("adapter.eva.tau=2", "adapter.eva: Eva.tau must be in [0, 1], got 2.0"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize("old, new", [
    ("optim.adalora_target_r=2", "adapter.adalora.target_r"), ("optim.loraplus_ratio=4", "adapter.loraplus.ratio"),
    ("optim.delta_lora_lambda=0.5", "adapter.delta_lora (its keys: ['update_ratio', 'start'])"), ("adapter.n_tasks=2", "adapter.multitask.n_tasks"),
    ("optim.lora_drop_select_at=3", "adapter.lora_drop.select_at"), ("adapter.r_min=2", "adapter.dylora.r_min"),
    ("adapter.loftq_iters=2", "adapter.loftq.iters"),
])
def test_a_moved_key_names_its_new_place(old, new):
    """Each variant's settings live in its own section; a config with the old flat key is told where it went."""
    with pytest.raises(ConfigError, match=re.escape(f"moved to '{new}'")):
        load(None, [old])


def test_init_settings_come_from_their_section_and_its_checks_apply():
    """An init's settings are its section (registered by the init's module); the init's own refusals apply."""
    cfg = load(None, ["adapter.init=lora_ga", "adapter.lora_ga.batches=3", "adapter.eva.tau=0.5"])
    assert cfg.adapter.init_settings().batches == 3 and cfg.adapter.eva.tau == 0.5
    with pytest.raises(ConfigError, match="adapter.rslora: eva with rsLoRA"):
        load(None, ["adapter.init=eva", "adapter.rslora=true"])
    with pytest.raises(ConfigError, match="adapter.init: loftq initializes adapters over a quantized base"):
        load(None, ["adapter.init=loftq"])
    with pytest.raises(ConfigError, match="adapter.init: lora_ga needs the full-precision base"):
        load(None, ["adapter.init=lora_ga", "quant.kind=nf4"])
    with pytest.raises(ConfigError, match="adapter.init: eva initializes LoRA adapters, not adapter.variant=vera"):
        load(None, ["adapter.init=eva", "adapter.variant=vera"])


def test_variant_settings_come_from_their_section():
    cfg = load(None, ["adapter.variant=adalora", "adapter.adalora.target_r=2", "adapter.sora.xi=0.5"])
    assert cfg.adapter.settings().target_r == 2 and cfg.adapter.sora.xi == 0.5
    assert load(None, ["adapter.variant=dora"]).adapter.settings() is None


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load(None, ["optim.learning_rate=1"])
    assert "valid keys of optim:" in str(e.value) and "'lr'" in str(e.value)


def test_batch_must_divide_into_micro_batches():
    with pytest.raises(ConfigError, match=r"train.batch_size: must be divisible by train.grad_accum=4, got 10"):
        load(None, ["train.batch_size=10", "train.grad_accum=4"])


def test_yaml_files_base_and_errors(tmp_path):
    (tmp_path / "parent.yaml").write_text("adapter: {r: 4, alpha: 8}\ntrain: {steps: 7}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nadapter: {r: 2}\n")
    cfg = load(tmp_path / "child.yaml", ["train.batch_size=4"])
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.train.steps, cfg.train.batch_size) == (2, 8.0, 7, 4)
    (tmp_path / "bad.yaml").write_text("adapter: {r: 4\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, got list"):
        load(tmp_path / "list.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load(None, ["train.steps"])
