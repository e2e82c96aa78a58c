"""Adapter and weight nodes, one file per variant."""

from lorax_variants.nodes.base import AdapterNode, Node, frozen, node, param, static, weight_of
from lorax_variants.nodes.lora import LoraNode
from lorax_variants.nodes.quantized import QuantizedNode

__all__ = ["Node", "AdapterNode", "LoraNode", "QuantizedNode", "node", "param", "frozen", "static", "weight_of"]
