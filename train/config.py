"""The run's configuration: typed dataclasses read from YAML, overridden by ``--set a.b=value``.

Every key is checked: an unknown key is an error naming it, the closest valid key and all valid
keys of its section; a value of the wrong type names the field, the expected type and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lorax_variants import objectives, recipes

__all__ = ["Config", "ConfigError", "load", "from_dict", "to_dict", "apply_overrides", "config_digest",
           "import_function"]


class ConfigError(ValueError):
    """A bad configuration: the message names the field at fault."""


@dataclasses.dataclass
class ModelConfig:
    path: str = ""  # HF model directory; "pkg:<package>/<dir>" for one a Python package ships
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    num_labels: int | None = None  # classification: defaults to the number of labels in the data
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # frozen weights as stored in memory
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # activations and matmuls
    remat: Literal["none", "full", "dots", "dots_no_batch", "offload", "nested"] = "none"
    scan: bool = True
    # auto: the backend's fused kernel (cuDNN, TPU splash) where it takes the call, else dense up to 1024
    # tokens and blockwise above; cudnn/splash force the kernel (an error where it cannot take the call)
    attention: Literal["auto", "dense", "flash", "cudnn", "splash"] = "auto"
    loss_chunk: int = 2048  # causal LM: tokens per chunk of the cross-entropy (logits never [tokens, vocab])
    mlp_chunk: int | None = None  # long sequences: the MLP this many tokens at a time (its [T, ffn] activations)


@dataclasses.dataclass
class AdapterConfig:
    """``lorax_variants.AdapterSpec`` fields (``variant: none`` trains only ``train_extra``)."""

    variant: str = "lora"
    targets: str | list[str] = r"layers/(attn|mlp|moe)/(?!.*_(bias|norm)$)(?!router$)\w+"  # every projection of every layer
    r: int = 8
    alpha: float = 16.0
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    # a registered init (lorax_variants.recipes.INITS): kaiming, gaussian, pissa, olora, and those the variants'
    # modules register (loftq with quant; lora_ga, eva from the first training batches); its settings are the
    # section adapter.<init> (e.g. adapter.lora_ga.batches)
    init: str = "kaiming"
    rslora: bool = False
    dropout: float = 0.0
    train_extra: str | list[str] | None = None  # regexes of other leaves to train (e.g. "head/.*")
    seed: int = 0  # adapter init (and VeRA's projections)
    # Each variant's and each init's own settings: the section adapter.<name>, checked against the settings type
    # it registers (lorax_variants.recipes); only the sections of adapter.variant and adapter.init are used.
    sections: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        """``adapter.<variant>`` / ``adapter.<init>``: that section (its defaults where the config has none)."""
        if name.startswith("_") or name == "sections":
            raise AttributeError(name)
        kind = _sections().get(name)
        if kind is None:
            raise AttributeError(f"AdapterConfig has no field or section {name!r}")
        return self.sections.get(name) or kind()

    def settings(self) -> Any:
        """The settings of ``variant`` (its section, or the defaults; ``None`` for a variant without any)."""
        return getattr(self, self.variant) if recipes.recipe(self.variant).settings is not None else None

    def init_settings(self) -> Any:
        """The settings of ``init`` (its section, or the defaults; ``None`` for an init without any)."""
        return getattr(self, self.init) if recipes.init_recipe(self.init).settings is not None else None


@dataclasses.dataclass
class QuantConfig:
    kind: Literal["none", "nf4", "int4", "int4_asym", "int8"] = "none"  # int4_asym: zero points (QA-LoRA)
    targets: str | list[str] = r"layers/(attn|mlp|moe)/(?!.*_(bias|norm)$)(?!router$)\w+"
    block_size: int = 64
    double_quant: bool = True


@dataclasses.dataclass
class DataConfig:
    """Where examples come from and how they become token batches.

    ``source``: a local file, a directory or glob of files, or ``pkg:<package>/<path>`` for a
    file a Python package ships. ``format``: json, jsonl, csv, parquet, text, or ``fasttext``
    (lines ``__label__X text``).
    """

    source: str = ""
    format: Literal["auto", "json", "jsonl", "csv", "parquet", "text", "fasttext"] = "auto"
    encoding: str = "utf-8"
    text_field: str = "text"
    prompt_field: str | None = None  # instruction data: the prompt is masked out of the loss
    response_field: str | None = None
    messages_field: str | None = None  # chat data: a column of conversations, lists of {role, content} turns
    # preference pairs (train.objective dpo, ipo, simpo): the preferred and the other completion of each prompt,
    # strings or conversations (turns); the prompt: data.prompt_field (a string or turns), or left out where
    # chosen and rejected are whole conversations (their common turns are the prompt)
    chosen_field: str | None = None
    rejected_field: str | None = None
    chat_template: str | None = None  # default: the tokenizer's; or a named template (chatml) or a template file
    # which tokens the loss covers: auto = assistant (conversations), completion (prompt/response), all (text)
    loss_on: Literal["auto", "assistant", "all", "completion"] = "auto"
    label_field: str = "label"
    task_field: str | None = None  # multitask: column of task indices (or names listed in data.tasks)
    tasks: list[str] | None = None
    labels: list[str] | None = None  # class names in label-index order; default: sorted unique
    drop_labels: list[str] | None = None  # classification: rows with these labels are left out (before the split)
    seq_len: int = 128
    # causal LM: true: whole examples packed into rows, kept apart (segment ids); false: one padded example per
    # row; stream: one stream of every document cut into rows (continued pretraining; attends across documents)
    packing: bool | Literal["stream"] = True
    truncation: Literal["cut", "drop", "error"] = "cut"  # an example longer than seq_len (packing true/false)
    add_eos: bool = True
    eval_fraction: float = 0.0  # fixed held-out split (by seed) for eval
    eval_source: str | None = None  # or a separate eval file
    max_examples: int | None = None
    skip_bad_rows: bool = False  # rows with a null/non-text value or a null label: refused (false) or left out, counted
    seed: int = 0  # shuffling
    # multi-host: each host tokenizes and packs only its slice of the training examples and draws its part of
    # every batch from it (true), or every host prepares all of them (false: the batches of one process)
    host_shards: bool = True


@dataclasses.dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd", "lion"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0


@dataclasses.dataclass
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # context parallelism (a causal LM's sequence split over this many devices, lorax_variants.models.context);
    # context_balance: two chunks per device, one early, one late, so the causal mask loads every device alike
    context: int = 1
    context_balance: bool = True


@dataclasses.dataclass
class DistributedConfig:
    """Multi-host: ``enabled: auto`` initializes when the environment says so (TPU pods, SLURM,
    or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""

    enabled: Literal["auto", "true", "false"] = "auto"
    coordinator: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: Literal["gloo", "mpi", "none"] = "gloo"


@dataclasses.dataclass
class TrainConfig:
    # sft: next-token loss on the data's completion tokens; dpo, ipo, simpo: preference pairs (data.chosen_field,
    # data.rejected_field); grpo: prompts (data.prompt_field), completions sampled and scored by a reward function;
    # each objective's settings in the section objective.<name>
    objective: Literal["sft", "dpo", "ipo", "simpo", "grpo"] = "sft"
    steps: int = 100
    batch_size: int = 8  # global, over all hosts and devices
    grad_accum: int = 1
    seed: int = 0  # dropout and DyLoRA rank sampling
    log_every: int = 10
    eval_every: int = 0  # 0: at the end only
    eval_batches: int = 8
    samples: int = 2  # causal LM: generated samples at each eval
    sample_tokens: int = 24
    # generation eval (chat or prompt/response data with an eval split): this many held-out examples answered
    # greedily with the KV cache at each eval, scored by exact match or a `module:function(prompt, reference,
    # output) -> float`
    gen_eval: int = 0
    gen_eval_tokens: int = 64
    gen_eval_score: str = "exact_match"
    checkpoint_every: int = 0  # 0: at the end only
    keep: int = 3
    stop_at: int | None = None  # end this invocation after this step, checkpointed (job time slices); resume goes on
    max_nonfinite: int | None = 10  # skipped non-finite steps tolerated; one more stops the run (None: never)
    output_dir: str = "runs/default"
    progress: bool = True
    report: bool = True  # at the end: report/ with figures and index.html (python -m train report)


@dataclasses.dataclass
class ObjectiveConfig:
    """Each training objective's settings (``lorax_variants.objectives``), one section each; the one
    ``train.objective`` names is used."""

    dpo: objectives.Dpo = dataclasses.field(default_factory=objectives.Dpo)
    ipo: objectives.Ipo = dataclasses.field(default_factory=objectives.Ipo)
    simpo: objectives.Simpo = dataclasses.field(default_factory=objectives.Simpo)
    grpo: objectives.Grpo = dataclasses.field(default_factory=objectives.Grpo)

    def settings(self, name: str) -> Any:
        """The settings of objective ``name`` (``None`` for sft)."""
        return getattr(self, name, None)


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    name: str = "run"

    def __post_init__(self) -> None:
        check(self)


def _type_name(t: Any) -> str:
    if typing.get_origin(t) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if t is type(None):
        return "null"
    return getattr(t, "__name__", str(t))


def _coerce(value: Any, t: Any, where: str) -> Any:
    """``value`` as type ``t`` (YAML gives ints for floats, strings for Literals), or an error."""
    origin = typing.get_origin(t)
    if isinstance(t, types.UnionType) or origin is typing.Union:
        errors = []
        for option in typing.get_args(t):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where}: expected {_type_name(t)}, got {value!r}")
    if t is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and "true" in typing.get_args(t):
            value = "true" if value else "false"
        if value not in typing.get_args(t):
            raise ConfigError(f"{where}: expected {_type_name(t)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {[f.name for f in dataclasses.fields(t)]}, got {value!r}")
        return _build(t, value, where)
    if origin is list:
        (item,) = typing.get_args(t)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(t)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, f"{where} key"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {t} at {where}")


def _moved(path: str) -> str | None:
    """Where an old flat key of a variant's (or an init's) setting went: ``optim.<variant>_<field>``,
    ``adapter.<init>_<field>`` and ``adapter.<field>`` (a field of one variant's settings) moved into that
    section, ``adapter.<variant>``."""
    kinds = _sections()
    section, _, key = path.partition(".")
    if section in ("optim", "adapter"):
        for name in sorted(kinds, key=len, reverse=True):
            if key.startswith(name + "_"):
                field = key[len(name) + 1:]
                fields = [f.name for f in dataclasses.fields(kinds[name])]
                if field in fields or section == "optim":
                    return f"adapter.{name}.{field}" if field in fields else f"adapter.{name} (its keys: {fields})"
    if section == "adapter":
        owners = [n for n, k in kinds.items() if key in {f.name for f in dataclasses.fields(k)}]
        if len(owners) == 1:
            return f"adapter.{owners[0]}.{key}"
    return None


def _sections() -> dict[str, type]:
    """Variant or init name -> its settings type (the ``adapter.<name>`` sections a config may hold)."""
    out = {name: r.settings for name, r in recipes.INITS.items() if r.settings is not None}
    return out | {name: r.settings for name, r in recipes.RECIPES.items() if r.settings is not None}


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    if cls is AdapterConfig:  # each variant's section, typed by the variant's own settings
        raw = dict(raw)
        if "sections" in raw:
            raise ConfigError("unknown config key 'adapter.sections'; a variant's settings are its own section, "
                              "e.g. adapter.adalora.target_r")
        kinds = _sections()
        kwargs["sections"] = {k: _coerce(raw.pop(k), kinds[k], f"adapter.{k}") for k in list(raw) if k in kinds}
        names = [n for n in names if n != "sections"] + sorted(kinds)
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            moved = _moved(path)
            if moved is not None:
                raise ConfigError(f"config key {path!r} moved to '{moved}' (each variant's settings are in its own "
                                  "section of adapter)")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; valid keys{' of ' + where if where else ''}: {names}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a settings type's own check ("LoraGa.direction must be ...")
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None


def from_dict(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a mapping of sections {[f.name for f in dataclasses.fields(Config)]}, got {raw!r}")
    return _build(Config, raw, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as the mapping it reads from (each variant section under ``adapter``)."""
    d = dataclasses.asdict(cfg)
    d["adapter"] |= d["adapter"].pop("sections")
    active = cfg.adapter.settings()  # the variant's settings as the run uses them, defaults included
    if active is not None:
        d["adapter"][cfg.adapter.variant] = dataclasses.asdict(active)
    if cfg.adapter.init in recipes.INITS and cfg.adapter.init_settings() is not None:
        d["adapter"][cfg.adapter.init] = dataclasses.asdict(cfg.adapter.init_settings())
    return d


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
        node = child
    node[last] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "adapter.r=4"]`` applied to a raw config mapping (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. train.steps=10), got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({e})") from None
        _set(raw, key.strip(), value)
    return raw


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping; ``base: other.yaml`` (relative to this file) is read first and
    this file's keys are merged over it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    if p.resolve() in _seen:
        raise ConfigError(f"config file {p}: 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config file {p}: base must be a file name, got {base!r}")
    return _merge(read_yaml(p.parent / base, _seen + (p.resolve(),)), raw)


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (``None``: all defaults) and apply ``key=value`` overrides."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, list(overrides)))


def check(cfg: Config) -> None:
    """Values that are well-typed but impossible."""
    def need(ok: bool, field: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{field}: {msg}, got {_get(cfg, field)!r}")

    need(cfg.train.steps >= 1, "train.steps", "must be at least 1")
    need(cfg.model.loss_chunk >= 1, "model.loss_chunk", "must be at least 1")
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be at least 1")
    need(cfg.train.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    need(cfg.train.batch_size % cfg.train.grad_accum == 0, "train.batch_size",
         f"must be divisible by train.grad_accum={cfg.train.grad_accum}")
    need(cfg.train.keep >= 1, "train.keep", "must be at least 1")
    need(cfg.train.stop_at is None or 1 <= cfg.train.stop_at <= cfg.train.steps, "train.stop_at",
         f"must be in [1, train.steps={cfg.train.steps}]")
    if cfg.train.gen_eval:
        need(cfg.model.task == "causal_lm" and bool(cfg.data.messages_field or cfg.data.prompt_field),
             "train.gen_eval", "answers held-out conversations (data.messages_field) or prompts (data.prompt_field) "
             "of a causal LM")
        need(cfg.data.eval_fraction > 0 or bool(cfg.data.eval_source), "train.gen_eval",
             "needs held-out examples: set data.eval_fraction or data.eval_source")
        need(cfg.train.gen_eval_score == "exact_match" or ":" in cfg.train.gen_eval_score, "train.gen_eval_score",
             "is exact_match or module:function (called with prompt, reference, output; returns a number)")
        need(cfg.train.gen_eval_tokens >= 1, "train.gen_eval_tokens", "must be at least 1")
    for f in ("log_every", "eval_every", "checkpoint_every", "eval_batches", "samples", "sample_tokens", "gen_eval"):
        need(getattr(cfg.train, f) >= 0, f"train.{f}", "must not be negative")
    need(cfg.optim.lr > 0, "optim.lr", "must be positive")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must not be negative")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must not be negative")
    need(cfg.optim.warmup_steps <= cfg.train.steps, "optim.warmup_steps", f"must not exceed train.steps={cfg.train.steps}")
    need(cfg.optim.clip_norm is None or cfg.optim.clip_norm > 0, "optim.clip_norm", "must be positive or null")
    need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    need(cfg.adapter.r >= 1, "adapter.r", "must be at least 1")
    need(cfg.adapter.alpha > 0, "adapter.alpha", "must be positive")
    need(0 <= cfg.adapter.dropout < 1, "adapter.dropout", "must be in [0, 1)")
    given = {k: v for k, v in cfg.adapter.sections.items() if k in recipes.RECIPES}  # every variant section given
    if cfg.adapter.variant in recipes.RECIPES:  # is checked, the variant's (defaults or not) too
        given[cfg.adapter.variant] = cfg.adapter.settings()
    for name, settings in given.items():
        check = recipes.RECIPES[name].check
        try:
            if check is not None:
                check(settings, cfg.train.steps)
        except ValueError as e:  # "field: what is wrong"
            raise ConfigError(f"adapter.{name}.{e}") from None
    need(cfg.adapter.variant in recipes.RECIPES, "adapter.variant", f"must be one of {sorted(recipes.RECIPES)}")
    need(cfg.adapter.init in recipes.INITS, "adapter.init", f"must be one of {sorted(recipes.INITS)}")
    need(cfg.train.objective != "grpo" or not recipes.RECIPES[cfg.adapter.variant].routed, "adapter.variant",
         "routes rows to several adapters; GRPO's rollouts are not routed yet (train them one at a time)")
    init, variant = recipes.INITS[cfg.adapter.init], recipes.RECIPES[cfg.adapter.variant]
    need(not init.needs_quant or cfg.quant.kind != "none", "adapter.init",
         f"{init.name} initializes adapters over a quantized base: set quant.kind (e.g. nf4)")
    need(not init.refuses_quant or cfg.quant.kind == "none", "adapter.init",
         f"{init.name} needs the full-precision base (quant.kind must be none)")
    need(not init.lora_only or (variant.lora_shaped and not (variant.routed and init.from_data is not None)),
         "adapter.init", f"{init.name} initializes LoRA adapters, not adapter.variant={cfg.adapter.variant}")
    if init.check is not None:
        try:
            init.check(cfg.adapter.init_settings(), cfg.adapter)
        except ValueError as e:  # "field: what is wrong" (a field of adapter)
            raise ConfigError(f"adapter.{e}") from None
    routed = [name for name, r in recipes.RECIPES.items() if r.routed]
    variant = recipes.RECIPES[cfg.adapter.variant]
    labelled = variant.routed
    if variant.routes is not None:
        try:
            table = variant.routes(cfg.adapter.settings())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        labelled = any(r.task is not None for r in table)
        need(labelled or not cfg.data.source, "data.source", "holds the rows of adapters with a task label; every "
             "adapter here names its own source, so leave data.source empty")
        need(not cfg.data.tasks, "data.tasks", "is not used with adapter.many (each adapter names its task label)")
    need(labelled == (cfg.data.task_field is not None), "data.task_field",
         f"is needed by (and only by) adapter.variant in {routed}" + (" with adapters that name a task label"
                                                                       if variant.routes is not None else ""))
    need(cfg.data.task_field is None or not cfg.data.packing or cfg.model.task != "causal_lm"
         or cfg.train.objective != "sft", "data.packing",
         "must be false with data.task_field (a packed row would mix tasks)")
    need(not (cfg.data.messages_field and cfg.data.prompt_field), "data.messages_field",
         "and data.prompt_field are two kinds of data: name one")
    need(cfg.data.loss_on != "assistant" or bool(cfg.data.messages_field), "data.loss_on",
         "assistant needs conversations (data.messages_field)")
    need(cfg.data.loss_on != "completion" or bool(cfg.data.prompt_field), "data.loss_on",
         "completion needs prompt/response data (data.prompt_field, data.response_field)")
    need(cfg.data.seq_len >= 2, "data.seq_len", "must be at least 2")
    if cfg.mesh.context != 1:
        need(cfg.model.task == "causal_lm", "mesh.context", f"splits a causal LM's sequence; model.task is "
             f"{cfg.model.task}")
        need(cfg.train.objective != "grpo", "mesh.context", "is not supported with train.objective grpo (its "
             "rollouts generate with a KV cache on whole rows)")
        chunks = cfg.mesh.context * (2 if cfg.mesh.context_balance else 1)
        need(cfg.mesh.context < 1 or cfg.data.seq_len % chunks == 0, "data.seq_len",
             f"{cfg.data.seq_len} must be a multiple of {chunks} with mesh.context={cfg.mesh.context}"
             + (" (balanced: two chunks per device; or mesh.context_balance: false)" if cfg.mesh.context_balance else ""))
    need(0 <= cfg.data.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)")
    need(cfg.data.max_examples is None or cfg.data.max_examples >= 1, "data.max_examples", "must be positive")
    need(cfg.quant.block_size in (32, 64, 128, 256), "quant.block_size", "must be 32, 64, 128 or 256")
    pairs = cfg.train.objective in ("dpo", "ipo", "simpo")
    grpo = cfg.train.objective == "grpo"
    need(pairs or not cfg.data.chosen_field, "data.chosen_field",
         f"holds preference pairs, which train.objective {cfg.train.objective} does not read (set train.objective: "
         "dpo, ipo or simpo)")
    need(pairs or grpo or (cfg.data.prompt_field is None) == (cfg.data.response_field is None), "data.prompt_field",
         "instruction data needs both data.prompt_field and data.response_field")
    need((cfg.data.chosen_field is None) == (cfg.data.rejected_field is None), "data.chosen_field",
         "preference pairs need both data.chosen_field and data.rejected_field")
    need(not pairs or bool(cfg.data.chosen_field), "train.objective",
         "trains on preference pairs: name their columns in data.chosen_field and data.rejected_field")
    if pairs or grpo:
        need(init_recipe_of(cfg).from_data is None, "adapter.init", f"{cfg.adapter.init} initializes from SFT batches; "
             f"train.objective={cfg.train.objective} has none (initialize in an SFT run, or use another init)")
        need(not cfg.train.gen_eval, "train.gen_eval", "scores answers of SFT data; a preference run's eval reports "
             "the held-out preference accuracy, a GRPO run's the held-out reward")
    if grpo:
        s = cfg.objective.grpo
        need(cfg.model.task == "causal_lm", "train.objective", "samples completions of a causal LM (model.task)")
        need(bool(cfg.data.prompt_field) and cfg.data.response_field is None and cfg.data.messages_field is None,
             "train.objective", "grpo reads prompts (data.prompt_field: text or turns) and samples the completions; "
             "unset data.response_field and data.messages_field")
        if ":" not in s.reward:
            raise ConfigError("objective.grpo.reward: name the reward function as module:function (called with "
                              f"prompt, completion, row; returning a number), got {s.reward!r}")
        need(cfg.train.batch_size % s.group_size == 0, "train.batch_size",
             f"counts completions: it must be a multiple of objective.grpo.group_size={s.group_size}")
        need(cfg.data.seq_len > s.max_completion_length, "data.seq_len",
             f"must leave room for a prompt beside objective.grpo.max_completion_length={s.max_completion_length}")
    if pairs:
        need(cfg.model.task == "causal_lm", "train.objective", "compares completions of a causal LM (model.task)")
        need(cfg.data.response_field is None and cfg.data.messages_field is None, "train.objective",
             "reads pairs (data.prompt_field, data.chosen_field, data.rejected_field); unset data.response_field and "
             "data.messages_field")
        need(cfg.data.loss_on in ("auto", "completion"), "data.loss_on",
             "must be auto or completion with preference pairs (their log-probabilities are the completions')")
    if pairs or grpo:
        settings = cfg.objective.settings(cfg.train.objective)
        init, variant = recipes.INITS[cfg.adapter.init], recipes.RECIPES[cfg.adapter.variant]
        if settings.reference == "base" and (init.moves_base or variant.moves_base):
            why = (f"adapter.init={cfg.adapter.init} rewrites the base" if init.moves_base
                   else f"adapter.variant={cfg.adapter.variant} moves the base as it trains")
            fix = ("set it to precomputed (the initial model's log-probabilities, once before training)" if pairs
                   else "set objective.grpo.beta: 0 (no reference)")
            raise ConfigError(f"objective.{cfg.train.objective}.reference: base is the model with the adapters off, "
                              f"which is not the initial model here ({why}); {fix}")


def import_function(spec: str, field: str) -> Any:
    """The function a config value ``module:function`` names; one that cannot be imported or is not callable
    is an error naming ``field``."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{field}: cannot load {spec!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"{field}: {spec!r} is not a function")
    return fn


def init_recipe_of(cfg: Config) -> recipes.InitRecipe:
    """The registered init ``adapter.init`` names (checked before this is called)."""
    return recipes.INITS[cfg.adapter.init]


def _get(cfg: Config, dotted: str) -> Any:
    x: Any = cfg
    for part in dotted.split("."):
        x = getattr(x, part)
    return x


def config_digest(raw: dict[str, Any]) -> str:
    """sha256 of a config's dict (``to_dict``, or ``config.json`` as read back): ``summary.json`` records it so
    that a report can tell the run's own config.json from another's."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
