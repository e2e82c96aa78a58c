"""Every variant the library ships, one module each: its node, builder, settings, Optax pieces, training hooks
and PEFT codec, registered when the module is imported. This import list is the only place that lists them;
the package re-exports each module's public names."""

from lorax_variants.variants import (
                                     adalora,
                                     delta_lora,
                                     dora,
                                     dylora,
                                     lora,
                                     lora_drop,
                                     lora_fa,
                                     loraplus,
                                     many,
                                     multitask,
                                     qalora,
                                     sora,
                                     vera,
)

MODULES = (lora, lora_fa, loraplus, dora, vera, adalora, dylora, sora, delta_lora, multitask, lora_drop, qalora, many)

__all__ = list(dict.fromkeys(name for m in MODULES for name in m.__all__))
globals().update({name: getattr(m, name) for m in MODULES for name in m.__all__})
