"""lm-evaluation-harness over our models: ``LoraxLM``, registered as lm-eval's model ``lorax_variants``.

    from lorax_variants.harness import LoraxLM
    import lm_eval
    lm = LoraxLM(model, tree, tokenizer)             # any adapted tree, any variant (or pretrained=, peft=)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

    python -m lorax_variants.harness --model lorax_variants --model_args pretrained=DIR,peft=ADAPTER --tasks hellaswag

(lm-eval finds no model by plugin: this module registers ``lorax_variants`` when imported, and its ``__main__``
is lm-eval's own command line with it registered; ``python -m train eval --harness`` runs a training run.)

Requests are scored the way lm-eval's ``hf`` model scores them, so the scores are comparable with it:

- ``loglikelihood``: the context and continuation tokenized as lm-eval's ``TemplateLM`` does (trailing spaces
  moved to the continuation; an empty context gets the prefix token, BOS or else EOS), truncated from the left
  to ``max_length`` + 1 tokens; the sum of the continuation's log-probabilities and whether each of its
  tokens is the greedy one;
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` over the whole text;
- ``generate_until``: greedy (or, with ``do_sample`` and a temperature, sampled from a seeded key) through our
  KV-cache ``generate``, stopped at EOS, decoded without special tokens and cut at the first stop sequence.

``max_length`` is resolved as lm-eval resolves it (the config's positions, the tokenizer's limit, 2048).
Batches of ``batch_size`` rows are padded to a multiple of ``bucket`` tokens, so a task compiles a handful of
shapes; the log-probabilities are taken inside the compiled function (no ``[B, T, V]`` array leaves the device).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)

from lorax_variants.hf import from_pretrained, load_peft
from lorax_variants.hf.gguf import gguf_tokenizer
from lorax_variants.ops import one_adapter

__all__ = ["LoraxLM", "main"]


@register_model("lorax_variants")
class LoraxLM(TemplateLM):
    """An lm-eval model over ``model.apply`` / ``model.generate`` and an adapted tree (see the module docstring).

    Either ``model``, ``tree`` and ``tokenizer`` (a transformers tokenizer), or ``pretrained`` (a transformers
    directory or a ``.gguf`` file, read with ``hf.from_pretrained``) and optionally ``peft`` (a PEFT adapter
    directory, read with ``hf.load_peft``) and ``dtype``. ``adapter``: with many adapters in one tree, the one
    to evaluate. ``add_bos_token``: as lm-eval's ``hf`` model (None: the tokenizer's own rule)."""

    def __init__(self, model: Any = None, tree: Any = None, tokenizer: Any = None, *, pretrained: str | None = None,
                 peft: str | None = None, dtype: str | None = None, adapter: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, bucket: int = 64, seed: int = 0, **ignored: Any):
        super().__init__()
        unknown = sorted(k for k in ignored if k not in ("device", "max_batch_size", "trust_remote_code", "parallelize"))
        if unknown:
            raise ValueError(f"LoraxLM: unknown model argument(s) {unknown}")
        if ignored.get("trust_remote_code") not in (None, False, "False", "false"):
            raise ValueError("LoraxLM: trust_remote_code is never used here")
        if model is None:
            if pretrained is None:
                raise ValueError("LoraxLM: pass model, tree and tokenizer, or pretrained=<a transformers directory or "
                                 "a .gguf file>")
            model, tree, tokenizer = _load(pretrained, peft, dtype)
        elif tree is None or tokenizer is None:
            raise ValueError("LoraxLM: model= needs tree= (its params or adapted tree) and tokenizer=")
        if not getattr(model, "causal", False):
            raise ValueError(f"LoraxLM: {model.config.model_type} is not a causal language model")
        if adapter is not None:
            tree = one_adapter(tree, adapter)
        self.model, self.tree, self.tokenizer = model, tree, tokenizer
        # lm-eval bootstraps some metrics' stderr in a forked multiprocessing pool; a fork of a process running JAX's
        # threads can deadlock, so its single-process path is chosen (set DISABLE_MULTIPROC= "" to undo)
        os.environ.setdefault("DISABLE_MULTIPROC", "1")
        self.batch_size_per_step = 8 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size_per_step < 1:
            raise ValueError(f"LoraxLM: batch_size must be >= 1, got {batch_size}")
        self._max_length = int(max_length) if max_length else resolve_max_length(
            getattr(model, "hf_config", None) or model.config, tokenizer)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token if not isinstance(add_bos_token, str) else add_bos_token.lower() == "true"
        self.bucket = int(bucket)
        self.key = jax.random.key(int(seed))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        config_eos = getattr(getattr(model, "hf_config", None), "eos_token_id", None)
        eos |= set(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos] if config_eos is not None else [])
        self.stops = sorted(eos)

        def score(tree: Any, ids: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits = model.apply(tree, ids).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return picked, jnp.argmax(logits, axis=-1) == targets

        self._score = jax.jit(score)

    # ---- what lm-eval asks of a TemplateLM ----
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids as lm-eval's ``hf`` model encodes (no second BOS for a text that starts with one)."""
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}  # the text already starts with BOS
        else:
            special = {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        """The tokenizer's text of ``tokens``."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _width(self, n: int) -> int:
        return min(-(-n // self.bucket) * self.bucket, max(self._max_length, n))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        bs = self.batch_size_per_step
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            rows = []
            for i in idx:
                _, context, continuation = requests[i]
                if not context or not continuation:
                    raise ValueError(f"loglikelihood request {i}: empty context or continuation tokens")
                whole = (context + continuation)[-(self._max_length + 1):]
                rows.append((whole[:-1], whole[1:], len(continuation)))
            width = self._width(max(len(r[0]) for r in rows))
            ids = np.full((bs, width), self.pad, np.int32)
            targets = np.zeros((bs, width), np.int32)
            for r, (inp, tgt, _) in enumerate(rows):
                ids[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
            logp, greedy = jax.device_get(self._score(self.tree, jnp.asarray(ids), jnp.asarray(targets)))
            for r, (i, (inp, _, k)) in enumerate(zip(idx, rows)):
                n = len(inp)
                answer = (float(np.sum(logp[r, n - k:n], dtype=np.float64)), bool(np.all(greedy[r, n - k:n])))
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's disjoint rolling windows of ``max_length`` tokens."""
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append((None, *w))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for k, (s, _) in zip(owner, scores):
            totals[k] += s
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations through ``generate``, cut at the first stop sequence."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False) if self.eot_token_id is not None \
            else None
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            room = self._max_length - max_new
            if room <= 0:
                raise ValueError(f"generate_until: max_gen_toks {max_new} leaves no room for the context in "
                                 f"max_length {self._max_length}")
            prompts = [self._prompt_ids(requests[i].args[0])[-room:] for i in idx]
            for start in range(0, len(idx), self.batch_size_per_step):
                chunk = list(range(start, min(start + self.batch_size_per_step, len(idx))))
                for j, text in zip(chunk, self._generate([prompts[j] for j in chunk], max_new, temperature)):
                    s = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                    out[idx[j]] = s
                    self.cache_hook.add_partial("generate_until", requests[idx[j]].args, s)
        return out  # type: ignore[return-value]

    # ---- helpers ----
    def _prompt_ids(self, text: str) -> list[int]:
        """A generation prompt's tokens, as lm-eval's ``hf`` model encodes a batch of them."""
        if has_bos_prefix(text, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        else:
            special = {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}
        return self.tokenizer(text, **special)["input_ids"]

    def _generate(self, prompts: list[list[int]], max_new: int, temperature: float) -> list[str]:
        bs = self.batch_size_per_step
        width = self._width(max(len(p) for p in prompts))
        ids = np.full((bs, width), self.pad, np.int32)
        mask = np.zeros((bs, width), np.int32)
        for r, p in enumerate(prompts):
            ids[r, :len(p)], mask[r, :len(p)] = p, 1
        key = None
        if temperature > 0:
            self.key, key = jax.random.split(self.key)
        rows = np.asarray(jax.device_get(self.model.generate(
            self.tree, jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=max_new,
            temperature=temperature, key=key, stop_tokens=self.stops or None, pad_token_id=self.pad)))[:, width:]
        texts = []
        for row in rows[:len(prompts)].tolist():
            end = next((k for k, t in enumerate(row) if t in self.stops), len(row))
            texts.append(self.tok_decode(row[:end]))
        return texts


def _load(pretrained: str, peft: str | None, dtype: str | None) -> tuple[Any, Any, Any]:
    path = Path(pretrained)
    model, params = from_pretrained(path, dtype=None if dtype in (None, "auto") else jnp.dtype(dtype))
    if path.suffix == ".gguf":
        tokenizer = gguf_tokenizer(path)
    else:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tree = load_peft(peft, model, params) if peft else params
    return model, tree, tokenizer


def main(argv: list[str] | None = None) -> Any:
    """lm-eval's command line (``lm_eval ...``) with ``--model lorax_variants`` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return cli_evaluate()


if __name__ == "__main__":
    main()
