"""Variant optimizers as Optax pieces: LoRA+, AdaLoRA's allocator, SoRA's proximal step, Delta-LoRA."""

from lorax_variants.optim.adalora import adalora_allocator, budget_schedule, rank_pattern, with_rank_pattern
from lorax_variants.optim import lora_drop
from lorax_variants.optim.delta_lora import delta_lora_update
from lorax_variants.optim.lorafa import lorafa_projection
from lorax_variants.optim.loraplus import loraplus, loraplus_labels
from lorax_variants.optim.sora import gate_l1, sora_proximal, sora_sparsity
from lorax_variants.optim.multi import clip_by_adapter_norm

__all__ = ["adalora_allocator", "budget_schedule", "rank_pattern", "with_rank_pattern", "loraplus", "loraplus_labels", "sora_proximal", "sora_sparsity", "gate_l1", "delta_lora_update", "lora_drop", "lorafa_projection", "clip_by_adapter_norm"]
