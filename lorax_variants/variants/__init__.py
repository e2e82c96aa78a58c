"""Every variant the library ships, one module each: its node, builder, settings, Optax pieces, training hooks
and PEFT codec, registered when the module is imported (and the inits of LoRA-shaped adapters: ``pissa`` and ``olora``, A and B from the
weight with the residual as the base, ``loftq``, the LoftQ init over a quantized base, ``lora_ga``, the LoRA-GA init from the loss's gradient, and ``eva``, the EVA init from the layers' inputs). This import list is the only place that lists them; the package re-exports each
module's public names."""

from lorax_variants.variants import (adalora, delta_lora, dora, dylora, eva, hira, loftq, lora, lora_drop, lora_fa,
                                     lora_ga, loraplus, many, miss, multitask, olora, pissa, qalora, shira, sora, vera)

MODULES = (lora, lora_fa, loraplus, dora, vera, adalora, dylora, sora, delta_lora, multitask, lora_drop, qalora, many,
           hira, miss, shira, pissa, olora, loftq, lora_ga, eva)

__all__ = [m.__name__.rsplit(".", 1)[1] for m in MODULES]

# every module's public names, which the package re-exports (``lv.LoraNode``, ``lv.adalora_allocator``, ...)
EXPORTS = {name: getattr(m, name) for m in MODULES for name in m.__all__}
