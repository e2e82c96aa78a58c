import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as T

import lorax_variants as lv
from lorax_variants import hf
from lorax_variants.hf.safetensors_io import SafetensorsFile, write_safetensors
from tests import hf_models as H


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    H.build("llama_gqa_untied", d)
    return d


def _copy_with(src, dst, edit):
    """A copy of a model dir whose tensors went through ``edit(dict)``."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    f = SafetensorsFile(src / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    edit(tensors)
    write_safetensors(dst / "model.safetensors", tensors)
    return dst


def test_plans_a_70b_llama_without_allocating():
    config = T.LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                           num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
    model = hf.from_config(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    total = lv.count_params(shapes).total
    assert 70.5e9 < total < 70.6e9  # Llama-3-70B: 70.55B
    spec = lv.AdapterSpec(targets=r"layers/attn/(q|v)_proj", stacked=model.stacked, r=16)
    planned = jax.eval_shape(lambda p: lv.adapt(p, spec, jax.random.PRNGKey(0)), shapes)
    assert lv.count_params(planned).trainable == 80 * 16 * ((8192 + 8192) + (8192 + 1024))


def test_sharded_bf16_checkpoint_loads_with_dtype(tmp_path):
    torch_model = H.build("gpt2", tmp_path / "src")
    torch_model.to(dtype=__import__("torch").bfloat16).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model, params = hf.from_pretrained(tmp_path / "sharded")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _, params32 = hf.from_pretrained(tmp_path / "sharded", dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(params32)} == {jnp.dtype(jnp.float32)}
    ref = torch_model.transformer.h[1].attn.c_attn.weight.detach().float().numpy()
    np.testing.assert_array_equal(params32["layers"]["attn"]["c_attn"][1], ref)


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=r"model_type 't5' is not supported; supported: \['bert', 'gemma2', .*'qwen3_moe'"):
        hf.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        hf.from_config(T.T5Config())


def test_unknown_rope_type_is_refused():
    config = T.LlamaConfig(**H.SMALL, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported; supported: \('default', 'linear', 'llama3'\)"):
        hf.from_config(config)


def test_custom_code_configs_are_refused(tmp_path, llama_dir):
    raw = json.loads((llama_dir / "config.json").read_text()) | {"auto_map": {"AutoConfig": "x.Y"}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="custom code"):
        hf.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path, llama_dir):
    gone = _copy_with(llama_dir, tmp_path / "gone", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): \['model.layers.1.mlp.up_proj.weight'\]"):
        hf.from_pretrained(gone)
    extra = _copy_with(llama_dir, tmp_path / "extra", lambda t: t.update({"model.layers.0.adapter.weight": np.ones(2, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\): \['model.layers.0.adapter.weight'\]"):
        hf.from_pretrained(extra)
    bad = _copy_with(llama_dir, tmp_path / "bad", lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.ones((32, 16), np.float32)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \(32, 16\).*layers/attn/q_proj"):
        hf.from_pretrained(bad)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.from_pretrained(tmp_path)


def test_to_hf_refuses_nodes_and_save_refuses_existing_dir(tmp_path, llama_dir):
    model, params = hf.from_pretrained(llama_dir)
    adapted = lv.adapt(params, lv.AdapterSpec(targets="layers/attn/q_proj", stacked=model.stacked, r=2), 0)
    with pytest.raises(ValueError, match=r"adapter/quantized nodes: \['layers/attn/q_proj'\].*merge"):
        hf.to_hf(model, adapted)
    hf.save_pretrained(tmp_path / "out", model, lv.merge(adapted))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.save_pretrained(tmp_path / "out", model, params)


def test_task_selection(tmp_path):
    H.build("bert_mlm", tmp_path)
    model, params = hf.from_pretrained(tmp_path, task="base")  # the MLM checkpoint's encoder only
    assert model.task == "base" and "head" not in params
    with pytest.raises(ValueError, match="causal_lm"):
        hf.from_config(T.LlamaConfig(**H.SMALL), task="masked_lm")


REAL = {  # the configs of models people download (public config.json values)
    "Qwen3-8B": lambda: T.Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                      tie_word_embeddings=False, max_position_embeddings=40960),
    "Qwen3-30B-A3B": lambda: T.Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                              moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                              num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                              norm_topk_prob=True, tie_word_embeddings=False),
    "Mixtral-8x7B": lambda: T.MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                            num_local_experts=8, num_experts_per_tok=2),
    "gemma-3-1b": lambda: T.Gemma3TextConfig(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                                             num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                                             head_dim=256, sliding_window=512),
    "gemma-3-27b": lambda: T.Gemma3TextConfig(vocab_size=262208, hidden_size=5376, intermediate_size=21504,
                                              num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16,
                                              head_dim=128, query_pre_attn_scalar=168, sliding_window=1024),
}


@pytest.mark.parametrize("name", list(REAL))
def test_plans_todays_models_at_real_size_without_allocating(name):
    """Parameter counts equal transformers' (built on the meta device: no memory), and LoRA on every projection
    (expert banks too) plans under eval_shape."""
    import torch

    config = REAL[name]()
    with torch.device("meta"):
        theirs = sum(p.numel() for p in T.AutoModelForCausalLM.from_config(config).parameters())
    model = hf.from_config(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert lv.count_params(shapes).total == theirs
    spec = lv.AdapterSpec(targets=r"layers/(attn|mlp|moe)/(?!.*_norm$)(?!router$)\w+_proj", stacked=model.stacked, r=16)
    planned = jax.eval_shape(lambda p: lv.adapt(p, spec, jax.random.PRNGKey(0)), shapes)
    c, r = config, 16
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = r * ((c.hidden_size + c.num_attention_heads * hd) * 2 + 2 * (c.hidden_size + c.num_key_value_heads * hd))
    experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or 1
    ffn = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    per_layer += experts * 3 * r * (c.hidden_size + ffn)
    assert lv.count_params(planned).trainable == c.num_hidden_layers * per_layer


@pytest.mark.parametrize("config, match", [
    (lambda: T.Gemma3TextConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, use_bidirectional_attention=True),
     "use_bidirectional_attention"),
    (lambda: T.Qwen3Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                             "rope_theta": 1e6,
                                                                             "original_max_position_embeddings": 32}),
     "rope_type 'yarn'"),
    (lambda: T.MixtralConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4, router_jitter_noise=0.1), "router_jitter_noise"),
    (lambda: T.Gemma2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            head_dim=8, attention_bias=True), "attention_bias"),
])
def test_options_of_the_new_families_we_do_not_implement_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        hf.from_config(config())
