"""Variant optimizers as Optax pieces: LoRA+, SoRA's proximal step, Delta-LoRA's weight update."""

from lorax_variants.optim.delta_lora import delta_lora_update
from lorax_variants.optim.loraplus import loraplus, loraplus_labels
from lorax_variants.optim.sora import gate_l1, sora_proximal, sora_sparsity

__all__ = ["loraplus", "loraplus_labels", "sora_proximal", "sora_sparsity", "gate_l1", "delta_lora_update"]
