"""What every variant's optimizer builds on: labels of trainable leaves by node field (each variant's own Optax
pieces live in its module under ``lorax_variants.variants``)."""

from lorax_variants.optim.labels import label_tree

__all__ = ["label_tree"]
