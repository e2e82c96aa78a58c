"""Every architecture against transformers (torch CPU) on tiny random models saved locally."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lorax_variants as lv
from lorax_variants import hf
from tests import hf_models as H
from tests.close import assert_close

NAMES = list(H.CONFIGS)
# Configs whose export path and adapters another config already covers (same code, other options): their
# round-trip and adapted-model tests run under -m slow (the default run is time-boxed); logits stay in it.
COVERED = {"llama_linear_rope", "mistral_window", "qwen2_layer_windows", "gpt2_untied", "bert_mlm", "roberta_mlm",
           "gemma2_softcap", "mixtral"}


def _saved(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    torch_model = H.build(request.param, d)
    model, params = hf.from_pretrained(d)
    return request.param, d, torch_model, model, params


@pytest.fixture(scope="module", params=NAMES)
def saved(request, tmp_path_factory):
    return _saved(request, tmp_path_factory)


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in COVERED else n for n in NAMES])
def saved_core(request, tmp_path_factory):
    return _saved(request, tmp_path_factory)


def _compare(torch_model, model, params, ids, mask):
    ref = H.torch_out(torch_model, ids, mask)
    ours = np.asarray(model.apply(params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))
    assert ours.shape == ref.shape
    if mask is not None and ref.ndim == 3:  # outputs at padding positions are unspecified
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    assert_close(ours, ref, 2e-4)


def _pad_id(torch_model):
    return torch_model.config.pad_token_id if torch_model.config.pad_token_id is not None else 0


def test_logits_equal_transformers_with_and_without_padding(saved):
    name, _, torch_model, model, params = saved
    ids, mask = H.inputs(torch_model.config.vocab_size, _pad_id(torch_model))
    _compare(torch_model, model, params, ids, None)
    _compare(torch_model, model, params, ids, mask)
    if model.causal:
        ids, mask = H.inputs(torch_model.config.vocab_size, _pad_id(torch_model), left=True)
        _compare(torch_model, model, params, ids, mask)


def test_round_trip_through_to_hf_loads_in_transformers(saved_core, tmp_path):
    name, _, torch_model, model, params = saved_core
    out = hf.save_pretrained(tmp_path / "export", model, params)
    cls = type(torch_model)
    reloaded = cls.from_pretrained(out).eval()
    ids, mask = H.inputs(torch_model.config.vocab_size, _pad_id(torch_model), seed=1)
    assert_close(H.torch_out(reloaded, ids, mask), H.torch_out(torch_model, ids, mask), 5e-7)
    # And our reader gives back the same params.
    _, again = hf.from_pretrained(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_adapted_model_at_init_equals_base(saved_core):
    name, _, torch_model, model, params = saved_core
    targets = r"layers/(attn|mlp|moe)/\w+" + r"(?<!_bias)(?<!_norm)(?<!router)"  # every projection and expert bank
    spec = lv.AdapterSpec(targets=targets, stacked=model.stacked, r=2)
    adapted = lv.adapt(params, spec, 0)
    assert lv.count_params(adapted).trainable > 0
    ids, mask = H.inputs(torch_model.config.vocab_size, _pad_id(torch_model))
    # B = 0: equal up to XLA compiling the two graphs differently (fusion order), far below 1e-5 of their scale.
    ids_, mask_ = jnp.asarray(ids), jnp.asarray(mask)
    assert_close(model.apply(adapted, ids_, mask_), model.apply(params, ids_, mask_), 1e-5)
    # With non-zero adapters: factored (per-layer A, B under scan) equals the merged weights.
    moved = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.05) if isinstance(n, lv.LoraNode) else n,
                         adapted, is_leaf=lambda n: isinstance(n, lv.LoraNode))
    assert_close(model.apply(moved, jnp.asarray(ids)), model.apply(lv.merge(moved), jnp.asarray(ids)), 2e-4)


@pytest.mark.parametrize("name", ["llama_gqa_untied"] + [  # the others under slow (CI's `make test-slow`)
    pytest.param(n, marks=pytest.mark.slow) for n in ("gemma3", "qwen3_moe", "gpt2", "qwen3_windows", "gemma2_softcap",
                                                      "mixtral")])
def test_greedy_generate_equals_transformers(name, tmp_path):
    torch_model = H.build(name, tmp_path)
    model, params = hf.from_pretrained(tmp_path)
    ids, mask = H.inputs(torch_model.config.vocab_size, 0, batch=2, seq=6, left=True)
    with torch.no_grad():
        ref = torch_model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=8,
                                   do_sample=False, pad_token_id=0).numpy()
    eos = torch_model.generation_config.eos_token_id
    ours = np.asarray(model.generate(params, ids, attention_mask=mask, max_new_tokens=8, stop_tokens=eos, pad_token_id=0))
    np.testing.assert_array_equal(ours, ref)  # a row that emits EOS is padded after it, as transformers does
    sampled = model.generate(params, ids, attention_mask=mask, max_new_tokens=4, temperature=1.0, key=jax.random.key(0))
    assert sampled.shape == (2, 10) and np.array_equal(np.asarray(sampled[:, :6]), ids)


def test_the_text_model_of_a_multimodal_gemma3_checkpoint(tmp_path):
    """Gemma 3 4B+ ship as Gemma3ForConditionalGeneration (vision tower + language model): we load the language
    model; its logits on text equal transformers' multimodal model's, and it exports as a text-only Gemma 3."""
    import transformers as T

    text = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, head_dim=8, sliding_window=3, pad_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    torch_model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=text, vision_config=vision,
                                                                  mm_tokens_per_image=4)).eval()
    with torch.no_grad():
        for n, p in torch_model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    torch_model.save_pretrained(tmp_path / "mm")
    model, params = hf.from_pretrained(tmp_path / "mm")
    assert model.config.model_type == "gemma3_text"
    ids, mask = H.inputs(96, 0)
    _compare(torch_model, model, params, ids, mask)
    out = hf.save_pretrained(tmp_path / "text", model, params)
    reloaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    real = mask.astype(bool)
    assert_close(H.torch_out(reloaded, ids, mask)[real], H.torch_out(torch_model, ids, mask)[real], 5e-4)
