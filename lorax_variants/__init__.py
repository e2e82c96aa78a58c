"""lorax_variants: the LoRA family for JAX, as pure parameter-tree transforms.

    spec = AdapterSpec(targets=r".*/(q_proj|v_proj)/kernel", r=8, alpha=16)
    adapted = adapt(params, spec, key)            # same tree, targets now adapter nodes
    trainable, frozen = split(adapted)            # optimize `trainable` only
    y = dense(x, combine(trainable, frozen)[...]) # factored apply inside our models
    loss = merged(model.apply)(adapted, x)        # any JAX model, exact for every variant
"""

from lorax_variants import objectives, variants
from lorax_variants.adapt import Target, adapt, register_variant, variant_names
from lorax_variants.nodes import AdapterNode, Node
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.shared import Shared, resolve_shared
from lorax_variants.ops import as_lora, dense, merge, merge_quantized, merged, without_adapters
from lorax_variants.quant import QuantSpec, dequantize, quantize
from lorax_variants.per_call import with_dropout, without_dropout
from lorax_variants.routing import BASE, route, sort_by_adapter
from lorax_variants.spec import AdapterSpec
from lorax_variants.stats import ParamCount, count_params, tree_bytes
from lorax_variants.tree import combine, leaves_with_paths, map_with_paths, path_str, split, trainable_mask

globals().update(variants.EXPORTS)  # every variant module's public names

__version__ = "0.1.0"

__all__ = [
    "AdapterSpec", "adapt", "split", "combine", "merge", "merged", "merge_quantized", "dense", "count_params",
    "tree_bytes", "ParamCount", "with_dropout", "without_dropout", "trainable_mask", "leaves_with_paths",
    "map_with_paths", "path_str", "Node", "AdapterNode", "QuantizedNode", "Shared", "resolve_shared", "as_lora",
    "BASE", "route", "sort_by_adapter", "QuantSpec", "quantize", "dequantize", "Target", "register_variant", "variant_names", "variants",
    "objectives", "without_adapters",
    *variants.EXPORTS,
]
