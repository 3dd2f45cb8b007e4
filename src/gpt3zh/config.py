"""Typed configuration: the model's architecture, its presets, and generation settings.

`GPTConfig` describes architecture only. Generation defaults that ModelScope keeps in the same
`config.json` (eod_id, top_k, top_p, temperature, tokens_to_generate) live in
`GenerationDefaults`, beside the model (what the loaders return), never on it. `GenerationConfig`
is one call's generation options; `GenerationConfig.from_defaults` is the one mapping from a model
directory's defaults to them (used by the pipeline, the CLI and the server alike).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

GeluKind = Literal["erf", "tanh"]


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and what was expected."""


def unknown_key_message(key: str, names: Sequence[str], what: str = "key", hints: dict[str, str] | None = None) -> str:
    """'unknown key 'x'; did you mean 'y'? (valid keys: ...)': the one wording of that error."""
    if hints and key in hints:
        return f"{what} {key!r} {hints[key]}"
    close = difflib.get_close_matches(key, list(names), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {key!r}{hint} (valid: {', '.join(names)})"


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{where}: {unknown_key_message(key, names)}")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 25600
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int | None = None  # None -> 4 * d_model, as ModelScope's single-process model hard-codes
    max_seq_len: int = 2048
    ln_eps: float = 1e-5
    # "erf": exact GELU, as the single-process ModelScope model (F.gelu).
    # "tanh": the tanh approximation Megatron uses with bias_gelu_fusion=True (the 1.3B+ default).
    gelu: GeluKind = "erf"
    dropout: float = 0.1  # embedding and residual-branch dropout (training only)
    attn_dropout: float = 0.1  # attention-probability dropout (training only)
    init_std: float = 0.02  # from-scratch init only; checkpoints overwrite it

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff <= 0):
            raise ConfigError(f"GPTConfig.d_ff must be a positive int or None, got {self.d_ff!r}")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"GPTConfig: d_model={self.d_model} is not divisible by n_head={self.n_head} "
                f"(each head needs d_model / n_head features)"
            )
        if self.gelu not in ("erf", "tanh"):
            raise ConfigError(f"GPTConfig.gelu must be 'erf' or 'tanh', got {self.gelu!r}")
        for name in ("dropout", "attn_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"GPTConfig.{name} must be in [0, 1), got {p!r}")
        if not self.ln_eps > 0:
            raise ConfigError(f"GPTConfig.ln_eps must be > 0, got {self.ln_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def num_params(self) -> int:
        """Exact parameter count (output head tied to the token embedding)."""
        h, f = self.d_model, self.ffn_dim
        per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        return self.vocab_size * h + self.max_seq_len * h + self.n_layer * per_layer + 2 * h

    def replace(self, **changes: Any) -> GPTConfig:
        _check_keys(GPTConfig, changes, "GPTConfig overrides")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "GPTConfig") -> GPTConfig:
        _check_keys(cls, data, where)
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown preset {name!r}{hint} (presets: {', '.join(PRESETS)})")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


@dataclass(frozen=True)
class GenerationDefaults:
    """What a model directory says about generation (ModelScope keeps these in config.json)."""

    eod_id: int = 1  # ModelScope's GPT3Config default; on the 1.3B vocab id 1 is <sep>
    top_k: int = 0
    top_p: float = 0.9
    temperature: float = 1.0
    tokens_to_generate: int = 100
    extra_stop_ids: tuple[int, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra_stop_ids"] = list(self.extra_stop_ids)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "GenerationDefaults") -> GenerationDefaults:
        _check_keys(cls, data, where)
        data = dict(data)
        if "extra_stop_ids" in data:
            data["extra_stop_ids"] = tuple(data["extra_stop_ids"])
        return cls(**data)


def _preset(vocab: int, layers: int, heads: int, width: int, gelu: GeluKind, eps: float) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, n_layer=layers, n_head=heads, d_model=width, gelu=gelu, ln_eps=eps)


# Sizes from the ModelScope model cards. base/large are single-process models (erf GELU, BERT vocab,
# layernorm_epsilon 1e-12 as their config.json); 1.3B and up are Megatron models (tanh GELU through
# bias_gelu_fusion, JiebaBPE vocab padded to 51200, layernorm_epsilon 1e-5 as the real 1.3B config.json).
PRESETS: dict[str, GPTConfig] = {
    "base": _preset(25600, 12, 12, 768, "erf", 1e-12),
    "large": _preset(25600, 24, 16, 1024, "erf", 1e-12),
    "1.3B": _preset(51200, 24, 32, 2048, "tanh", 1e-5),
    "2.7B": _preset(51200, 32, 32, 2560, "tanh", 1e-5),
    "13B": _preset(51200, 40, 40, 5120, "tanh", 1e-5),
    "30B": _preset(51200, 48, 56, 7168, "tanh", 1e-5),
    "175B": _preset(51200, 96, 96, 12288, "tanh", 1e-5),
}


# ------------------------------------------------------------------------------------ generation
# Per-model transforms that used to be generation options: where they went.
_MOVED = {name: ("is a per-model transform, not a generation option: prepare the model once with "
                 f"gpt3zh.prepare(model, {name}=...) (CLI / server: --{name.replace('_', '-')})")
          for name in ("compile", "quantize", "dtype")}
SEED_LIMIT = 2**63  # torch generators take a signed 64-bit seed
PENALTY_RANGE = (1e-6, 1e6)  # beyond these float32 logits overflow or vanish


@dataclass(frozen=True)
class GenerationConfig:
    """One call's generation options, validated once. The CLI derives its flags from these fields.

    Greedy (argmax) when do_sample is False, temperature == 0, top_k == 1 or top_p == 0;
    gpt3zh.sampling documents every option's meaning, the same everywhere.
    """

    max_new_tokens: int = field(default=100, metadata={"help": "tokens to generate after the prompt (>= 0)"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy argmax"})
    temperature: float = field(
        default=1.0, metadata={"help": "divide logits by this before sampling (>= 0; 0 means greedy)"}
    )
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = off, 1 = greedy)"})
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus mass in [0, 1]; the token crossing p is kept (1 = off, 0 = greedy)"}
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "> 0; divides positive / multiplies negative logits of seen tokens (1 = off)"}
    )
    eos_token_id: int | tuple[int, ...] | None = field(
        default=None, metadata={"help": "stop a row at this token id (or ids); none = run to max_new_tokens"}
    )
    stop: tuple[str, ...] = field(
        default=(), metadata={"help": "end the text before this string (repeatable; needs a tokenizer)"}
    )
    seed: int | None = field(
        default=None, metadata={"help": "seed a private generator so sampling repeats (row i of a batch: seed + i)"}
    )

    def __post_init__(self) -> None:
        _require_int("max_new_tokens", self.max_new_tokens, 0, "an int >= 0")
        _require_int("top_k", self.top_k, 0, "an int >= 0 (0 = off)")
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample must be True or False, got {self.do_sample!r}")
        _require_float("temperature", self.temperature, lambda t: t >= 0, ">= 0 (0 means greedy)")
        _require_float("top_p", self.top_p, lambda p: 0 <= p <= 1, "in [0, 1] (1 = off, 0 = greedy)")
        lo, hi = PENALTY_RANGE
        _require_float("repetition_penalty", self.repetition_penalty, lambda r: lo <= r <= hi,
                       f"in [{lo:g}, {hi:g}] (1 = off)")
        if self.seed is not None:
            _require_int("seed", self.seed, 0, "None or an int >= 0")
            if self.seed >= SEED_LIMIT:
                raise ConfigError(f"seed must be < 2**63, got {self.seed}")
        object.__setattr__(self, "eos_token_id", _normalise_eos(self.eos_token_id))
        object.__setattr__(self, "stop", _normalise_stop(self.stop))

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0 or self.top_k == 1 or self.top_p == 0

    @property
    def stop_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else eos

    def replace(self, **changes: Any) -> GenerationConfig:
        _check_option_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        _check_option_names(data)
        return cls(**data)

    @classmethod
    def from_defaults(cls, defaults: GenerationDefaults, vocab_size: int, sep_id: int | None = None,
                      **options: Any) -> GenerationConfig:
        """A model directory's defaults as a GenerationConfig (then `options` override fields).

        ModelScope's conventions, translated once here: it samples unless top_k == 1; a top_p of
        0 in config.json means "off" (1.0 here, where 0 would mean greedy); the model stops at
        eod_id, at extra_stop_ids and at the tokenizer's <sep> (`sep_id`: fine-tuned models emit it).
        Stop ids outside the vocabulary are dropped.
        """
        stops = {defaults.eod_id, *defaults.extra_stop_ids} | ({sep_id} if sep_id is not None else set())
        base = cls(
            max_new_tokens=defaults.tokens_to_generate,
            do_sample=defaults.top_k != 1,
            temperature=defaults.temperature,
            top_k=defaults.top_k,
            top_p=defaults.top_p if 0 < defaults.top_p <= 1 else 1.0,
            eos_token_id=tuple(sorted(i for i in stops if 0 <= i < vocab_size)) or None,
        )
        return base.replace(**options) if options else base


def _require_int(name: str, value: Any, minimum: int, expected: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


def _require_float(name: str, value: Any, ok, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


def _normalise_eos(eos: Any) -> int | tuple[int, ...] | None:
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise ConfigError(f"eos_token_id must be None, a token id >= 0 or a list of them, got {eos!r}")
    if isinstance(eos, int):
        return eos
    return tuple(ids) if ids else None


def _normalise_stop(stop: Any) -> tuple[str, ...]:
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(stops)


def _check_option_names(options: dict[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(GenerationConfig)]
    for key in options:
        if key not in names:
            raise ConfigError(unknown_key_message(key, names, "generation option", _MOVED))


# ------------------------------------------------------------------------------------ inference
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZE = ("int8", "int8-dynamic", "int8-weight")


@dataclass(frozen=True)
class InferenceOptions:
    """Per-model transforms for inference. The CLI derives its flags from these fields."""

    dtype: str | None = field(default=None, metadata={
        "help": "float32 | bfloat16 | float16: run in this dtype (a cast copy; none = the model's own)"})
    quantize: str | None = field(default=None, metadata={
        "help": "int8: int8 linear layers and head (a quantized copy): int8 weights and per-row int8 "
                "activations on CPU, weight-only int8 elsewhere; int8-dynamic / int8-weight: that scheme"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the one-token decode step"})
    cpu_kernels: bool | None = field(default=None, metadata={
        "help": "CPU kernels: oneDNN-packed or chunked-GEMV layers + a flat decode step (default: on)"})
    pack_weights: bool | None = field(default=None, metadata={
        "help": "with the CPU kernels, run the linear layers on a copy of their weights packed for oneDNN "
                "(faster, costs that copy; default: when it fits in half the available memory)"})

    def __post_init__(self) -> None:
        if self.dtype not in (None, *DTYPE_NAMES):
            raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)} (or None = the model's own), "
                              f"got {self.dtype!r}")
        if self.quantize not in (None, *QUANTIZE):
            raise ConfigError(f"quantize must be None or one of {QUANTIZE}, got {self.quantize!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be True or False, got {self.compile!r}")
        for name in ("cpu_kernels", "pack_weights"):
            value = getattr(self, name)
            if not (value is None or isinstance(value, bool)):
                raise ConfigError(f"{name} must be None (auto), True or False, got {value!r}")
        if self.pack_weights and self.cpu_kernels is False:
            raise ConfigError("pack_weights=True runs with the CPU kernels: it cannot be combined with "
                              "cpu_kernels=False")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InferenceOptions:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(unknown_key_message(key, names, "inference option"))
        return cls(**data)
