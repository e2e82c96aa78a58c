"""lorax_variants: the LoRA family for JAX, as pure parameter-tree transforms.

    spec = AdapterSpec(targets=r".*/(q_proj|v_proj)/kernel", r=8, alpha=16)
    adapted = adapt(params, spec, key)            # same tree, targets now adapter nodes
    trainable, frozen = split(adapted)            # optimize `trainable` only
    y = dense(x, combine(trainable, frozen)[...]) # factored apply inside our models
    loss = merged(model.apply)(adapted, x)        # any JAX model, exact for every variant
"""

from lorax_variants.adapt import Target, adapt, register_variant, variants
from lorax_variants.loftq import loftq
from lorax_variants.nodes import AdapterNode, Node
from lorax_variants.nodes.lora import LoraNode, share_adapters
from lorax_variants.nodes.adalora import AdaLoraNode, orthogonal_penalty
from lorax_variants.nodes.dora import DoraNode
from lorax_variants.nodes.dylora import DyLoraNode, sample_rank, truncate, with_rank
from lorax_variants.nodes.lora_drop import LoraDropNode
from lorax_variants.nodes.multitask import BASE, MultiTaskNode, route, select, stack
from lorax_variants.nodes.qalora import QaLoraNode
from lorax_variants.nodes.multi import MultiAdapterNode, sort_by_adapter
from lorax_variants.multi import adapter_means, adapter_names, adapters, join_trees, pick
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.nodes.sora import SoraNode, prune
from lorax_variants.nodes.vera import VeraNode
from lorax_variants.shared import Shared, resolve_shared
from lorax_variants.ops import as_lora, dense, merge, merge_quantized, merged
from lorax_variants.quant import QuantSpec, dequantize, quantize
from lorax_variants.per_call import with_dropout, without_dropout
from lorax_variants.spec import AdapterSpec
from lorax_variants.stats import ParamCount, count_params, tree_bytes
from lorax_variants.tree import combine, leaves_with_paths, map_with_paths, path_str, split, trainable_mask

__version__ = "0.1.0"

__all__ = [
    "AdapterSpec",
    "adapt",
    "split",
    "combine",
    "merge",
    "merged",
    "merge_quantized",
    "dense",
    "count_params",
    "tree_bytes",
    "ParamCount",
    "with_dropout",
    "without_dropout",
    "trainable_mask",
    "leaves_with_paths",
    "map_with_paths",
    "path_str",
    "Node",
    "AdapterNode",
    "LoraNode",
    "QuantizedNode",
    "DoraNode",
    "VeraNode",
    "AdaLoraNode",
    "DyLoraNode",
    "SoraNode",
    "MultiTaskNode",
    "LoraDropNode",
    "QaLoraNode",
    "MultiAdapterNode",
    "adapters",
    "join_trees",
    "pick",
    "adapter_names",
    "adapter_means",
    "sort_by_adapter",
    "orthogonal_penalty",
    "with_rank",
    "sample_rank",
    "truncate",
    "prune",
    "route",
    "select",
    "stack",
    "BASE",
    "Shared",
    "resolve_shared",
    "share_adapters",
    "as_lora",
    "loftq",
    "QuantSpec",
    "quantize",
    "dequantize",
    "Target",
    "register_variant",
    "variants",
]
