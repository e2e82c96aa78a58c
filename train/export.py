"""``python -m train export``: a run's checkpoint as a merged HF model, a PEFT adapter or a GGUF file.

    python -m train export --checkpoint runs/dora --format peft --out exports/dora-peft
    python -m train export --checkpoint runs/dylora --format merged --rank 4 --out exports/dylora-r4
    python -m train export --checkpoint runs/lora --format gguf --gguf-type q8_0 --out exports/lora.q8_0.gguf
    python -m train export --checkpoint runs/moe --format peft --experts per_expert --out exports/moe-vllm

The run is rebuilt from its ``config.json`` (base model re-read, re-quantized), its latest (or
``--step``) checkpoint restored and checked, then written with ``lorax_variants.hf.save_merged``,
``save_peft`` or ``save_gguf`` (the merged model for llama.cpp, with the base model's tokenizer). PiSSA adapters are written as PEFT's conversion for the original base (the
initial factors are regenerated from the run's seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorax_variants.hf.gguf_export import FILE_TYPES
from lorax_variants.hf.peft_experts import EXPERT_FORMS

__all__ = ["main", "export", "restored_run"]


def export(run_dir: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False, rank: int | None = None,
           task: int | None = None, step: int | None = None, dtype: str | None = None,
           adapter: str | None = None, force_base: bool = False, gguf_type: str = "f16",
           experts: str = "fused") -> Path:
    import lorax_variants as lv
    from lorax_variants import recipes
    from lorax_variants.hf import save_gguf, save_merged, save_peft
    from train.build import model_dir
    from train.config import ConfigError

    run_dir = Path(run_dir)
    cfg, p, state, initial = restored_run(run_dir, step, force_base=force_base, verb="export")
    tree = lv.combine(state.trainable, state.frozen)
    model = p.built.model
    many = [x.names for _, x in lv.leaves_with_paths(tree, nodes_are_leaves=True) if getattr(x, "names", None)]
    if adapter is not None and (not many or adapter not in many[0]):
        raise ConfigError(f"--adapter {adapter!r}: the run's adapters are {list(many[0]) if many else 'not named'}")
    if fmt in ("merged", "gguf") and many and adapter is None:
        raise ConfigError(f"--adapter: the run trained adapters {list(many[0])}; merge one of them (--adapter NAME)")
    if fmt == "gguf":
        try:
            return save_gguf(out, model, tree, file_type=gguf_type, tokenizer=model_dir(cfg), rank=rank, task=task,
                             adapter=adapter, name=run_dir.name, overwrite=overwrite)
        except ValueError as e:
            raise ConfigError(f"--format gguf: {e}") from None
    if fmt == "merged":
        path = save_merged(out, model, tree, rank=rank, task=task, adapter=adapter, dtype=dtype,
                           tokenizer_from=model_dir(cfg), overwrite=overwrite)
        _copy_tokenizer(model_dir(cfg), path)  # a GGUF base: its tokenizer written out as transformers files
        return path
    if adapter is not None:
        tree = lv.pick(tree, adapter)
    if cfg.quant.kind != "none":
        how = (f" (bitsandbytes: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
               f"bnb_4bit_use_double_quant={cfg.quant.double_quant}), block size {cfg.quant.block_size})"
               if cfg.quant.kind == "nf4" else " (int4_asym: no transformers quantizer makes it; the dequantized base is "
               "what lorax_variants.hf.save_merged writes of the unadapted tree)" if cfg.quant.kind == "int4_asym" else "")
        print(f"train export: note: these adapters were trained over a {cfg.quant.kind} base; load them on the base "
              f"quantized the same way{how}, or export --format merged (dequantized base + delta)", file=sys.stderr)
    extra = [path for path, x in lv.leaves_with_paths(state.trainable, nodes_are_leaves=True)
             if not isinstance(x, lv.Node)]  # trained plain leaves: a head, biases
    variant = None if many else cfg.adapter.variant  # many adapters: each one's own (LoRA or DoRA, in the tree)
    path = save_peft(out, model, tree, base_model=str(model_dir(cfg)), rank=rank, variant=variant,
                     initial=initial if recipes.init_recipe(cfg.adapter.init).moves_base else None, modules_to_save=extra or None,
                     experts=experts, overwrite=overwrite)
    _copy_tokenizer(model_dir(cfg), path)
    for name in many[0] if many and adapter is None else []:  # one PEFT adapter directory per adapter
        _copy_tokenizer(model_dir(cfg), path / name)
    return path


def restored_run(run_dir: str | Path, step: int | None, *, force_base: bool = False, verb: str = "export") -> Any:
    """``(cfg, prepared, state, initial tree)`` of a run directory's checkpoint (``step``, default the latest),
    rebuilt from its config and checked; notes on stderr as ``train <verb>: ...``."""
    import lorax_variants as lv
    from train import checkpoint as ckpt
    from train.config import ConfigError, from_dict
    from train.run import _prepare, restore

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() and not (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"--checkpoint: {run_dir} is not a run directory (no config.json, no checkpoints/)")
    saver = ckpt.Checkpointer(run_dir, 1, read_only=True)
    try:
        which = step if step is not None else saver.latest()
        if which is None:
            raise ConfigError(f"--checkpoint: {saver.directory} has no checkpoint")
        if step is not None and step not in saver.steps():
            raise ConfigError(f"--step {step}: {saver.directory} has steps {saver.steps()}")
        try:
            note = saver.verify(which)
            raw = _run_config(run_dir, saver, which)
            raw.setdefault("train", {})["output_dir"] = str(run_dir)
            cfg = from_dict(raw)
            p = _prepare(cfg, abstract=False)
            initial = lv.combine(p.built.trainable, p.built.frozen)
            p, state = restore(p, saver, which, force_base=force_base)
        except ckpt.CheckpointMismatch as e:
            if "holds other weights" in str(e):  # the base model moved on: config.json is not at fault
                raise
            raise ckpt.CheckpointMismatch(f"{e} ({verb} rebuilt the run from {run_dir / 'config.json'}; if that file "
                                          "is wrong, remove it and the checkpoint's own copy of the config is used)") from None
        except ckpt.CheckpointDamaged as e:
            earlier = [s for s in saver.steps() if s < which]
            raise ckpt.CheckpointDamaged(e.step, e.path, e.reason + (
                f"; {verb} an earlier step with --step {earlier[-1]} (resuming the run sets the damaged step aside)"
                if earlier else "")) from None
    finally:
        saver.close()
    for line in ([note] if note else []) + state.notes:
        print(f"train {verb}: {line}", file=sys.stderr)
    return cfg, p, state, initial


def _run_config(run_dir: Path, saver: Any, step: int) -> dict[str, Any]:
    """The run's config: ``config.json``, or, where that is missing or damaged, the copy every checkpoint
    keeps in its metadata (said on stderr)."""
    path = run_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return raw
    except (OSError, ValueError) as e:
        why = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({type(e).__name__}: {e})"
    raw = saver.meta(step).get("config")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: {why}, and checkpoint step {step} holds no copy of the config")
    print(f"train export: note: {path} is {why}; using the config saved with checkpoint step {step}", file=sys.stderr)
    return raw


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    from lorax_variants.hf.export import TOKENIZER_FILES

    if src.suffix == ".gguf":  # the base is one GGUF file: its tokenizer as transformers saves one
        if dst.is_dir() and not (dst / "tokenizer.json").exists():
            from lorax_variants.hf.gguf import gguf_tokenizer

            gguf_tokenizer(src).save_pretrained(dst)
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and dst.is_dir() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def main(argv: list[str]) -> Any:
    ap = argparse.ArgumentParser(prog="python -m train export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a run's output directory (config.json + checkpoints/)")
    ap.add_argument("--format", required=True, choices=["merged", "peft", "gguf"])
    ap.add_argument("--out", required=True, help="directory to write (gguf: the file; refused if it exists, unless "
                                                 "--overwrite)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--rank", type=int, help="DyLoRA: the rank to export")
    ap.add_argument("--task", type=int, help="multi-task, merged: the task whose adapter to merge")
    ap.add_argument("--adapter", help="many adapters: the one to export (merged: required; peft: default all, "
                                      "one directory each)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="merged: weight dtype")
    ap.add_argument("--gguf-type", default="f16", choices=list(FILE_TYPES),
                    help="gguf: the weight matrices' type (vectors and norms stay f32)")
    ap.add_argument("--experts", default="fused", choices=list(EXPERT_FORMS),
                    help="peft, mixture-of-experts adapters: PEFT's target_parameters on the fused experts, or one LoRA "
                         "module per expert (vLLM's MoE LoRA layout)")
    ap.add_argument("--force-base", action="store_true", help="export even if model.path now holds other weights "
                    "than the run was trained on")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    a = ap.parse_args(argv)
    path = export(a.checkpoint, a.format, a.out, overwrite=a.overwrite, rank=a.rank, task=a.task, step=a.step,
                  dtype=a.dtype, adapter=a.adapter, force_base=a.force_base, gguf_type=a.gguf_type, experts=a.experts)
    print(f"wrote {a.format} export to {path}")
    return path
