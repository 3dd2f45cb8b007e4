"""Typed training configuration: nested dataclasses, YAML/JSON loading, dotted overrides.

Field names follow ModelScope's GPT-3 fine-tuning configs (`train.dataloader.batch_size_per_gpu`,
`train.optimizer.options.grad_clip.max_norm`, `evaluation.metrics`, `preprocessor.sequence_length`,
`megatron.*`), so a ModelScope example's settings carry over. Precedence: command line (dotted
`key=value`) > config file > the defaults below. The dataclasses are the schema: pydantic checks a
config against them (`config_schema()` is its JSON schema), and an error names the full dotted key
and the value; an unknown key gets the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import core_schema

from ..config import ConfigError, GPTConfig, unknown_key_message
from ..fileio import read_utf8

Precision = Literal["fp32", "bf16", "fp16"]
# LambdaLR: a Python function step -> factor, passed to gpt3zh.train(lr_lambda=...) (ModelScope's name)
SchedulerType = Literal["noam", "cosine", "constant", "LambdaLR"]
Metric = Literal["ppl", "rouge", "bleu"]
# gpt3zh.checkpoint's formats; "modelscope" is the single-process layout, "megatron" the 1.3B+ one
EXPORT_FORMATS = ("gpt3zh", "modelscope", "megatron", "hf")


# ------------------------------------------------------------------------------------ the schema
# Leaves are strict (a bool is not an int, "5" is not an int, 1 is not a bool, a number is not a
# string); these types add the YAML spellings that mean the same value.
def _yaml_float(value: Any) -> Any:
    try:  # YAML 1.1 reads `1e-4` (no dot) as a string; one that is no number is refused as it is
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _as_list(value: Any) -> Any:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]  # `metrics: ppl` is a one-item list
    return list(value) if isinstance(value, tuple) else value


def _as_pair(value: Any) -> Any:  # YAML has no tuples; a list of another length is refused as written
    return tuple(value) if isinstance(value, list) and len(value) == 2 else value


T = TypeVar("T")
Float = Annotated[float, BeforeValidator(_yaml_float)]  # an int is a float; inf and nan are refused
Items = Annotated[list[T], BeforeValidator(_as_list)]
FloatPair = Annotated[tuple[Float, Float], BeforeValidator(_as_pair)]


class _Section:
    """Base of the config dataclasses: pydantic builds them from mappings, each field strictly."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    _other_shapes = (core_schema.none_schema(),)  # what _from_yaml takes besides the mapping (JSON schema)

    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        return {} if value is None else value  # `train:` with nothing under it: the defaults

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type, handler: Any) -> Any:
        schema = handler(source)
        # strict would take only instances of the dataclass; a section comes as a mapping, and
        # its fields keep the strict config
        schema["strict"] = False
        shapes = core_schema.union_schema([schema, *cls._other_shapes])
        return core_schema.no_info_before_validator_function(cls._from_yaml, schema, json_schema_input_schema=shapes)


@dataclass
class GradClip(_Section):
    max_norm: Float | None = 1.0  # None disables clipping


@dataclass
class OptimizerOptions(_Section):
    grad_clip: GradClip = field(default_factory=GradClip)


@dataclass
class OptimizerConfig(_Section):
    type: Literal["AdamW"] = "AdamW"
    lr: Float = 1e-4
    weight_decay: Float = 0.01  # never applied to biases, norms or embeddings
    betas: FloatPair = (0.9, 0.999)  # torch / ModelScope AdamW defaults
    eps: Float = 1e-8
    options: OptimizerOptions = field(default_factory=OptimizerOptions)


@dataclass
class SchedulerOptions(_Section):
    # ModelScope's examples set False; true (the factor changes once per epoch) only for LambdaLR
    by_epoch: bool = False


@dataclass
class LRSchedulerConfig(_Section):
    # noam: the model cards' lr * min((s+1)^-0.5, (s+1) * warmup^-1.5) (peak lr * warmup^-0.5);
    # cosine: linear warmup to lr, cosine decay to lr * min_lr_ratio at the last step.
    type: SchedulerType = "noam"
    warmup_steps: int = 100
    # The model cards' name (`num_warmup_steps` in finetune_poetry.py, `warmup` in the noam
    # formula); when given it sets warmup_steps, so `{type: noam, warmup: 200}` reads as the card.
    warmup: int | None = None
    min_lr_ratio: Float = 0.0
    options: SchedulerOptions = field(default_factory=SchedulerOptions)


@dataclass
class DataLoaderConfig(_Section):
    batch_size_per_gpu: int = 8
    # Accepted for ModelScope configs. Batches are cut from the in-memory token cache in the
    # training process (collation is a copy), so worker processes would add nothing.
    workers_per_gpu: int = 0
    shuffle: bool = True


@dataclass
class LoraConfig(_Section):
    """train.lora: LoRA fine-tuning through peft (gpt3zh.training.lora). r = 0 (the default) is full
    fine-tuning; r > 0 freezes the base and trains rank-r adapters on the target layers, whose
    output is scaled by alpha / r. Checkpoints then hold the adapters only, and the export is an
    adapter directory in peft's format that names its base (docs/training.md)."""

    r: int = 0
    alpha: Float = 16.0
    dropout: Float = 0.0  # on the adapter's input (peft's lora_dropout)
    # layer names inside each block (gpt3zh's names); a name matches every block's layer of that name
    target_modules: Items[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"])
    # dtype of the frozen base weights; the adapters (and their AdamW moments) are always fp32
    base_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


def _validate_lora(cfg: Any) -> None:
    lora, t = cfg.train.lora, cfg.train
    if lora.r == 0:
        changed = [f.name for f in dataclasses.fields(LoraConfig)
                   if getattr(lora, f.name) != getattr(LoraConfig(), f.name)]
        if changed:
            raise ConfigError(f"train.lora.{changed[0]} is set but train.lora.r is 0 (LoRA off); give train.lora.r > 0")
        return
    if lora.r < 0:
        raise ConfigError(f"train.lora.r must be >= 0 (0 = full fine-tuning), got {lora.r}")
    if not lora.alpha > 0 or not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"train.lora: alpha must be > 0 and dropout in [0, 1), got alpha={lora.alpha}, "
                          f"dropout={lora.dropout}")
    if not lora.target_modules or not all(isinstance(m, str) and m for m in lora.target_modules):
        raise ConfigError("train.lora.target_modules must be a non-empty list of layer names, "
                          f"got {lora.target_modules!r}")
    if cfg.model.path is None:
        raise ConfigError("train.lora adapts a trained model: give model: DIR (a preset has nothing to adapt)")
    if t.param_dtype != "fp32":
        raise ConfigError("train.param_dtype is for full fine-tuning; with train.lora the base dtype is "
                          "train.lora.base_dtype (the adapters stay fp32)")
    if cfg.megatron.tensor_model_parallel_size > 1:
        raise ConfigError(f"train.lora with tensor parallelism (megatron.tensor_model_parallel_size="
                          f"{cfg.megatron.tensor_model_parallel_size}) is not supported: the TP plan shards the "
                          f"layers LoRA wraps; use data parallelism only (tensor_model_parallel_size: 1)")


@dataclass
class TrainSection(_Section):
    work_dir: str = "work_dir"
    max_epochs: int = 1
    max_steps: int | None = None  # optimizer steps; when set it wins over max_epochs
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    gradient_accumulation_steps: int = 1
    precision: Precision = "fp32"  # bf16 / fp16: autocast; fp16 adds dynamic loss scaling
    # "bf16": keep parameters and gradients in bf16 with fp32 AdamW moments and stochastically
    # rounded updates (the memory-lean setup for a 1.3B full fine-tune on one GPU).
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    seed: int = 42
    save_interval: int | None = None  # steps; None -> at each epoch end
    eval_interval: int | None = None  # steps; None -> at each epoch end
    log_interval: int = 10  # steps between TensorBoard scalar writes
    keep_last: int = 2  # step checkpoints kept (the best by eval PPL is kept in addition)
    # true: the newest intact checkpoint in work_dir (none yet: start at step 0); a path: that one
    resume: bool | str = False
    # A work_dir that holds another run (checkpoints, a log, an export) is refused unless the run
    # resumes it or overwrite=true, which deletes that run's files first (the token cache is kept).
    overwrite: bool = False
    # work_dir/output (gpt3zh) and work_dir/output_<format> for each other checkpoint format
    export_formats: Items[str] = field(default_factory=lambda: ["gpt3zh"])
    device: str = "auto"  # auto -> cuda when available, else cpu
    bucket_by_length: bool = True  # batch rows of similar length so little compute goes to padding
    # "auto": a tqdm bar on stderr only when stderr is a terminal (never \r-garbage in a log file)
    progress_bar: bool | Literal["auto"] = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EvalDataLoaderConfig(_Section):
    batch_size_per_gpu: int = 8
    workers_per_gpu: int = 0
    shuffle: bool = False


@dataclass
class EvaluationSection(_Section):
    metrics: Items[Metric] = field(default_factory=lambda: ["ppl"])
    dataloader: EvalDataLoaderConfig = field(default_factory=EvalDataLoaderConfig)
    max_new_tokens: int = 64  # greedy generation length for rouge / bleu
    max_examples: int | None = None  # evaluate on the first N rows only
    at_start: bool = False  # also evaluate the untrained start (logged at step 0) as a baseline
    # also report ModelScope's unmasked ppl (ModelScope's PplMetric); it needs full (B, L-1, V) logits of every
    # row padded to sequence_length, several times the cost of the masked ppl on prompt data
    ppl_modelscope: bool = True


@dataclass
class PreprocessorSection(_Section):
    sequence_length: int = 128  # ModelScope's TextGenerationJiebaPreprocessor default
    type: str | None = None  # ModelScope's preprocessor name; accepted and ignored


@dataclass
class DatasetSection(_Section):
    train: str | None = None
    eval: str | None = None
    # {file column: our column}, e.g. {text1: src_txt, text2: tgt_txt} as ModelScope's examples.
    remap_columns: dict[str, str] = field(default_factory=dict)


@dataclass
class MegatronSection(_Section):
    """Parallel layout (read by the distributed trainer; validated here)."""

    world_size: int = 1
    tensor_model_parallel_size: int = 1
    checkpoint_tensor_model_parallel_size: int | None = None


@dataclass
class ModelSection(_Section):
    """Either a model directory to fine-tune (`path`) or a preset to train from scratch."""

    # a model directory or a ModelScope id (`damo/nlp_gpt3_text-generation_1.3B`), as the model
    # cards' `model=` kwarg; an id is resolved through ModelScope's local cache (gpt3zh.hub)
    path: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields for a preset
    _other_shapes = (core_schema.str_schema(), core_schema.none_schema())  # `model: DIR`

    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        """`model: DIR` is {path: DIR}; GPTConfig fields beside a preset are shorthand for its overrides."""
        if value is None or isinstance(value, str):
            return {"path": value}
        if not isinstance(value, dict):
            raise ConfigError(
                f"model: expected a model directory, a ModelScope id or {{preset: NAME, ...}}, got {value!r}"
            )
        if not isinstance(value.get("overrides") or {}, dict):
            return value  # the schema says what overrides must be
        path, preset, overrides = value.get("path"), value.get("preset"), _model_overrides(value)
        if path is not None and preset is not None:
            raise ConfigError("model: give either path (fine-tune) or preset (from scratch), not both")
        if path is not None and overrides:
            raise ConfigError(
                f"model: architecture overrides {sorted(overrides)} only apply to a preset; "
                f"a model directory keeps its own config"
            )
        if isinstance(preset, str):
            GPTConfig.from_preset(preset, **overrides)  # an unknown preset, a bad value: ConfigError naming it
        return {"path": path, "preset": preset, "overrides": overrides}

    def gpt_config(self) -> GPTConfig:
        if self.preset is None:
            raise ConfigError("model: gpt_config() is only defined for a preset")
        return GPTConfig.from_preset(self.preset, **self.overrides)


def _model_overrides(model: dict[str, Any]) -> dict[str, Any]:
    """model.overrides with the shorthand fields (`{preset: base, n_layer: 2}`) folded in."""
    overrides = model.get("overrides") or {}
    shorthand = {k: v for k, v in model.items() if k not in ("path", "preset", "overrides")}
    gpt_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = [f"model.{k}" for k in shorthand if k not in gpt_fields]
    unknown += [f"model.overrides.{k}" for k in overrides if k not in gpt_fields]
    if unknown:
        raise _unknown_key(unknown[0])
    both = sorted(k for k in shorthand if k in overrides and shorthand[k] != overrides[k])
    if both:
        raise ConfigError(
            f"model: {both[0]} is given twice with different values (model.{both[0]}={shorthand[both[0]]!r}, "
            f"model.overrides.{both[0]}={overrides[both[0]]!r}); give one of them"
        )
    return {**overrides, **shorthand}


@dataclass
class TrainConfig(_Section):
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: str | None = None  # a path or a ModelScope id; default: the model directory's tokenizer
    dataset: DatasetSection = field(default_factory=DatasetSection)
    preprocessor: PreprocessorSection = field(default_factory=PreprocessorSection)
    train: TrainSection = field(default_factory=TrainSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    megatron: MegatronSection = field(default_factory=MegatronSection)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["optimizer"]["betas"] = list(self.train.optimizer.betas)
        return d


# ------------------------------------------------------------------------------------------ loading
def load_config(source: str | Path | dict | TrainConfig | None = None, overrides: Any = ()) -> TrainConfig:
    """Build a validated TrainConfig from a YAML/JSON path, a dict or a TrainConfig.

    overrides: dotted `key=value` strings (values parsed as YAML), or a dict of dotted keys /
    nested dicts. They win over the file.
    """
    if isinstance(source, TrainConfig):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = copy.deepcopy(source)
    elif source is None:
        data = {}
    else:
        data = read_config_file(Path(source))
    for key, value in _override_items(overrides):
        _set_dotted(data, key, value)
    try:
        cfg = _schema().validate_python(data)
    except ValidationError as err:
        raise _config_error(err.errors()[0]) from None
    _resolve_warmup_alias(cfg.train.lr_scheduler)
    validate(cfg)
    return cfg


def _resolve_warmup_alias(lr: LRSchedulerConfig) -> None:
    if lr.warmup is None:
        return
    if lr.warmup_steps not in (lr.warmup, LRSchedulerConfig.warmup_steps):
        raise ConfigError(
            f"train.lr_scheduler: warmup={lr.warmup} and warmup_steps={lr.warmup_steps} disagree; "
            f"give one of them"
        )
    lr.warmup_steps, lr.warmup = lr.warmup, None


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = read_utf8(path)
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot parse config: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal string
    return key.strip(), value


def _override_items(overrides: Any):
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            if isinstance(value, dict) and key in _SECTION_KEYS:
                yield from _flatten(value, key)
            else:
                yield key, value
    else:
        for item in overrides:
            yield parse_override(item)


def _flatten(d: dict, prefix: str):
    for key, value in d.items():
        full = f"{prefix}.{key}"
        if isinstance(value, dict) and dataclasses.is_dataclass(_field_type_at(full)):
            yield from _flatten(value, full)
        else:
            yield full, value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if _field_type_at(key) is None and not _inside_free_dict(parts):
        raise _unknown_key(key)
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and part == "model" and i == 0:
            child = {"path": child}  # `model: DIR` then `model.preset=...`: switch to the mapping form
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    if parts[:2] == ["train", "lr_scheduler"] and parts[-1] in ("warmup", "warmup_steps"):
        node.pop("warmup_steps" if parts[-1] == "warmup" else "warmup", None)  # the override wins
    if parts[0] == "model" and len(parts) in (2, 3) and _inside_free_dict(parts):
        # model.X and model.overrides.X name one setting: the override replaces the file's other spelling
        model = data["model"]
        if len(parts) == 2 and isinstance(model.get("overrides"), dict):
            model["overrides"].pop(parts[1], None)
        elif len(parts) == 3:
            model.pop(parts[2], None)


def _inside_free_dict(parts: list[str]) -> bool:
    """model.<GPTConfig field>, model.overrides.<GPTConfig field> (the same thing, spelt as the
    file's `overrides:` mapping) and dataset.remap_columns.<column> are open mappings."""
    gpt_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    if parts[0] == "model" and len(parts) == 2:
        return parts[1] in gpt_fields
    if parts[:2] == ["model", "overrides"] and len(parts) == 3:
        return parts[2] in gpt_fields
    return parts[:2] == ["dataset", "remap_columns"] and len(parts) == 3


# ------------------------------------------------------------------------------------ validation
@functools.cache
def _schema() -> TypeAdapter:
    return TypeAdapter(TrainConfig)  # built on first use: importing the module builds nothing


def config_schema() -> dict[str, Any]:
    """The JSON schema of a training config (for editors and docs): the schema load_config checks.
    It spells each setting one way; a file may also put GPTConfig fields beside model.preset (they
    are model.overrides), give one item for a list (`metrics: ppl`) and a number as a string."""
    return _schema().json_schema()


def _config_error(err: Any) -> ConfigError:
    """pydantic's first complaint, worded as the rest of gpt3zh: the dotted key, what it expects, the value."""
    loc, kind = err["loc"], err["type"]
    if kind == "value_error" and isinstance(err["ctx"]["error"], ConfigError):
        return err["ctx"]["error"]  # a section's own check (the model shorthand)
    if kind == "unexpected_keyword_argument":
        return _unknown_key(".".join(map(str, loc)))
    if kind == "missing":  # a tuple one item short: say so of the tuple
        loc = loc[:-1]
    key, tp = _locate(loc)
    if kind == "finite_number":  # the right type, a wrong value: not "expected float or null"
        return ConfigError(f"{key}: expected a finite number, got {err['input']!r}")
    return ConfigError(f"{key}: expected {_expected(tp)}, got {err['input']!r}")


def _locate(loc: tuple) -> tuple[str, Any]:
    """A location (pydantic's, or a dotted key's parts) -> (the key as a user writes it, its type), as
    far as the schema knows it; a union arm's tag (pydantic's `bool` in `resume.bool`) ends it."""
    key, tp = "", TrainConfig
    for item in loc:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp) and item in (hints := typing.get_type_hints(tp)):
            key, tp = f"{key}.{item}" if key else item, hints[item]
        elif origin in (list, tuple) and isinstance(item, int):
            key, tp = f"{key}[{item}]", args[0] if origin is list else args[item]
        elif origin is dict and item != "[key]":
            key, tp = f"{key}.{item}", args[1]
        else:
            break
    return key or "config", tp


def _expected(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(map(_expected, args))
    if origin is Literal:
        return repr(args[0]) if len(args) == 1 else f"one of {', '.join(map(repr, args))}"
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return "null" if tp is type(None) else tp.__name__


# --------------------------------------------------------------------------------- key discovery
_SECTION_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def _walk(cls: type, prefix: str):
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        yield path
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, path + ".")


def valid_keys() -> list[str]:
    """Every dotted key a config accepts (GPTConfig fields under model.* for a preset)."""
    keys = list(_walk(TrainConfig, ""))
    keys += [f"model.{f.name}" for f in dataclasses.fields(GPTConfig)]
    keys += [f"model.overrides.{f.name}" for f in dataclasses.fields(GPTConfig)]
    return keys


def _field_type_at(key: str) -> Any:
    found, tp = _locate(tuple(key.split(".")))
    return tp if found == key else None  # None: not a key of the schema


def _unknown_key(key: str) -> ConfigError:
    """The one wording of the error (gpt3zh.config.unknown_key_message), offering the keys valid
    where `key` went wrong, each completed with the rest of `key` when that makes a valid key, so
    `train.optimzer.lr` suggests `train.optimizer.lr` and `evaluaton.metrics` `evaluation.metrics`."""
    parts, keys = key.split("."), valid_keys()
    valid = set(keys)
    depth = next((i for i in range(len(parts)) if ".".join(parts[: i + 1]) not in valid), len(parts) - 1)
    prefix, rest = ".".join(parts[:depth]), ".".join(parts[depth + 1 :])
    siblings = [k for k in keys if k.count(".") == depth and (not prefix or k.startswith(prefix + "."))]
    names = [f"{k}.{rest}" if rest and f"{k}.{rest}" in valid else k for k in siblings]
    return ConfigError(unknown_key_message(key, names, "config key"))


# ----------------------------------------------------------------------------------- value checks
def validate(cfg: TrainConfig) -> None:
    """Value checks that need no files (file checks happen in the trainer before step 1)."""
    t = cfg.train
    _positive(t.max_epochs, "train.max_epochs")
    _positive(t.gradient_accumulation_steps, "train.gradient_accumulation_steps")
    _positive(t.dataloader.batch_size_per_gpu, "train.dataloader.batch_size_per_gpu")
    _positive(cfg.evaluation.dataloader.batch_size_per_gpu, "evaluation.dataloader.batch_size_per_gpu")
    _positive(cfg.evaluation.max_new_tokens, "evaluation.max_new_tokens")
    _positive(t.log_interval, "train.log_interval")
    for name in ("max_steps", "save_interval", "eval_interval"):
        if getattr(t, name) is not None:
            _positive(getattr(t, name), f"train.{name}")
    if t.overwrite and t.resume is not False:
        raise ConfigError("train.overwrite=true starts the run again from step 0; "
                          "it cannot be combined with train.resume")
    if t.keep_last < 1:
        raise ConfigError(f"train.keep_last must be >= 1, got {t.keep_last}")
    if cfg.preprocessor.sequence_length < 2:
        raise ConfigError(f"preprocessor.sequence_length must be >= 2, got {cfg.preprocessor.sequence_length}")
    if not t.optimizer.lr > 0:
        raise ConfigError(f"train.optimizer.lr must be > 0, got {t.optimizer.lr}")
    if t.optimizer.weight_decay < 0:
        raise ConfigError(f"train.optimizer.weight_decay must be >= 0, got {t.optimizer.weight_decay}")
    clip = t.optimizer.options.grad_clip.max_norm
    if clip is not None and not clip > 0:
        raise ConfigError(f"train.optimizer.options.grad_clip.max_norm must be > 0 or null, got {clip}")
    if t.lr_scheduler.options.by_epoch and t.lr_scheduler.type != "LambdaLR":
        raise ConfigError(
            f"train.lr_scheduler.options.by_epoch: {t.lr_scheduler.type} is a per-step schedule; set it to false "
            f"(only LambdaLR takes by_epoch=true)"
        )
    if t.lr_scheduler.warmup_steps < 0 or (t.lr_scheduler.type == "noam" and t.lr_scheduler.warmup_steps < 1):
        raise ConfigError("train.lr_scheduler.warmup_steps must be >= 1 for noam, >= 0 otherwise")
    if not 0.0 <= t.lr_scheduler.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.lr_scheduler.min_lr_ratio must be in [0, 1], got {t.lr_scheduler.min_lr_ratio}")
    if t.param_dtype == "bf16" and t.precision != "bf16":
        raise ConfigError("train.param_dtype=bf16 needs train.precision=bf16")
    for fmt in t.export_formats:
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"train.export_formats: unknown format {fmt!r} (valid: {', '.join(EXPORT_FORMATS)})")
    if t.device not in ("auto", "cpu", "cuda") and not t.device.startswith("cuda:"):
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {t.device!r}")
    if cfg.model.path is None and cfg.model.preset is None:
        raise ConfigError(
            "model: give a model directory or ModelScope id (model: DIR or OWNER/NAME) "
            "or a preset (model: {preset: NAME})"
        )
    if cfg.model.preset is not None and cfg.tokenizer is None:
        raise ConfigError("tokenizer: a model built from a preset has no tokenizer; set tokenizer: PATH")
    # dataset.train may be None here: gpt3zh.train(train_dataset=...) brings in-memory data (the
    # trainer checks that one of the two is given, before it writes anything)
    _validate_megatron(cfg.megatron)
    _validate_lora(cfg)


def _validate_megatron(m: MegatronSection) -> None:
    _positive(m.world_size, "megatron.world_size")
    _positive(m.tensor_model_parallel_size, "megatron.tensor_model_parallel_size")
    if m.world_size % m.tensor_model_parallel_size:
        raise ConfigError(
            f"megatron.world_size={m.world_size} is not divisible by "
            f"tensor_model_parallel_size={m.tensor_model_parallel_size}"
        )
    if m.checkpoint_tensor_model_parallel_size is not None:
        _positive(m.checkpoint_tensor_model_parallel_size, "megatron.checkpoint_tensor_model_parallel_size")


def _positive(value: int, name: str) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
