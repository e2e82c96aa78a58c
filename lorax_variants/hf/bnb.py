"""Pre-quantized bitsandbytes 4-bit checkpoints (``BitsAndBytesConfig(load_in_4bit=True)`` then
``save_pretrained``) loaded as they are stored: each ``Linear4bit`` weight becomes a ``QuantizedNode`` over
the same codes and scales, with no dequantize/re-quantize round trip, so its dequantized weight equals
bitsandbytes' bit for bit.

What such a checkpoint holds per quantized weight ``W`` (torch layout [out, in], flattened row-major):

    W.weight                    uint8 [out·in/2, 1]   two 4-bit codes a byte, the even element high
    W.weight.absmax             float32 [out·in/bs]   (or uint8 codes of absmax − offset with double quantization)
    W.weight.quant_map          float32 [16]          the NF4 or FP4 code
    W.weight.nested_absmax      float32 [n/bs2]       double quantization: one scale per 256 absmax codes
    W.weight.nested_quant_map   float32 [256]         bitsandbytes' signed dynamic 8-bit code
    W.weight.quant_state.bitsandbytes__{nf4,fp4}      JSON: quant_type, blocksize, dtype, shape, nested_offset

which is our ``QuantizedNode`` layout transposed: codes ``[in/2, out]``, scales ``[in/bs, out]`` (blocks run
along the input axis of each output unit in both). The code tables in the file are checked against ours.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.nodes.quantized import DYNAMIC_CODE, FP4_CODE, NF4_CODE

__all__ = ["bnb_reader", "check_quantization_config"]

_COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def check_quantization_config(hf_config: Any, where: str) -> bool:
    """True for a bitsandbytes 4-bit checkpoint; False without quantization; other methods refused by name."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return False
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not supported; pre-quantized "
                         "checkpoints load from bitsandbytes 4-bit (load_in_4bit) only")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(f"{where}: quantization_config.load_in_8bit (LLM.int8) is not supported; bitsandbytes "
                         "4-bit checkpoints (load_in_4bit) load as they are stored")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage not in (None, "uint8"):
        raise ValueError(f"{where}: quantization_config.bnb_4bit_quant_storage {storage!r} is not supported (uint8)")
    return True


def bnb_reader(tensors: Mapping[str, Any], where: str) -> tuple[Callable[[str], Any], set[str]]:
    """``(node_of, companions)``: ``node_of(name)`` is the ``QuantizedNode`` of a quantized weight (None for a
    plain tensor); ``companions`` are the names of the scale and state tensors, read through ``node_of``."""

    states = {}
    for k in tensors:
        m = re.fullmatch(r"(.*)\.quant_state\.bitsandbytes__(nf4|fp4)", k)
        if m:
            states[m.group(1)] = k
    companions = set(states.values()) | {f"{w}.{c}" for w in states for c in _COMPANIONS if f"{w}.{c}" in tensors}
    orphans = sorted(k[: -len(".absmax")] for k in tensors if k.endswith(".absmax") and k[: -len(".absmax")] not in states)
    if orphans:
        raise ValueError(f"{where}: quantized weight {orphans[0]!r} has no quant_state.bitsandbytes__nf4/fp4 tensor "
                         f"({len(orphans)} such weights): the checkpoint is incomplete, its quantization state is lost")

    def node_of(name: str) -> Any:
        if name not in states:
            return None
        state = json.loads(bytes(np.asarray(tensors[states[name]], np.uint8)).decode())
        kind, bs = state["quant_type"], int(state["blocksize"])
        out_dim, in_dim = (int(s) for s in state["shape"])
        table = {"nf4": NF4_CODE, "fp4": FP4_CODE}[kind]
        qmap = np.asarray(tensors[f"{name}.quant_map"], np.float32)
        if not np.array_equal(qmap, table):
            raise ValueError(f"{where}: {name}.quant_map is not bitsandbytes' {kind} code: {qmap.tolist()}")
        if in_dim % bs:
            raise ValueError(f"{where}: {name} has input dimension {in_dim}, not a multiple of its block size {bs}")
        packed = np.asarray(tensors[name], np.uint8).reshape(-1)
        if packed.size * 2 != out_dim * in_dim:
            raise ValueError(f"{where}: {name} holds {packed.size} bytes; shape {state['shape']} needs {out_dim * in_dim // 2}")
        fields = {"codes": jnp.asarray(packed.reshape(out_dim, in_dim // 2).T)}
        absmax = np.asarray(tensors[f"{name}.absmax"]).reshape(out_dim, in_dim // bs).T
        if "nested_offset" in state:
            nested = np.asarray(tensors[f"{name}.nested_quant_map"], np.float32)
            if not np.array_equal(nested, DYNAMIC_CODE):
                raise ValueError(f"{where}: {name}.nested_quant_map is not bitsandbytes' dynamic 8-bit code")
            fields |= {"qabsmax": jnp.asarray(absmax.astype(np.uint8)),
                       "absmax2": jnp.asarray(np.asarray(tensors[f"{name}.nested_absmax"], np.float32)),
                       "offset": jnp.asarray(np.float32(state["nested_offset"]))}
            bs2 = int(state.get("nested_blocksize", 256))
        else:
            fields["absmax"] = jnp.asarray(absmax.astype(np.float32))
            bs2 = 256
        return QuantizedNode(**fields, kind=kind, block_size=bs, block_size2=bs2, in_out=(in_dim, out_dim),
                             orig_dtype=jnp.dtype(state.get("dtype", "float32")).name)

    return node_of, companions
