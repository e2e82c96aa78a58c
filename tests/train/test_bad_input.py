"""Bad input through the whole CLI: one message naming the field, path or key; status 2; no
traceback; nothing half-written in the output directory. (Config-only checks: test_config.py.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.train.conftest import cli, cls_args, lm_args, main, train


def _copy_model(assets, tmp_path: Path, name: str = "m") -> Path:
    d = tmp_path / name
    shutil.copytree(assets["llama"], d)
    return d


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return ["--config", str(p)]


def _case_malformed_yaml(assets, tmp_path):
    return _yaml(tmp_path, "adapter: {r: 4\n"), r"c.yaml is not valid YAML"


def _case_unknown_key(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "adapter.rnak=4"), r"adapter.rnak.*valid keys of adapter"


def _case_wrong_type(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "adapter.r=four"), r"adapter.r"


def _case_rank_zero(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "adapter.r=0"), r"adapter.r"


def _case_rank_over_dims(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "adapter.r=100000"), r"rank 100000"


def _case_negative_lr(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "optim.lr=-1"), r"optim.lr: must be positive"


def _case_batch_vs_mesh(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "mesh.data=3", "mesh.fsdp=1"), r"mesh"


def _case_targets_match_nothing(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "adapter.targets=no_such_module"), r"no_such_module"


def _case_missing_model_dir(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", f"model.path={tmp_path / 'nope'}"), r"nope"


def _case_missing_gguf_file(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", f"model.path={tmp_path / 'nope.gguf'}"), r"model.path: .*nope.gguf'?: no such GGUF file"


def _case_damaged_gguf_file(assets, tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    return lm_args(assets, tmp_path / "o", f"model.path={tmp_path / 'junk.gguf'}"), r"junk.gguf"


def _case_unsupported_architecture(assets, tmp_path):
    d = _copy_model(assets, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    return lm_args(assets, tmp_path / "o", f"model.path={d}"), r"mamba"


def _case_truncated_safetensors(assets, tmp_path):
    d = _copy_model(assets, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return lm_args(assets, tmp_path / "o", f"model.path={d}"), r"model.safetensors"


def _case_corrupted_header(assets, tmp_path):
    d = _copy_model(assets, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"{garbage"
    f.write_bytes(bytes(data))
    return lm_args(assets, tmp_path / "o", f"model.path={d}"), r"model.safetensors"


def _case_tokenizer_missing(assets, tmp_path):
    d = _copy_model(assets, tmp_path)
    for p in d.iterdir():
        if "token" in p.name or p.name.endswith((".model", "vocab.json", "merges.txt")):
            p.unlink()
    return lm_args(assets, tmp_path / "o", f"model.path={d}"), r"tokenizer"


def _case_empty_dataset(assets, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    return lm_args(assets, tmp_path / "o", f"data.source={tmp_path / 'empty.jsonl'}"), r"data.source: .*empty.jsonl' is empty"


def _case_missing_column(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "data.text_field=body"), r"data.text_field: column 'body'"


def _case_sequence_too_long(assets, tmp_path):
    return (lm_args(assets, tmp_path / "o", "data.seq_len=1000", model="gpt2"),
            r"data.seq_len=1000 exceeds the 64 positions of the model at model.path=.*gpt2")


def _case_data_pickle(assets, tmp_path):
    (tmp_path / "d.pkl").write_bytes(b"\x80\x04K\x01.")
    return lm_args(assets, tmp_path / "o", f"data.source={tmp_path / 'd.pkl'}"), r"d.pkl"


def _case_output_dir_inside_a_file(assets, tmp_path):
    (tmp_path / "f").write_text("x")
    return lm_args(assets, tmp_path / "f" / "o"), r"NotADirectoryError: .*f/o"


def _bad_rows(assets, tmp_path, rows, name="bad.jsonl"):
    lines = [json.loads(x) for x in assets["lm"].read_text().splitlines()][:40]
    for i, v in rows.items():
        lines[i] = {"text": v}
    (tmp_path / name).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path / name


def _case_null_text_row(assets, tmp_path):
    f = _bad_rows(assets, tmp_path, {6: None, 9: None})
    return (lm_args(assets, tmp_path / "o", f"data.source={f}"),
            r"data.text_field: row 7 of .*bad.jsonl has null in column 'text', not text \(2 such rows in .*\); fix the data, "
            r"or set data.skip_bad_rows: true")


def _case_all_null_text(assets, tmp_path):
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n' * 5)
    return lm_args(assets, tmp_path / "o", f"data.source={tmp_path / 'nulls.jsonl'}"), r"row 1 of .*nulls.jsonl has null"


def _case_number_for_text(assets, tmp_path):
    f = _bad_rows(assets, tmp_path, {2: 17})
    return lm_args(assets, tmp_path / "o", f"data.source={f}"), r"row 3 of .*bad.jsonl has a int \(17\) in column 'text'"


def _case_null_text_in_a_directory_of_files(assets, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    (d / "a.jsonl").write_text(assets["lm"].read_text())
    (d / "b.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    return lm_args(assets, tmp_path / "o", f"data.source={d}"), r"row 2 of .*many/b.jsonl has null"


def _case_null_prompt(assets, tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"q": "a", "a": "b"}\n{"q": null, "a": "c"}\n' * 10)
    return (lm_args(assets, tmp_path / "o", f"data.source={tmp_path / 'pairs.jsonl'}", "data.prompt_field=q",
                    "data.response_field=a"), r"data.prompt_field: row 2 of .*pairs.jsonl has null in column 'q'")


def _case_null_label(assets, tmp_path):
    rows = [json.loads(x) for x in assets["cls"].read_text().splitlines()]
    rows[4]["sentiment"] = None
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return (cls_args(assets, tmp_path / "o", f"data.source={tmp_path / 'cls.jsonl'}"),
            r"data.label_field: row 5 of .*cls.jsonl has null in column 'sentiment' \(1 such row")


def _case_unknown_label(assets, tmp_path):
    rows = [json.loads(x) for x in assets["cls"].read_text().splitlines()]
    rows[4]["sentiment"] = "meh"
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return (cls_args(assets, tmp_path / "o", f"data.source={tmp_path / 'cls.jsonl'}", "data.labels=[neg,pos]"),
            r"data.label_field: labels \['meh'\] in .*cls.jsonl")


def _case_skip_leaves_nothing(assets, tmp_path):
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n' * 5)
    return (lm_args(assets, tmp_path / "o", f"data.source={tmp_path / 'nulls.jsonl'}", "data.skip_bad_rows=true"),
            r"every row of .*nulls.jsonl' is bad")


def _case_lora_ga_direction(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "adapter.init=lora_ga", "adapter.lora_ga.direction=BA"), \
        r"adapter.lora_ga.direction: expected one of .ArB2r."


def _case_lora_ga_quantized(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "adapter.init=lora_ga", "quant.kind=nf4"), \
        r"adapter.init: lora_ga needs the full-precision base"


def _case_lora_ga_rank(assets, tmp_path):  # v_proj is [32, 16]: 2r = 18 directions do not exist
    return lm_args(assets, tmp_path / "o", "adapter.init=lora_ga", "adapter.r=9"), \
        r"adapter.init=lora_ga: layers/attn/\w+_proj: LoRA-GA takes 2r = 18 directions"


def _case_eva_rslora(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "adapter.init=eva", "adapter.rslora=true"), r"adapter.rslora: eva with rsLoRA"


def _case_plan_unknown_topology(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "--plan", "v5p-6"), r"--plan: unknown topology 'v5p-6'; known: v5p-8, .*v6e-8"


def _case_plan_gpu(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "--plan", "h100-8"), r"unknown topology 'h100-8'.*GPUs are not offered"


def _case_plan_mesh_larger_than_slice(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "--plan", "v5p-8", "mesh.fsdp=2", "mesh.context=4"), \
        r"mesh: data=1 x fsdp=2 x context=4 x tensor=1 needs 8 chips; v5p-8 has 4"


def _case_context_does_not_divide_the_sequence(assets, tmp_path):
    return lm_args(assets, tmp_path / "o", "mesh.context=4", "data.seq_len=20"), \
        r"data.seq_len: 20 must be a multiple of 8 with mesh.context=4 \(balanced"


def _case_context_of_a_classifier(assets, tmp_path):
    return cls_args(assets, tmp_path / "o", "mesh.context=2"), r"mesh.context: splits a causal LM's sequence"


CASES = {k[6:]: v for k, v in globals().items() if k.startswith("_case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_message(case, assets, tmp_path, capsys):
    args, message = CASES[case](assets, tmp_path)
    code, err = main(args, capsys)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.startswith("train: error:")]
    assert len(last) == 1, err[-2000:]
    assert re.search(message, last[0]), last[0]
    out = tmp_path / "o"
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_checkpoint_of_another_variant_or_model_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(lm_args(assets, out, "train.steps=2"), capsys)[0] == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    config = (out / "config.json").read_text()
    code, err = main(lm_args(assets, out, "train.steps=4", "adapter.variant=dora"), capsys)
    assert code == 2 and "variant: checkpoint 'lora', this run 'dora'" in err and "Traceback" not in err
    code, err = main(lm_args(assets, out, "train.steps=4", f"model.path={assets['gpt2']}"), capsys)
    assert code == 2 and f"model.path={assets['gpt2']} holds other weights" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing written by the refusals
    assert (out / "config.json").read_text() == config  # export still rebuilds the run that wrote the checkpoints


@pytest.mark.slow  # CI's `make test-slow` (an 8-device subprocess for one message)
def test_batch_not_divisible_by_the_mesh(assets, tmp_path):
    proc = cli(lm_args(assets, tmp_path / "o", "train.grad_accum=16", "mesh.data=2"), devices=2, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(r"train: error: .*1 rows per micro-batch must be divisible by mesh data x fsdp = 2", proc.stderr), \
        proc.stderr[-2000:]
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_bad_rows_are_left_out_and_counted_when_asked(assets, tmp_path):
    f = _bad_rows(assets, tmp_path, {0: None, 5: 3.5, 11: None})
    result = train(lm_args(assets, tmp_path / "o", f"data.source={f}", "data.skip_bad_rows=true", "train.steps=2"))
    assert result.summary["data"]["skipped_rows"] == 3 and result.summary["data"]["examples"] == 37
