"""GGUF files (llama.cpp) as our models: ``from_gguf(path)``, also ``from_pretrained("model.gguf")``.

Read with the ``gguf`` package (llama.cpp's own reader, memory-mapped): every quantization type its
``gguf.quants.dequantize`` knows (F32/F16/BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, the I-quants,
...). The config and the tokenizer come from the file's metadata through transformers' GGUF support
(``AutoConfig`` / ``AutoTokenizer`` with ``gguf_file=``: a fast tokenizer, chat template kept). Tensor
names map through gguf's ``TensorNameMap`` (the table llama.cpp's converter writes with). llama.cpp's
converter permutes the rows of q and k of Llama-architecture models for its interleaved RoPE:

    w_gguf = w.reshape(heads, 2, d/heads/2, in).swapaxes(1, 2).reshape(d, in)

and we undo it, ``w = w_gguf.reshape(heads, d/heads/2, 2, in).swapaxes(1, 2).reshape(d, in)`` (``heads`` =
key-value heads for k). Gemma's norms are stored as w + 1 (llama.cpp multiplies by w, Gemma by 1 + w) and read
back as w. Mixtures of experts (qwen3moe; Mixtral, which llama.cpp writes as ``llama`` with ``expert_count``)
hold each layer's experts stacked, ``ffn_{gate,up,down}_exps [E, out, in]``: an expert's tensor is its slice,
and the stack is dequantized once for all its experts. Llama 3.1's RoPE scaling is recorded only as the ``rope_freqs`` factors: its parameters are
recovered from them. Tensors are dequantized one at a time as they are
read (``GGUFTensors`` is a lazy mapping), so ``quantize=QuantSpec(...)`` re-quantizes to NF4 with a peak
of the quantized model plus one float tensor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lorax_variants.hf import names
from lorax_variants.hf.build import from_config, load_params

__all__ = ["from_gguf", "gguf_tokenizer", "gguf_config", "gguf_hf_config", "GGUFTensors", "ARCHITECTURES"]

# GGUF general.architecture -> whether llama.cpp permuted q/k rows (Llama's converter does; Qwen's do not).
ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False, "qwen3moe": False, "gemma2": False, "gemma3": False}
# Gemma's norms: llama.cpp's converter stores w + 1 (llama.cpp multiplies by w, Gemma's RMSNorm by 1 + w)
NORM_SHIFT = {"gemma2": 1.0, "gemma3": 1.0}


def tensor_name_map(arch: str, layers: int) -> Any:
    """gguf's ``TensorNameMap`` (transformers' names <-> llama.cpp's) for a GGUF architecture name."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, layers)
_IGNORED = (r"rope_freqs\.weight",)  # llama.cpp's precomputed RoPE factors (we compute them from the config)


def _reader(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds on a damaged file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _arch(reader: Any, path: Path) -> str:
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    return arch


def gguf_config(path: str | os.PathLike, reader: Any = None) -> Any:
    """The transformers config in a GGUF file's metadata (``reader``: the file's open ``GGUFReader``, if the
    caller has one: opening one parses every metadata field, ~5 s for a 49k-token vocabulary)."""
    import transformers

    p = Path(path)
    reader = reader if reader is not None else _reader(p)
    arch = _arch(reader, p)
    config = transformers.AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    key_length = reader.fields.get(f"{arch}.attention.key_length")
    if key_length is not None:  # transformers' qwen3 table leaves head_dim at its default (128)
        config.head_dim = int(key_length.contents())
    expert_ff = reader.fields.get(f"{arch}.expert_feed_forward_length")
    if arch == "qwen3moe" and expert_ff is not None:  # transformers' table leaves it at its default (768)
        config.moe_intermediate_size = int(expert_ff.contents())
    experts = reader.fields.get(f"{arch}.expert_count")
    if arch == "llama" and experts is not None and int(experts.contents()) > 0:
        config = _mixtral(config, reader, int(experts.contents()))
    return config


def _mixtral(llama: Any, reader: Any, experts: int) -> Any:
    """llama.cpp writes Mixtral as ``llama`` with experts (transformers reads that as a dense Llama): the
    Mixtral config of the same fields (its experts as wide as ``feed_forward_length``, as the converter writes)."""
    import transformers

    used = reader.fields.get("llama.expert_used_count")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    fields = {k: v for k, v in llama.to_dict().items() if k in keep and v is not None}
    return transformers.MixtralConfig(**fields, num_local_experts=experts,
                                      num_experts_per_tok=int(used.contents()) if used is not None else 2,
                                      architectures=["MixtralForCausalLM"])


def gguf_hf_config(path: str | os.PathLike, reader: Any = None) -> Any:
    """``gguf_config`` with ``tie_word_embeddings`` as the file holds the head (no ``output.weight``: tied)."""
    reader = reader if reader is not None else _reader(Path(path))
    config = gguf_config(path, reader)
    by_name = {t.name: t for t in reader.tensors}
    config.tie_word_embeddings = "output.weight" not in by_name
    if "rope_freqs.weight" in by_name:  # Llama 3.1's RoPE scaling, which only this tensor records
        from gguf import quants

        t = by_name["rope_freqs.weight"]
        factors = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
        rope = dict(getattr(config, "rope_parameters", None) or {})
        theta = float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.rope_parameters = _llama3_rope(factors, theta, dim, Path(path))
    return config


def _llama3_rope(factors: np.ndarray, theta: float, dim: int, path: Path) -> dict[str, Any]:
    """transformers' ``llama3`` RoPE parameters that give llama.cpp's ``rope_freqs`` factors.

    Per frequency the factor is 1 (short wavelengths), ``factor`` (long ones) or between, where
    ``1/f = 1/factor + s (1 - 1/factor)`` with ``s = (orig/wavelen - low) / (high - low)``: linear in 1/wavelen. Two
    or more factors in between give its slope and intercept; (orig, low, high) are then fixed up to a common
    scale that changes no factor, so ``low_freq_factor`` is taken as 1. The result is checked against the file."""
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / inv
    if factors.shape != inv.shape:
        raise ValueError(f"{path}: rope_freqs.weight has {factors.size} factors; head_dim {dim} needs {inv.size}")
    factor = float(factors.max())
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 or mid.sum() < 2:
        raise ValueError(f"{path}: rope_freqs.weight is not Llama 3.1's RoPE scaling with a smooth band (factors "
                         f"{factors[:4]}...); not supported")
    s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(1 / wavelen[mid], s, 1)
    low = 1.0
    high = low - low / b
    orig = a * (high - low)
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": float(high), "original_max_position_embeddings": float(orig)}
    again = np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, 1 / (
        (1 - (orig / wavelen - low) / (high - low)) / factor + (orig / wavelen - low) / (high - low))))
    if not np.allclose(again, factors, rtol=1e-4):
        raise ValueError(f"{path}: rope_freqs.weight does not follow Llama 3.1's RoPE scaling; not supported")
    return rope


def gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer in a GGUF file's metadata, as a transformers fast tokenizer (chat template kept)."""
    import transformers

    p = Path(path)
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)


class GGUFTensors(Mapping):
    """A GGUF file's tensors under transformers' names, in torch layout, dequantized when read."""

    def __init__(self, path: str | os.PathLike, model: Any, reader: Any = None):

        self.path = Path(path)
        self.reader = reader if reader is not None else _reader(self.path)
        self.arch = _arch(self.reader, self.path)
        self.permute = ARCHITECTURES[self.arch]
        c = model.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        tmap = tensor_name_map(self.arch, c.num_hidden_layers)
        by_name = {t.name: t for t in self.reader.tensors}
        self._tensors: dict[str, Any] = {}
        self._last: tuple[str, np.ndarray] | None = None  # the last stacked expert tensor, dequantized
        hf_names = []
        for template, _ in names.table(model, "model.").values():
            hf_names += [template.format(i=i, e="{e}") for i in range(c.num_hidden_layers)] if "{i}" in template \
                else [template]
        hf_names.append("lm_head.weight")  # present in untied files only
        mapped = set()
        for template in hf_names:
            for name in ([template.format(e=e) for e in range(c.moe.num_experts)] if "{e}" in template else [template]):
                # an expert's weight is one slice of llama.cpp's stacked [E, out, in] tensor of the layer
                stacked, e = expert_split(name)
                theirs = tmap.get_name(stacked, try_suffixes=(".weight", ".bias"))
                if theirs in by_name:
                    self._tensors[name] = (by_name[theirs], e)
                    mapped.add(theirs)
        extra = [n for n in by_name if n not in mapped and not any(re.fullmatch(p, n) for p in _IGNORED)]
        if extra:
            raise ValueError(f"{self.path}: tensors {extra[:6]} have no place in {c.model_type} "
                             f"({len(extra)} unplaced; a variant of the architecture we do not implement?)")

    def __getitem__(self, name: str) -> np.ndarray:
        from gguf import quants

        t, e = self._tensors[name]
        if self._last is not None and self._last[0] == t.name:  # the other experts of the stack just read
            w = self._last[1]
        else:
            try:
                w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
            except NotImplementedError:
                raise ValueError(f"{self.path}: tensor {t.name} is of type {t.tensor_type.name}, which gguf cannot "
                                 "dequantize") from None
            w = w.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGUF lists dims fastest first
            self._last = (t.name, w) if e is not None else None
        if e is not None:
            return w[e].copy()
        if self.arch in NORM_SHIFT and name.endswith("norm.weight"):
            w = w - np.float32(NORM_SHIFT[self.arch])
        if self.permute and re.search(r"self_attn\.(q|k)_proj\.(weight|bias)$", name):
            heads = self.heads if ".q_proj." in name else self.kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def expert_split(name: str) -> tuple[str, int | None]:
    """``...experts.<e>.<proj>.weight`` -> (``...experts.<proj>.weight``, e): an expert's name and the name of
    llama.cpp's stacked tensor of its layer's experts; other names as they are, with None."""
    m = re.search(r"\.experts\.(\d+)\.", name)
    return (name, None) if m is None else (name[:m.start()] + ".experts." + name[m.end():], int(m.group(1)))


def from_gguf(path: str | os.PathLike, dtype: Any = None, *, remat: str = "none", scan: bool = True,
              quantize: Any = None) -> tuple[Any, dict[str, Any]]:
    """``(model, params)`` of a GGUF file (see the module docstring). ``quantize``: a ``QuantSpec`` applied
    one tensor at a time as they are dequantized (e.g. NF4 for QLoRA on a Q4 download)."""
    reader = _reader(Path(path))  # one parse of the file's metadata for the config and the tensors
    hf_config = gguf_hf_config(path, reader)
    model = from_config(hf_config, remat=remat, scan=scan)
    params = load_params(model, GGUFTensors(path, model, reader), dtype, quantize=quantize)
    model.gguf_path = str(path)
    return model, params
