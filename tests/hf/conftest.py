"""Fixtures of the GGUF tests: tiny random transformers models with the real SmolLM2 tokenizer, adapted with
moved LoRA factors (B = 0 at init would hide a wrong merge)."""

from __future__ import annotations

import jax
import pytest
import torch

import lorax_variants as lv
from lorax_variants.hf import from_pretrained
from lorax_variants.hf.gguf import gguf_tokenizer
from tests.hf.gguf_models import ARCHS, SMOLLM, TARGETS


@pytest.fixture(scope="session")
def smol_tokenizer():
    if not SMOLLM.is_file():
        pytest.fail(f"{SMOLLM} is missing: `make assets` fetches it (pinned, checksum checked)")
    return gguf_tokenizer(SMOLLM)


@pytest.fixture(scope="session")
def gguf_bases(smol_tokenizer, tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            d = tmp_path_factory.mktemp(arch)
            cls, config = ARCHS[arch](len(smol_tokenizer))
            torch.manual_seed(0)
            cls(config).save_pretrained(d)
            smol_tokenizer.save_pretrained(d)
            model, params = from_pretrained(d)
            tree = lv.adapt(params, lv.AdapterSpec(targets=TARGETS, stacked=model.stacked, r=4, alpha=8), jax.random.key(1))
            trainable, frozen = lv.split(tree)  # B = 0 at init would hide a wrong merge: move every factor
            leaves, treedef = jax.tree.flatten(trainable)
            keys = jax.random.split(jax.random.key(2), len(leaves))
            moved = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
            made[arch] = d, model, lv.combine(jax.tree.unflatten(treedef, moved), frozen)
        return made[arch]

    return get


