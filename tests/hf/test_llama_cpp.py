"""llama.cpp itself (through llama-cpp-python, built from the pinned sdist by `make llama-cpp`) runs our GGUF files:
its logits equal ours, its greedy tokens equal our ``generate``, a base GGUF plus our GGUF LoRA adapter gives the
merged model's logits. A tiny random Llama and the real SmolLM2-135M-Instruct (its GGUF, dequantized, with LoRA
factors moved away from their initial values as training moves them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_variants as lv
from lorax_variants.hf import from_gguf, save_gguf, save_gguf_lora
from tests.close import assert_close, rel_error
from tests.hf.gguf_models import SMOLLM, TARGETS

pytestmark = pytest.mark.slow  # CI's `make test-slow` (after building llama-cpp-python once: `make llama-cpp`)


def _llama(path, lora=None):
    try:
        from llama_cpp import Llama
    except ImportError:
        pytest.fail("llama_cpp is not installed: `make llama-cpp` builds the pinned llama-cpp-python wheel (cached in "
                    ".cache/wheels) and installs it")
    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=128, logits_all=True,
                 n_threads=2, seed=0, verbose=False, type_k=0, type_v=0)  # an F32 KV cache (default F16)


def _logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float32)


def _greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        out.append(int(t))
        if len(out) == n:
            break
    return out


def _moved_lora(model, params, seed=2, scale=0.05):
    tree = lv.adapt(params, lv.AdapterSpec(targets=TARGETS, stacked=model.stacked, r=8, alpha=16), jax.random.key(1))
    trainable, frozen = lv.split(tree)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return lv.combine(jax.tree.unflatten(treedef, moved), frozen)


def _check(model, tree, tok, tmp_path, *, tol, greedy=8, source=None):
    """F32 and F16 merged files and base + adapter: llama.cpp's logits and greedy tokens against ours."""
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    ours = np.asarray(model.apply(tree, jnp.asarray([ids])))[0]
    f32 = save_gguf(tmp_path / "m.f32.gguf", model, tree, file_type="f32", tokenizer=source)
    llm = _llama(f32)
    assert_close(_logits(llm, ids), ours, tol)
    want = np.asarray(model.generate(tree, jnp.asarray([ids]), max_new_tokens=greedy))[0, len(ids):].tolist()
    assert _greedy(llm, ids, greedy) == want
    base = save_gguf(tmp_path / "base.f32.gguf", model, lv.merge(_base(tree)), file_type="f32", tokenizer=source)
    adapter = save_gguf_lora(tmp_path / "lora.gguf", model, tree)
    assert_close(_logits(_llama(base, adapter), ids), ours, tol)
    errors = {}
    for kind in ("f16", "q8_0"):  # within each type's rounding (Q8_0: weights and, in ggml's dot products, the
        path = save_gguf(tmp_path / f"m.{kind}.gguf", model, tree, file_type=kind, tokenizer=source)  # activations)
        got = _logits(_llama(path), ids)
        errors[kind] = rel_error(got, ours)
        errors[f"{kind} top-1 agreement"] = float(np.mean(got.argmax(-1) == ours.argmax(-1)))
    assert errors["f16"] < 5e-3 and errors["q8_0"] < 0.1, errors
    assert errors["f16 top-1 agreement"] >= 0.9 and errors["q8_0 top-1 agreement"] >= 0.8, errors
    return errors


def _base(tree):
    """The tree with every adapter's product removed (B = 0): the base weights the adapters were trained over."""
    return lv.map_with_paths(lambda p, n: n.replace(lora_b=jnp.zeros_like(n.lora_b)) if isinstance(n, lv.LoraNode)
                             else n, tree, nodes_are_leaves=True)


def test_tiny_llama_runs_in_llama_cpp_with_our_logits(gguf_bases, smol_tokenizer, tmp_path):
    d, model, _ = gguf_bases("llama")
    params = lv.merge(gguf_bases("llama")[2])
    _check(model, _moved_lora(model, params), smol_tokenizer, tmp_path, tol=1e-4, source=d)


def test_smollm2_135m_after_lora_runs_in_llama_cpp_with_our_logits(smol_tokenizer, tmp_path):
    model, params = from_gguf(SMOLLM)
    errors = _check(model, _moved_lora(model, params, scale=0.02), smol_tokenizer, tmp_path, tol=1e-4)
    print(f"SmolLM2-135M after LoRA, llama.cpp vs ours, max |diff| / max |logit|: {errors}")


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_tiny_moe_runs_in_llama_cpp_with_our_logits(gguf_bases, smol_tokenizer, arch, tmp_path):
    """Merged MoE files (adapters on attention and on every expert bank): llama.cpp's stacked-expert models give our
    logits and greedy tokens (expert adapters are not written as GGUF LoRA: merged only)."""
    d, model, tree = gguf_bases(arch)
    text = smol_tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                              add_generation_prompt=True)
    ids = smol_tokenizer(text)["input_ids"]
    ours = np.asarray(model.apply(tree, jnp.asarray([ids])))[0]
    llm = _llama(save_gguf(tmp_path / "m.gguf", model, tree, file_type="f32", tokenizer=d))
    assert_close(_logits(llm, ids), ours, 1e-4)
    want = np.asarray(model.generate(tree, jnp.asarray([ids]), max_new_tokens=8))[0, len(ids):].tolist()
    assert _greedy(llm, ids, 8) == want
    with pytest.raises(ValueError, match="layers/moe/.*expert-bank adapters are not written as GGUF LoRA"):
        save_gguf_lora(tmp_path / "lora.gguf", model, tree)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_sentencepiece_vocabulary_tokenizes_in_llama_cpp_as_transformers(arch, tmp_path):
    """A model with a SentencePiece tokenizer.model (Llama 2 style; Gemma 2, whose llama.cpp model takes nothing
    else): llama.cpp tokenizes as transformers does and its logits of our F32 file equal ours."""
    from tests.hf.gguf_models import spm_model

    d = tmp_path / "hf"
    tok, model, params = spm_model(d, arch)
    tree = _moved_lora(model, params)
    llm = _llama(save_gguf(tmp_path / "m.gguf", model, tree, file_type="f32", tokenizer=d))
    for text in ("The quick brown fox, 3 + 4 = 7.", "hello world 12 apples and oranges", "bytes: ünïcödé 日本"):
        want = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=tok.bos_token_id in want[:1], special=True) == want, text
    ids = tok("Paris is the capital of France. The quick brown fox")["input_ids"]
    # Gemma 2's GELU: ggml evaluates it from an fp16 table on CPU (~2e-4 from the first position on, window or not)
    assert_close(_logits(llm, ids), np.asarray(model.apply(tree, jnp.asarray([ids])))[0], 1e-4 if arch == "llama" else 1e-3)
