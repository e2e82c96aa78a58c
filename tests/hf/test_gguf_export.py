"""GGUF export: our file against llama.cpp's own converter, and read back by transformers and by us.

The reference is llama.cpp's ``convert_hf_to_gguf.py`` (from the pinned llama-cpp-python sdist, which vendors
llama.cpp; `make` unpacks it into the asset cache) run on our merged transformers export of the same adapted
tree: every tensor must be the same bytes of the same type and shape, every metadata field the same value,
apart from the descriptive ``general.*`` names. Then transformers' GGUF loader reads our file with our logits.
Tiny random models built here with transformers, tokenized with the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import lorax_variants as lv
from lorax_variants.hf import from_gguf, from_pretrained, save_gguf, save_gguf_lora, save_merged, save_peft
from lorax_variants.hf.build import from_config
from lorax_variants.hf.gguf import gguf_hf_config
from tests.close import assert_close

from tests.hf.gguf_models import ARCHS, CONVERTED, CONVERTER, SMOLLM, TARGETS  # noqa: F401 - SMOLLM: other tests' too


def converted(merged_dir: Path, out: Path, file_type: str) -> Path:
    """llama.cpp's converter on a transformers directory (its own vendored gguf-py, in a fresh process)."""
    if not CONVERTER.is_file():
        pytest.fail(f"{CONVERTER} is missing: `make assets` unpacks it from the pinned llama-cpp-python sdist")
    r = subprocess.run([sys.executable, str(CONVERTER), str(merged_dir), "--outfile", str(out), "--outtype", file_type],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


DESCRIPTIVE = ("general.name", "general.size_label", "general.basename", "general.finetune", "GGUF.kv_count")


def assert_same_gguf(ours: Path, theirs: Path) -> None:
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    fa = {k: f for k, f in a.fields.items() if k not in DESCRIPTIVE}
    fb = {k: f for k, f in b.fields.items() if k not in DESCRIPTIVE}
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].types == fb[k].types and fa[k].contents() == fb[k].contents(), k
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    for n, t in ta.items():
        u = tb[n]
        assert (t.tensor_type, list(t.shape)) == (u.tensor_type, list(u.shape)), n
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)), n


# A 49k-token vocabulary makes each case ~15 s (the converter's and the readers' per-token loops): the default
# run converts one; every architecture and type runs under slow (CI's `make test-slow`).
CASES = [("llama", "q8_0")]
SLOW = [(a, t) for a in CONVERTED for t in ("f32", "f16", "bf16", "q8_0") if (a, t) not in CASES]


@pytest.mark.parametrize("arch,file_type", CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW])
def test_the_same_file_as_llama_cpps_converter(gguf_bases, arch, file_type, tmp_path):
    d, model, tree = gguf_bases(arch)
    ours = save_gguf(tmp_path / "ours.gguf", model, tree, file_type=file_type, tokenizer=d)
    merged = save_merged(tmp_path / "merged", model, tree, dtype=jnp.float32, tokenizer_from=d)
    assert_same_gguf(ours, converted(merged, tmp_path / "theirs.gguf", file_type))


def _logits(model, tree, ids):
    return np.asarray(model.apply(tree, jnp.asarray(ids)))


def converted_lora(peft_dir: Path, base_dir: Path, out: Path, file_type: str) -> Path:
    r = subprocess.run([sys.executable, str(CONVERTER.with_name("convert_lora_to_gguf.py")), str(peft_dir), "--base",
                        str(base_dir), "--outfile", str(out), "--outtype", file_type], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


LORA_CASES = [("llama", "f32"), ("qwen3", "q8_0"), ("mistral", "f16"), ("llama", "bf16")]


@pytest.mark.slow  # CI's `make test-slow` (~10 s a case); the default run compares a merged file
@pytest.mark.parametrize("arch,file_type", LORA_CASES)
def test_the_same_lora_adapter_as_llama_cpps_converter(gguf_bases, arch, file_type, tmp_path):
    """Our GGUF LoRA file against convert_lora_to_gguf.py on our PEFT export of the same adapters."""
    d, model, tree = gguf_bases(arch)
    ours = save_gguf_lora(tmp_path / "ours.gguf", model, tree, file_type=file_type)
    peft_dir = save_peft(tmp_path / "peft", model, tree, base_model=str(d))
    assert_same_gguf(ours, converted_lora(peft_dir, d, tmp_path / "theirs.gguf", file_type))


def test_lora_adapter_refusals_and_folded_scales(gguf_bases, tmp_path):
    d, model, _ = gguf_bases("llama")
    params = lv.merge(gguf_bases("llama")[2])
    dora = lv.adapt(params, lv.AdapterSpec(targets=TARGETS, stacked=model.stacked, r=4, variant="dora"), jax.random.key(1))
    with pytest.raises(ValueError, match="DoraNode does not reduce to LoRA"):
        save_gguf_lora(tmp_path / "a.gguf", model, dora)
    with pytest.raises(ValueError, match="a GGUF LoRA adapter is written in f32, f16, bf16 or q8_0"):
        save_gguf_lora(tmp_path / "a.gguf", model, dora, file_type="q4_0")
    # two scales (a rank pattern): folded into lora_b, alpha 0 (llama.cpp's "scale 1"); the products are ours
    spec = lv.AdapterSpec(targets=TARGETS, stacked=model.stacked, r=4, alpha=8, rank_pattern=((r"layers/mlp/\w+", 2),))
    tree = lv.adapt(params, spec, jax.random.key(3))
    tr, fr = lv.split(tree)
    leaves, td = jax.tree.flatten(tr)
    tree = lv.combine(jax.tree.unflatten(td, [x + 0.1 for x in leaves]), fr)
    path = save_gguf_lora(tmp_path / "folded.gguf", model, tree)
    r = gguf.GGUFReader(str(path))
    assert r.fields["adapter.lora.alpha"].contents() == 0.0
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    node = dict(lv.leaves_with_paths(tree, nodes_are_leaves=True))["layers/mlp/down_proj"]
    want = float(node.scale) * np.asarray(node.lora_a[1]) @ np.asarray(node.lora_b[1])  # [in, out]
    assert_close(t["blk.1.ffn_down.weight.lora_a"].T @ t["blk.1.ffn_down.weight.lora_b"].T, want, 1e-6)


# (gemma3_padded: the converter cuts the embedding to the tokenizer.json count, below the token list it writes;
# no reader loads that, the converter's file no more than ours: it is compared with the converter's only)
# all under slow (~40 s a case; CI's `make test-slow`): the default run has the converter's byte equality
@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma3_padded"])
def test_transformers_reads_our_file_with_our_logits_and_tokenizer(gguf_bases, smol_tokenizer, arch, tmp_path):
    d, model, tree = gguf_bases(arch)
    path = save_gguf(tmp_path / "m.gguf", model, tree, file_type="f32", tokenizer=d)
    ids = np.asarray([smol_tokenizer("The capital of France is Paris. 3 + 4 = 7")["input_ids"]])
    ours = _logits(model, tree, ids)
    if arch not in ("llama31", "mixtral"):
        # transformers' GGUF loader drops rope_freqs (Llama 3.1's RoPE scaling) and reads llama.cpp's Mixtral (a
        # llama file with experts) as a dense Llama: those two are not comparable. For Qwen3-MoE it leaves the
        # expert width at its default: the config is given, with the width the file records.
        config = gguf_hf_config(path) if arch == "qwen3_moe" else None
        with torch.no_grad():
            hf = T.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                        config=config).eval()
            ref = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
        assert_close(ours, ref, 1e-5)
    # our own GGUF import (Gemma: norms stored + 1, read - 1; Llama 3.1: its RoPE parameters from rope_freqs)
    back_model, back = from_gguf(path)
    assert_close(_logits(back_model, back, ids), ours, 1e-5)
    tok = T.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                         add_generation_prompt=True)
    assert tok.chat_template == smol_tokenizer.chat_template
    assert tok(text)["input_ids"] == smol_tokenizer(text)["input_ids"]


@pytest.mark.slow  # ~25 s: three GGUF parses of the 49k vocabulary (the default run converts and reads back)
def test_a_gguf_base_round_trips_with_its_own_tokenizer_fields(gguf_bases, tmp_path):
    """A model loaded from GGUF exports its tokenizer fields as they were, and an unadapted F32 round trip
    writes the same tensors."""
    d, model, tree = gguf_bases("llama")
    first = save_gguf(tmp_path / "first.gguf", model, lv.merge(tree), file_type="f32", tokenizer=d)
    model2, params2 = from_gguf(first)
    second = save_gguf(tmp_path / "second.gguf", model2, params2, file_type="f32")  # tokenizer: the file's own
    assert_same_gguf(second, first)
    # quantized: within the block quantizer's error, and Q8_0 exactly what gguf's quantizer makes of our weights
    q8 = save_gguf(tmp_path / "q8.gguf", model2, params2, file_type="q8_0")
    _, back = from_gguf(q8)
    for (p, a), (_, b) in zip(lv.leaves_with_paths(back), lv.leaves_with_paths(params2)):
        # Q8_0: |err| <= d/2 + 127 |d - fp16(d)|, d = max |block| / 127; vectors and norms stay F32
        tol = (0.5 + 127 * 2**-11) / 127 if np.ndim(a) >= 2 else 0.0
        assert_close(np.asarray(a), np.asarray(b), tol + 1e-7)


def test_bad_input_is_named(gguf_bases, tmp_path):
    d, model, tree = gguf_bases("llama")
    with pytest.raises(ValueError, match="file_type 'q4_k' is not one gguf can write"):
        save_gguf(tmp_path / "a.gguf", model, tree, file_type="q4_k", tokenizer=d)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        save_gguf(tmp_path / "a.gguf", model, tree)
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model there"):
        save_gguf(tmp_path / "a.gguf", model, tree, tokenizer=tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="a.gguf exists"):
        save_gguf(tmp_path / "a.gguf", model, tree, tokenizer=d)
    gpt2 = T.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2)
    T.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / "gpt2")
    m, p = from_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="gpt2: no GGUF export for this architecture"):
        save_gguf(tmp_path / "b.gguf", m, p, tokenizer=d)
    moe = from_config(T.Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, num_experts=2, norm_topk_prob=False))
    with pytest.raises(ValueError, match="norm_topk_prob=False: llama.cpp's qwen3moe always renormalizes"):
        save_gguf(tmp_path / "c.gguf", moe, {}, tokenizer=d)


def test_llama31_rope_parameters_are_recovered_from_rope_freqs():
    """Llama 3.1/3.2's parameters (theta 500000, factor 8, low 1, high 4, original 8192, head_dim 128) from the
    factors the converter writes (our writer's equal the converter's: the llama31 cases above)."""
    from lorax_variants.hf.gguf import _llama3_rope
    from lorax_variants.hf.gguf_export import _llama3_factors

    want = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    factors = _llama3_factors(dict(rope_parameters=want, head_dim=128, hidden_size=4096, num_attention_heads=32))
    got = _llama3_rope(factors.astype(np.float64), 500000.0, 128, Path("x.gguf"))
    assert got["rope_type"] == "llama3" and got["factor"] == 8.0 and got["low_freq_factor"] == 1.0
    assert abs(got["high_freq_factor"] - 4.0) < 1e-4 and abs(got["original_max_position_embeddings"] - 8192) < 1e-2
    with pytest.raises(ValueError, match="x.gguf: rope_freqs.weight is not Llama 3.1's RoPE scaling"):
        _llama3_rope(np.ones(64), 500000.0, 128, Path("x.gguf"))


@pytest.mark.slow  # ~30 s: the converter and two GGUF parses of the 49k vocabulary per architecture
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_files_of_llama_cpps_converter_load_as_transformers_runs_them(smol_tokenizer, arch, tmp_path):
    """Stacked expert tensors in: a tiny MoE checkpoint through llama.cpp's converter, read by us, gives
    transformers' logits for the checkpoint; Qwen3-MoE also equals transformers' own GGUF loader (given the expert
    width from the file). Mixtral comes back as Mixtral, though the file says ``llama``."""
    cls, config = ARCHS[arch](len(smol_tokenizer))
    torch.manual_seed(0)
    hf = cls(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    smol_tokenizer.save_pretrained(tmp_path / "hf")
    path = converted(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    ids = np.asarray([smol_tokenizer("The capital of France is Paris. 3 + 4 = 7")["input_ids"]])
    model, params = from_gguf(path)
    assert model.config.model_type == arch
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
    ours = _logits(model, params, ids)
    assert_close(ours, ref, 1e-5)
    if arch == "qwen3_moe":
        with torch.no_grad():
            theirs = T.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                            config=gguf_hf_config(path)).eval()
            assert_close(ours, theirs(input_ids=torch.as_tensor(ids)).logits.numpy(), 1e-5)


@pytest.mark.slow  # ~10 s a case (CI's `make test-slow`)
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_sentencepiece_tokenizers_as_llama_cpps_converter_writes_them(arch, tmp_path):
    """A transformers directory with a SentencePiece ``tokenizer.model`` (Llama 2 / Mistral / Gemma style): pieces,
    scores, types, special ids and ``add_space_prefix`` as the converter writes them, so also Gemma 2 (whose
    converter reads nothing else) is checked byte for byte."""
    from tests.hf.gguf_models import spm_model

    d = tmp_path / "hf"
    _, model, params = spm_model(d, arch)
    tree = lv.adapt(params, lv.AdapterSpec(targets=TARGETS, stacked=model.stacked, r=2), jax.random.key(1))
    ours = save_gguf(tmp_path / "ours.gguf", model, tree, file_type="f16", tokenizer=d)
    merged = save_merged(tmp_path / "merged", model, tree, dtype=jnp.float32, tokenizer_from=d)
    for f in ("tokenizer.model",):  # the merged export copies the tokenizer files transformers saves
        if not (merged / f).exists():
            (merged / f).write_bytes((d / f).read_bytes())
    assert_same_gguf(ours, converted(merged, tmp_path / "theirs.gguf", "f16"))
    r = gguf.GGUFReader(str(ours))
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
