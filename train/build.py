"""From a config to the pieces of a run: distributed init, tokenizer, model, adapted tree, mesh.

``plan(cfg)`` builds everything abstractly (``jax.eval_shape``: nothing allocated, any model size)
for ``--dry-run``; ``build(cfg)`` loads the real weights (quantized as they are read) and places
every leaf on the mesh with its sharding.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import lorax_variants as lv
from lorax_variants import recipes
from lorax_variants.hf import auto
from lorax_variants.models.context import ContextParallel
from lorax_variants.sharding import make_mesh, tree_shardings
from train.config import Config, ConfigError
from train.data import resolve

__all__ = ["init_distributed", "model_dir", "load_tokenizer", "adapter_spec", "quant_spec", "Built", "build", "rebuild"]



def init_distributed(cfg: Config) -> None:
    """``jax.distributed.initialize`` from the config or the environment (before any JAX work)."""
    d = cfg.distributed
    if d.enabled == "false":
        return
    env = os.environ
    coordinator = d.coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if d.enabled == "auto" and not coordinator:
        return
    if d.cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    num = d.num_processes if d.num_processes is not None else env.get("JAX_NUM_PROCESSES")
    pid = d.process_id if d.process_id is not None else env.get("JAX_PROCESS_ID")
    if jax.distributed.is_initialized():
        return
    if coordinator is None:
        jax.distributed.initialize()  # TPU pods, SLURM, ...: auto-detected
        return
    if num is None or pid is None:
        raise ConfigError("distributed.coordinator is set but distributed.num_processes / distributed.process_id "
                          "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID) are not")
    jax.distributed.initialize(coordinator, int(num), int(pid))


def model_dir(cfg: Config) -> Path:
    if not cfg.model.path:
        raise ConfigError("model.path is empty: name an HF model directory (config.json + safetensors)")
    path = resolve(cfg.model.path, "model.path")
    if path.suffix == ".gguf":  # a GGUF file: weights, config and tokenizer in one (llama.cpp's downloads)
        if not path.is_file():
            raise ConfigError(f"model.path: {cfg.model.path!r}: no such GGUF file")
        return path
    if not path.is_dir():
        raise ConfigError(f"model.path: {cfg.model.path!r} is not a directory (nor a .gguf file)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} has no config.json")
    return path


def load_tokenizer(path: Path) -> Any:
    import transformers

    if path.suffix == ".gguf":
        from lorax_variants.hf.gguf import gguf_tokenizer

        try:
            return gguf_tokenizer(path)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ConfigError(f"model.path: could not read the tokenizer of {path}: {type(e).__name__}: {e}") from None
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        raise ConfigError(f"model.path: {path} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"model.path: could not load the tokenizer of {path}: {type(e).__name__}: {e}") from None


def adapter_spec(cfg: Config, stacked: str) -> lv.AdapterSpec | None:
    a = cfg.adapter
    if a.variant not in recipes.RECIPES:
        raise ConfigError(f"adapter.variant: unknown variant {a.variant!r}; choose from {sorted(recipes.RECIPES)}")
    variant = recipes.recipe(a.variant)
    if variant.node is None:
        return None
    try:
        return lv.AdapterSpec(targets=tuple(a.targets) if isinstance(a.targets, list) else a.targets,
                              variant=variant.node, r=a.r, alpha=a.alpha, rank_pattern=a.rank_pattern,
                              alpha_pattern=a.alpha_pattern, init=recipes.init_recipe(a.init).built_as,
                              rslora=a.rslora, dropout=a.dropout,
                              stacked=stacked, **variant.spec(a.settings()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"adapter: {e}".replace("AdapterSpec.", "adapter.")) from None


def quant_spec(cfg: Config, stacked: str) -> lv.QuantSpec | None:
    q = cfg.quant
    if q.kind == "none":
        return None
    try:
        return lv.QuantSpec(kind=q.kind, block_size=q.block_size, double_quant=q.double_quant,
                            targets=tuple(q.targets) if isinstance(q.targets, list) else q.targets, stacked=stacked)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"quant: {e}".replace("QuantSpec.", "quant.")) from None


@dataclasses.dataclass
class Built:
    model: Any
    spec: lv.AdapterSpec | None
    quant: lv.QuantSpec | None
    mesh: Any
    mask: Any  # trainable mask of the adapted tree
    trainable: Any
    frozen: Any
    trainable_sh: Any
    frozen_sh: Any
    extra: list[str]  # regexes of non-adapter leaves that train
    counts: lv.ParamCount


def _check_model(cfg: Config, model: Any) -> None:
    if cfg.model.task == "sequence_classification" and getattr(model, "causal", False):
        raise ConfigError(f"model.task: {model.config.model_type} is a causal LM; sequence_classification needs "
                          "a BERT/RoBERTa model")


def check_positions(cfg: Config, hf_config: Any) -> None:
    """Learned position tables (GPT-2, BERT, RoBERTa) end: refuse longer sequences before any data is read."""
    limit = getattr(hf_config, "n_positions", None) or getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and cfg.data.seq_len > limit and hf_config.model_type in ("gpt2", "bert", "roberta"):
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the {limit} positions of the model at "
                          f"model.path={cfg.model.path} ({hf_config.model_type} has learned position embeddings)")


def build(cfg: Config, *, num_labels: int | None = None, abstract: bool = False, hf_config: Any = None,
          devices: Any = None) -> Built:
    """Load (or, ``abstract``, plan) the model, quantize, adapt, split and shard. ``hf_config``: the model's
    config already read (``hf.load_hf_config``), so a run reads config.json once and builds the model once.
    ``devices``: the mesh's (default: all of them; ``--plan``: a TPU slice's, compiled for without one)."""
    path = model_dir(cfg)
    hf_config = hf_config if hf_config is not None else auto.model_config(path)
    if num_labels is not None:
        hf_config.num_labels = num_labels
    task = cfg.model.task
    model = auto.from_config(hf_config, task=task, remat=cfg.model.remat, scan=cfg.model.scan)
    _configure(cfg, model)
    _check_model(cfg, model)
    stacked = model.stacked
    spec, quant = adapter_spec(cfg, stacked), quant_spec(cfg, stacked)
    dtype = jnp.dtype(cfg.model.param_dtype)
    head_key = jax.random.key(cfg.adapter.seed + 1)
    init = recipes.init_recipe(cfg.adapter.init)
    on_load, on_residual = _quant_split(model, spec, quant, late=init.full_weights)
    if abstract:
        model.new_leaves = []
        params = jax.eval_shape(lambda k: model.init(k, dtype), head_key)
        if on_load is not None:
            params = jax.eval_shape(lambda p: lv.quantize(p, on_load), params)
    else:
        params = auto.load_pretrained(model, path, dtype, hf_config=hf_config, quantize=on_load, new_head=head_key)

    def adapt(p: Any) -> Any:
        if spec is None:
            return p
        key = jax.random.key(cfg.adapter.seed)
        if init.on_quantized is not None and on_residual is not None:  # e.g. LoftQ: bases and A, B together
            return init.on_quantized(cfg.adapter.init_settings(), p, spec, on_residual, key)
        variant = recipes.recipe(cfg.adapter.variant)
        if variant.adapt is not None:  # e.g. many adapters, one spec each
            tree = variant.adapt(cfg.adapter.settings(), p, spec, key)
        else:
            tree = lv.adapt(p, spec, key)
        return lv.quantize(tree, on_residual) if on_residual is not None else tree

    try:
        adapted = jax.eval_shape(adapt, params) if abstract else adapt(params)
    except ValueError as e:
        raise ConfigError(f"adapter.targets: {e}") from None
    extra = _extra(cfg, model, params)
    mask = lv.trainable_mask(adapted, extra=extra or None)
    if not any(jax.tree.leaves(mask)):
        raise ConfigError("nothing trains: adapter.variant is none and adapter.train_extra matches no leaf")
    counts = lv.count_params(adapted, extra=extra or None)
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices, context=cfg.mesh.context)
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("mesh") else f"mesh: {e}") from None
    if mesh.shape["context"] > 1:
        if not model.supports_context:
            raise ConfigError(f"mesh.context: context parallelism is implemented for the Llama family and Gemma, not "
                              f"{type(model).__name__} ({hf_config.model_type})")
        model.context = ContextParallel(mesh, balance=cfg.mesh.context_balance)
    return _place(model, spec, quant, mesh, mask, adapted, extra, counts, abstract)


def micro_batch(cfg: Config, mesh: Any) -> int:
    """Rows per micro-batch; refused unless they split over the mesh's data x fsdp devices."""
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % split:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum} = {micro} "
                          f"rows per micro-batch must be divisible by mesh data x fsdp = {split}")
    return micro


def _quant_split(model: Any, spec: lv.AdapterSpec | None, quant: lv.QuantSpec | None,
                       late: bool = False) -> tuple[lv.QuantSpec | None, lv.QuantSpec | None]:
    """``(quantized as read, quantized after adapting)``. An init that reads the full-precision weights
    (``late``: ``InitRecipe.full_weights``, e.g. one that leaves a residual as the base) gets the weights it
    adapts in full precision, and their bases (residuals) are quantized after it ran; every other quantized
    weight is quantized as it is read."""
    if quant is None or spec is None or not late:
        return quant, None
    from lorax_variants.hf.names import shape_items
    from lorax_variants.tree import compile_patterns, matches

    q, a = compile_patterns(quant.targets), compile_patterns(spec.targets)
    paths = [p for p, _ in shape_items(model.shapes()) if matches(p, q)]
    late = tuple(re.escape(p) for p in paths if matches(p, a))
    early = tuple(re.escape(p) for p in paths if not matches(p, a))
    with_targets = lambda t: dataclasses.replace(quant, targets=t) if t else None  # noqa: E731
    return with_targets(early), with_targets(late)


def _configure(cfg: Config, model: Any) -> None:
    """Run settings the model object carries: the attention implementation; our batches pad on the right."""
    model.attention_impl = cfg.model.attention
    model.right_padded = True
    model.mlp_chunk = cfg.model.mlp_chunk


def rebuild(b: Built, adapted: Any) -> Built:
    """``b`` around a changed adapted tree (LoRA-drop's selection): new mask, shardings, placement."""
    mask = lv.trainable_mask(adapted, extra=b.extra or None)
    counts = lv.count_params(adapted, extra=b.extra or None)
    return _place(b.model, b.spec, b.quant, b.mesh, mask, adapted, b.extra, counts, False)


def _extra(cfg: Config, model: Any, params: Any) -> list[str]:
    extra = cfg.adapter.train_extra
    pats = [extra] if isinstance(extra, str) else list(extra or [])
    paths = [p for p, _ in lv.leaves_with_paths(params, nodes_are_leaves=True)]
    for p in pats:
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ConfigError(f"adapter.train_extra: {p!r} is not a valid regex ({e})") from None
        if not any(rx.fullmatch(q) for q in paths):
            raise ConfigError(f"adapter.train_extra: {p!r} matches no leaf; leaves: {paths[:12]}")
    # A head the checkpoint did not have is random: it always trains.
    return pats + [re.escape(p) for p in getattr(model, "new_leaves", [])]


def _place(model, spec, quant, mesh, mask, adapted, extra, counts, abstract) -> Built:
    shardings = tree_shardings(adapted, mesh)
    tr_sh, fr_sh = lv.split(shardings, mask)
    trainable, frozen = lv.split(adapted, mask)
    # Trainable leaves (adapters, a head) train in float32 whatever the base dtype.
    to32 = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    if abstract:
        trainable = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.float32 if jnp.issubdtype(
            x.dtype, jnp.floating) else x.dtype, sharding=s), trainable, tr_sh)
        frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen, fr_sh)
    else:
        trainable = jax.device_put(jax.tree.map(to32, trainable), tr_sh)
        frozen = jax.device_put(frozen, fr_sh)
    return Built(model, spec, quant, mesh, mask, trainable, frozen, tr_sh, fr_sh, extra, counts)
