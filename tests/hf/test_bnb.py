"""Pre-quantized bitsandbytes 4-bit checkpoints, as transformers writes them after loading a model with
``BitsAndBytesConfig(load_in_4bit=True)``: NF4 and FP4, with and without double quantization. Loaded as
stored: dequantized weights equal bitsandbytes' own ``dequantize_4bit`` bit for bit, logits equal torch on
those weights, and LoRA trains over them (through the app)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import lorax_variants as lv
from lorax_variants import hf
from tests import hf_models as H
from tests.close import assert_close

CONFIG = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
IDS = np.random.default_rng(0).integers(2, 96, (2, 9))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    H.save_tokenizer(d, H.lm_texts(200))
    return d


def _bnb(base, out, quant_type, double):
    cfg = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                               bnb_4bit_compute_dtype=torch.float32)
    model = T.AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, device_map="cpu").eval()
    model.save_pretrained(out)
    for f in base.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return model


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [True, False])
def test_loads_as_stored_bit_for_bit(base, tmp_path, quant_type, double):
    import bitsandbytes as bnb

    theirs = _bnb(base, tmp_path / "q", quant_type, double)
    model, params = hf.from_pretrained(tmp_path / "q")
    dense = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG)).eval()  # torch on the dequantized weights: the reference
    state = dict(theirs.state_dict())
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            ref = bnb.functional.dequantize_4bit(w.data, w.quant_state).float().numpy()
            i = int(name.split(".")[2])
            path = name.split(".")[-2:]
            node = params["layers"]["attn" if path[0] == "self_attn" else "mlp"][path[1]]
            assert isinstance(node, lv.QuantizedNode) and node.kind == quant_type
            assert (node.qabsmax is not None) == double
            np.testing.assert_array_equal(np.asarray(node.dequantize()[i]).T, ref, err_msg=name)
            state[f"{name}.weight"] = torch.as_tensor(ref)
    dense.load_state_dict({k: v for k, v in state.items() if k in dense.state_dict()}, strict=True)
    assert_close(np.asarray(model.apply(params, jnp.asarray(IDS))), H.torch_out(dense, IDS), 5e-4)


@pytest.mark.slow  # CI's `make test-slow`; loading bnb-4bit bit for bit stays in the default run, QLoRA through the app too (pissa_nf4)
def test_lora_trains_over_a_prequantized_checkpoint_through_the_app(base, tmp_path):
    from tests.train.conftest import lm_args, losses, train

    _bnb(base, tmp_path / "q", "nf4", True)
    data = tmp_path / "lm.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in H.lm_texts(200)) + "\n")
    result = train(lm_args({"llama": tmp_path / "q", "lm": data}, tmp_path / "run", "train.steps=8", "optim.lr=0.01"))
    curve = losses(tmp_path / "run")
    assert np.mean(curve[-3:]) < np.mean(curve[:3]), curve
    node = result.frozen["layers"]["attn"]["q_proj"].weight
    assert isinstance(node, lv.QuantizedNode) and node.kind == "nf4"
    from lorax_variants.hf.safetensors_io import SafetensorsFile

    stored = SafetensorsFile(tmp_path / "q" / "model.safetensors").get("model.layers.1.self_attn.q_proj.weight")
    np.testing.assert_array_equal(np.asarray(node.codes[1]).T.reshape(-1), np.asarray(stored).reshape(-1))


def test_a_checkpoint_missing_its_quant_state_is_refused_naming_the_weight(base, tmp_path):
    from safetensors.numpy import load_file, save_file

    _bnb(base, tmp_path / "q", "nf4", True)
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"]
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has no quant_state"):
        hf.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("edit, match", [
    (lambda q: q | {"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
    (lambda q: q | {"load_in_8bit": True, "load_in_4bit": False, "_load_in_8bit": True}, "load_in_8bit"),
])
def test_other_quantization_is_refused_by_name(base, tmp_path, edit, match):
    _bnb(base, tmp_path / "q", "nf4", False)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = edit(cfg["quantization_config"])
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        hf.from_pretrained(tmp_path / "q")
