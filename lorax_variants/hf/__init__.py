"""Hugging Face at the edges: load HF checkpoints into our models, export merged models and PEFT adapters."""

from lorax_variants.hf.auto import from_pretrained
from lorax_variants.hf.build import SUPPORTED, from_config, load_hf_config, save_pretrained
from lorax_variants.hf.convert import params_from_hf, to_hf
from lorax_variants.hf.export import save_merged
from lorax_variants.hf.gguf import from_gguf, gguf_tokenizer
from lorax_variants.hf.gguf_export import save_gguf, save_gguf_lora
from lorax_variants.hf.peft import save_peft
from lorax_variants.hf.peft_import import load_peft
from lorax_variants.hf.safetensors_io import Checkpoint, SafetensorsFile, write_safetensors

__all__ = ["from_pretrained", "from_config", "save_pretrained", "to_hf", "params_from_hf", "load_hf_config",
           "Checkpoint", "SafetensorsFile", "write_safetensors", "SUPPORTED", "save_merged", "save_peft", "load_peft",
           "from_gguf", "gguf_tokenizer", "save_gguf", "save_gguf_lora"]
