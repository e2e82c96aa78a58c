"""Adapter and weight nodes: the node protocol (``nodes.base``) and one file per variant, its node class
and its registered builder (``adapt`` imports every variant module, so their builders are registered).
The package imports only the protocol, so the modules below the variants can import it."""

from lorax_variants.nodes.base import AdapterNode, Node, dense, dense_t, embed, frozen, node, param, static, weight_of

__all__ = ["Node", "AdapterNode", "node", "param", "frozen", "static", "weight_of", "dense", "dense_t", "embed"]
