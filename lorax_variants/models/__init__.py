"""Models as pure JAX functions over param trees (every projection through ``dense``)."""

from lorax_variants.models.bert import Bert, BertConfig
from lorax_variants.models.generate import generate
from lorax_variants.models.gpt2 import GPT2, GPT2Config
from lorax_variants.models.llama import Llama, LlamaConfig
from lorax_variants.models.tiny import STACKED, TinyConfig, TinyTransformer, lm_loss

__all__ = ["Llama", "LlamaConfig", "GPT2", "GPT2Config", "Bert", "BertConfig", "generate",
           "TinyConfig", "TinyTransformer", "STACKED", "lm_loss"]
