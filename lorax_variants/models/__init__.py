"""Models as pure JAX functions over param trees (every projection through ``dense``)."""

from lorax_variants.models.tiny import STACKED, TinyConfig, TinyTransformer, lm_loss

__all__ = ["TinyConfig", "TinyTransformer", "STACKED", "lm_loss"]
