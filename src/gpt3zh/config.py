"""Typed model configuration and the preset table.

`GPTConfig` describes architecture only. Generation defaults that ModelScope keeps in the same
`config.json` (eod_id, top_k, top_p, temperature, tokens_to_generate) live in
`GenerationDefaults`, so runtime settings never leak into the model.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

GeluKind = Literal["erf", "tanh"]


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and what was expected."""


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint} (valid keys: {', '.join(names)})")


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
