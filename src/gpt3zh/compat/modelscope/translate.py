"""A ModelScope trainer config (configuration.json after `cfg_modify_fn`) as a gpt3zh TrainConfig.

Every setting is read by name; one gpt3zh cannot honour is an error naming it (`cfg.train.X`),
never dropped, because ModelScope would act on it. The few that ModelScope itself never reads
(`model.world_size`, `model.model_parallel_size`, shipped stale in the 1.3B configuration.json)
are accepted only with the model directory's own values. Where ModelScope's default differs from
gpt3zh's, ModelScope's is written out: no gradient clipping unless the optimizer's options ask for
it, a constant lr without an lr_scheduler, batches drawn at random (no length bucketing), the
unmasked ppl, seed 42.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import ConfigError, unknown_key_message

# ModelScope's defaults (trainers/default_config.py) merged into the config before cfg_modify_fn
DEFAULT_HOOKS = [{"type": "CheckpointHook", "interval": 1}, {"type": "TextLoggerHook", "interval": 10},
                 {"type": "IterTimerHook"}]
DEFAULT_SEQUENCE_LENGTH = 128  # TextGenerationJiebaPreprocessor / TextGenerationTransformersPreprocessor
METRICS = {"ppl": ["ppl"], "text-gen-metric": ["rouge", "bleu"]}  # ModelScope metric -> gpt3zh metrics
TASK_DEFAULT_METRIC = "text-gen-metric"  # ModelScope's task_default_metrics for text-generation


@dataclass
class ModelInfo:
    """What the model directory says (configuration.json as shipped, the weights' layout)."""

    path: Path
    shipped: dict[str, Any]  # its configuration.json, before the defaults and cfg_modify_fn
    megatron: bool  # a Megatron directory (model/mp_rank_XX), else single-process (pytorch_model.bin)
    shards: int  # tensor-parallel shards of its weights
    tokens_to_generate: int
    runtime_dtype: str | None = None  # config.json fp16 / bf16: ModelScope casts the model to it


@dataclass
class Plan:
    """The gpt3zh run for a ModelScope config: its config dict and what a file cannot hold."""

    config: dict[str, Any]
    lr_lambda: Callable[[int], float] | None
    export_format: str  # "megatron" or "modelscope": ModelScope's output layout of this model
    checkpoint_every: int | None  # epochs between ModelScope's epoch_N files (CheckpointHook); None: none
    evaluate: bool  # an EvaluationHook: evaluate during training
    metrics: list[str] = field(default_factory=list)  # ModelScope's names ('ppl', 'text-gen-metric')


class _Reader:
    """One config section; keys are read by name, and `done()` refuses any key left unread."""

    def __init__(self, data: Any, where: str) -> None:
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"cfg.{where}: expected a mapping, got {data!r}")
        self.data, self.where, self.read = dict(data or {}), where, set()

    def name(self, key: str) -> str:
        """How messages name a key: cfg.train.optimizer.lr."""
        return f"cfg.{self.where}.{key}" if self.where else f"cfg.{key}"

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.data.get(key, default)

    def number(self, key: str, default: Any, kind: type = float, minimum: float | None = None) -> Any:
        value = self.get(key, default)
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if kind is int:
            ok = ok and isinstance(value, numbers.Integral)
        if not ok or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise ConfigError(f"{self.name(key)}: expected {'an int' if kind is int else 'a number'}{bound}, "
                              f"got {value!r}")
        return kind(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.name(key)}: expected true or false, got {value!r}")
        return value

    def only(self, key: str, allowed: tuple, why: str) -> Any:
        value = self.get(key, allowed[0])
        if value not in allowed:
            raise ConfigError(f"{self.name(key)} = {value!r}: {why}")
        return value

    def section(self, key: str) -> _Reader:
        return _Reader(self.get(key), self.name(key).removeprefix("cfg."))

    def done(self, names: list[str] | None = None) -> None:
        left = [k for k in self.data if k not in self.read]
        if left:
            valid = sorted(names or self.read)
            raise ConfigError(
                f"cfg{'.' if self.where else ''}{self.where}: {unknown_key_message(str(left[0]), valid, 'setting')}; "
                f"gpt3zh honours the settings listed and refuses others, which would otherwise be silently ignored"
            )


def plan(cfg: Mapping[str, Any], model: ModelInfo, kwargs: dict[str, Any]) -> Plan:
    """The gpt3zh run for `cfg` (raises ConfigError naming the first setting it cannot honour).

    kwargs: build_trainer's own settings outside cfg (seed, device, use_fp16).
    """
    root = _Reader(cfg, "")
    _check_fixed(root, model)
    train = _Reader(root.get("train"), "train")
    evaluation = _Reader(root.get("evaluation"), "evaluation")
    hooks = _hooks(train, evaluation, model)
    lr_lambda, scheduler = _lr_scheduler(train.section("lr_scheduler"))
    optimizer, accum = _optimizer(train.section("optimizer"), hooks)
    if accum > 1 and lr_lambda is not None and not scheduler["options"]["by_epoch"]:
        # ModelScope steps the scheduler after every iteration, each micro-batch; the optimizer
        # steps at the last of every `accum` iterations, with the lr of that iteration
        lr_lambda = _per_iteration(lr_lambda, accum)
    dataloader = _dataloader(train.section("dataloader"), shuffle=True)
    work_dir = train.get("work_dir") or "./work_dir"  # ModelScope's default
    max_epochs = train.get("max_epochs")
    if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 1:
        raise ConfigError(f"max_epochs: expected an int >= 1 (build_trainer's max_epochs= or cfg.train.max_epochs), "
                          f"got {max_epochs!r}")
    train.done()
    metrics = _metrics(evaluation)
    eval_loader = _dataloader(evaluation.section("dataloader"), shuffle=False)
    evaluation.flag("gpu_collect", True)  # results are gathered on every rank anyway
    evaluation.done()
    megatron = _megatron(root.section("megatron"), model)
    sequence_length = _preprocessor(root.section("preprocessor"), model)
    root.get("pipeline")  # inference settings, carried into the output's configuration.json
    root.done()
    config = {
        "model": str(model.path),
        "preprocessor": {"sequence_length": sequence_length},
        "train": {
            "work_dir": str(work_dir),
            "max_epochs": int(max_epochs),
            "seed": kwargs.get("seed", 42),
            "device": kwargs.get("device", "auto"),
            "precision": _precision(kwargs.get("use_fp16", False), model),
            "dataloader": dataloader,
            "optimizer": optimizer,
            "lr_scheduler": scheduler,
            "gradient_accumulation_steps": accum,
            "eval_interval": hooks["eval_interval"],
            "log_interval": hooks["log_interval"],
            "export_formats": ["megatron" if model.megatron else "modelscope"],
            "bucket_by_length": False,  # ModelScope's DataLoader draws each batch's rows at random
        },
        "evaluation": {
            "metrics": sorted({m for name in metrics for m in METRICS[name]}),
            "dataloader": eval_loader,
            "max_new_tokens": model.tokens_to_generate,  # its greedy eval generates tokens_to_generate
            "ppl_modelscope": True,  # ModelScope's 'ppl' is the unmasked one
        },
        "megatron": megatron,
    }
    return Plan(config, lr_lambda, config["train"]["export_formats"][0], hooks["checkpoint_every"],
                hooks["evaluate"], metrics)


# ------------------------------------------------------------------------------------- sections
def _check_fixed(root: _Reader, model: ModelInfo) -> None:
    """framework, task and the model block: what ModelScope reads to pick the model class."""
    root.only("framework", ("pytorch",), "gpt3zh runs pytorch models only")
    root.only("task", ("text-generation",), "the GPT-3 models' task is text-generation")
    m = root.section("model")
    m.only("type", ("gpt3",), "gpt3zh trains ModelScope's gpt3 models")
    shipped = model.shipped.get("model") or {}
    for key in ("world_size", "model_parallel_size"):  # never read by ModelScope; stale in the 1.3B file
        if key in m.data and m.get(key) != shipped.get(key):
            raise ConfigError(
                f"cfg.model.{key} = {m.data[key]!r}: ModelScope does not read it (the model directory ships "
                f"{shipped.get(key)!r}); the parallel layout is cfg.megatron.world_size / tensor_model_parallel_size"
            )
    m.get("rank")  # set at run time by ModelScope's GPT3Trainer
    shards = m.get("checkpoint_model_parallel_size")
    if shards is not None and shards != model.shards:
        raise ConfigError(f"cfg.model.checkpoint_model_parallel_size = {shards!r}: the weights in {model.path} "
                          f"are {model.shards} tensor-parallel shard(s)")
    m.only("strict", (True,), "gpt3zh loads every weight strictly (a missing or unexpected tensor is an error)")
    m.done()


def _hooks(train: _Reader, evaluation: _Reader, model: ModelInfo) -> dict[str, Any]:
    """train.hooks (and ModelScope's key-chain forms of the same hooks) as gpt3zh settings."""
    out = {"checkpoint_every": None, "eval_interval": None, "log_interval": 10, "evaluate": False}
    hooks = list(train.get("hooks", []) or [])
    for key, kind in (("checkpoint", None), ("logging", "TextLoggerHook")):
        section = train.section(key) if key in train.data else None
        if section is not None and kind is None:
            period = section.get("period")
            if period is not None:
                hooks.append({"type": "CheckpointHook", **period})
            section.done()
        elif section is not None:
            hooks.append({"type": kind, **section.data})
    if "period" in evaluation.data:
        hooks.append({"type": "EvaluationHook", **(evaluation.get("period") or {})})
    for i, hook in enumerate(hooks):
        if not isinstance(hook, Mapping) or "type" not in hook:
            raise ConfigError(f"cfg.train.hooks[{i}]: expected a mapping with a 'type', got {hook!r}")
        h = _Reader({k: v for k, v in hook.items() if k != "type"}, f"train.hooks[{i}]")
        _hook(str(hook["type"]), h, out, model)
        h.done()
    return out


def _hook(kind: str, h: _Reader, out: dict[str, Any], model: ModelInfo) -> None:
    if kind == "CheckpointHook":
        h.only("by_epoch", (True,), "gpt3zh writes ModelScope's checkpoints per epoch (by_epoch=True); "
                                    "its own resumable ones follow train.save_interval")
        out["checkpoint_every"] = h.number("interval", 1, int, 1)
        h.flag("save_optimizer", True)  # gpt3zh's own checkpoints (work_dir/checkpoints) hold it
    elif kind == "EvaluationHook":
        by_epoch, interval = h.flag("by_epoch", True), h.number("interval", 1, int, 1)
        if by_epoch and interval != 1:
            raise ConfigError(f"{h.name('interval')} = {interval} with by_epoch: gpt3zh evaluates at every epoch's "
                              f"end, or every N iterations (by_epoch=False, interval=N)")
        out["evaluate"], out["eval_interval"] = True, None if by_epoch else interval
    elif kind == "TextLoggerHook":
        out["log_interval"] = h.number("interval", 10, int, 1)
        h.only("by_epoch", (True,), "gpt3zh logs per iteration (train_log.jsonl) whatever the interval")
    elif kind in ("IterTimerHook", "TensorboardHook"):
        pass  # every step's time and tokens/s go to train_log.jsonl and TensorBoard (work_dir/tb)
    elif kind == "MegatronHook":
        if not model.megatron:
            raise ConfigError(f"cfg.{h.where} (MegatronHook): it needs a Megatron model directory (a megatron block in "
                              f"{model.path / 'configuration.json'})")
    elif kind == "LrSchedulerHook":
        h.flag("by_epoch", True)  # the schedule's own options.by_epoch decides
    elif kind == "OptimizerHook":
        out["optimizer_hook"] = h  # read with the optimizer (grad_clip, cumulative_iters)
        h.get("grad_clip"), h.get("cumulative_iters")
    else:
        raise ConfigError(
            f"cfg.{h.where}: gpt3zh does not implement ModelScope's {kind}; the hooks it honours are "
            f"CheckpointHook, EvaluationHook, TextLoggerHook, IterTimerHook, TensorboardHook, LrSchedulerHook, "
            f"OptimizerHook and MegatronHook"
        )


def _lr_scheduler(s: _Reader) -> tuple[Callable | None, dict[str, Any]]:
    if not s.data:  # no scheduler: ModelScope keeps the optimizer's lr
        return None, {"type": "constant", "warmup_steps": 0, "options": {"by_epoch": False}}
    kind = s.only("type", ("LambdaLR",), "gpt3zh runs LambdaLR schedules (a Python lr_lambda, as the model cards "
                                         "set in cfg_modify_fn); set cfg.train.lr_scheduler to one")
    fn = s.get("lr_lambda")
    if not callable(fn):
        raise ConfigError(f"cfg.train.lr_scheduler.lr_lambda: LambdaLR needs a function step -> factor, got {fn!r}")
    s.only("last_epoch", (-1,), "gpt3zh starts schedules at step 0")
    options = s.section("options")
    by_epoch = options.flag("by_epoch", True)  # ModelScope's LrSchedulerHook default
    options.done()
    s.done()
    return fn, {"type": kind, "options": {"by_epoch": by_epoch}}


def _optimizer(o: _Reader, hooks: dict[str, Any]) -> tuple[dict[str, Any], int]:
    o.only("type", ("AdamW",), "gpt3zh's optimizer is AdamW (as the model cards set)")
    lr = o.number("lr", None, float) if "lr" in o.data else None
    if lr is None or not lr > 0:
        raise ConfigError(f"cfg.train.optimizer.lr: expected a number > 0, got {o.data.get('lr')!r}")
    betas = o.get("betas", (0.9, 0.999))
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ConfigError(f"cfg.train.optimizer.betas: expected two numbers, got {betas!r}")
    out = {"type": "AdamW", "lr": lr, "weight_decay": o.number("weight_decay", 0.01, float, 0),
           "betas": [float(b) for b in betas], "eps": o.number("eps", 1e-8, float, 0)}
    o.only("amsgrad", (False,), "gpt3zh's AdamW has no amsgrad")
    options = o.section("options")
    clip, accum = options.get("grad_clip"), options.get("cumulative_iters", 1)
    opt_hook = hooks.pop("optimizer_hook", None)
    if opt_hook is not None:
        clip = opt_hook.data.get("grad_clip", clip)
        accum = opt_hook.data.get("cumulative_iters", accum)
    options.done()
    o.done()
    out["options"] = {"grad_clip": {"max_norm": _max_norm(clip)}}
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        raise ConfigError(f"cfg.train.optimizer.options.cumulative_iters: expected an int >= 1, got {accum!r}")
    return out, accum


def _max_norm(clip: Any) -> float | None:
    """ModelScope clips only when the optimizer's options (or OptimizerHook) carry grad_clip."""
    if clip is None:
        return None
    g = _Reader(clip, "train.optimizer.options.grad_clip")
    max_norm = g.number("max_norm", None, float) if "max_norm" in g.data else None
    if max_norm is None or not max_norm > 0:
        raise ConfigError(f"cfg.train.optimizer.options.grad_clip.max_norm: expected a number > 0, got "
                          f"{g.data.get('max_norm')!r}")
    g.only("norm_type", (2, 2.0), "gpt3zh clips the L2 norm")
    g.done()
    return max_norm


def _dataloader(d: _Reader, shuffle: bool) -> dict[str, Any]:
    out = {"batch_size_per_gpu": d.number("batch_size_per_gpu", 8, int, 1),
           # gpt3zh cuts batches from its in-memory token cache: worker processes would add nothing
           "workers_per_gpu": d.number("workers_per_gpu", 0, int, 0),
           "shuffle": d.flag("shuffle", shuffle)}
    d.only("drop_last", (False,), "gpt3zh keeps the last, smaller batch of an epoch")
    d.done()
    return out


def _metrics(e: _Reader) -> list[str]:
    metrics = e.get("metrics", TASK_DEFAULT_METRIC)
    names = [metrics] if isinstance(metrics, str) else list(metrics or [])
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"cfg.evaluation.metrics: {name!r} is not a metric gpt3zh computes "
                              f"(it computes {', '.join(map(repr, METRICS))})")
    return names


def _megatron(m: _Reader, model: ModelInfo) -> dict[str, Any]:
    """dp x tp: tp from tensor_model_parallel_size, dp = the launched world / tp (as ModelScope)."""
    world = m.number("world_size", 1, int, 1)
    tp = m.number("tensor_model_parallel_size", 1, int, 1)
    m.only("pipeline_model_parallel_size", (1,), "gpt3zh has no pipeline parallelism")
    shards = m.get("checkpoint_tensor_model_parallel_size")
    if shards is not None and shards != model.shards:
        raise ConfigError(f"cfg.megatron.checkpoint_tensor_model_parallel_size = {shards!r}: the weights in "
                          f"{model.path / 'model'} are {model.shards} shard(s) (gpt3zh merges any count at load)")
    m.get("rank")  # set at run time by ModelScope
    m.done()
    # the export is written at the training tp, as ModelScope's MegatronHook saves one file per tp rank
    return {"world_size": world, "tensor_model_parallel_size": tp}


def _preprocessor(p: _Reader, model: ModelInfo) -> int:
    shipped = (model.shipped.get("preprocessor") or {}).get("type")
    kind = p.get("type", shipped)
    if kind != shipped:
        raise ConfigError(f"cfg.preprocessor.type = {kind!r}: gpt3zh tokenizes with the model directory's own "
                          f"tokenizer ({shipped!r} in its configuration.json)")
    length = p.number("sequence_length", DEFAULT_SEQUENCE_LENGTH, int, 2)
    p.done()
    return length


def _precision(use_fp16: bool, model: ModelInfo) -> str:
    """use_fp16=True, or a config.json asking ModelScope to cast the model: autocast in that dtype
    (gpt3zh keeps fp32 weights and scales the fp16 loss)."""
    if use_fp16 or model.runtime_dtype == "float16":
        return "fp16"
    return "bf16" if model.runtime_dtype == "bfloat16" else "fp32"


def _per_iteration(fn: Callable[[int], float], accum: int) -> Callable[[int], float]:
    def at_iteration(step: int) -> float:
        return fn(step * accum + accum - 1)

    at_iteration.__qualname__ = getattr(fn, "__qualname__", "lr_lambda")
    return at_iteration
