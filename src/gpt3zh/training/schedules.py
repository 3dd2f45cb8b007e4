"""Learning-rate schedules as pure functions of the optimizer step.

The trainer sets `lr = base_lr * factors[step]` before each step, the table computed once by
`lr_factors` before step 1, so the schedule carries no state of its own, resuming needs only the
step count, and a Python schedule (`LambdaLR`) that raises or returns a non-number fails before
any training work rather than in the middle of a run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from ..config import ConfigError
from .config import LRSchedulerConfig

LRLambda = Callable[[int], float]


def noam(step: int, warmup: int) -> float:
    """The model cards' LambdaLR: min((s+1)^-0.5, (s+1) * warmup^-1.5); peaks at warmup^-0.5."""
    s = step + 1
    return min(s**-0.5, s * warmup**-1.5)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from lr/warmup to lr, then cosine to lr * min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(total - warmup - 1, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant(step: int, warmup: int) -> float:
    return (step + 1) / warmup if step < warmup else 1.0


def lr_factors(
    cfg: LRSchedulerConfig, total_steps: int, steps_per_epoch: int, lr_lambda: LRLambda | None = None
) -> list[float]:
    """Multiplier of the base lr at each 0-based optimizer step of the run.

    LambdaLR is torch's (and ModelScope's) rule: the factor of step s is lr_lambda(s), or with
    options.by_epoch lr_lambda(epoch of s); its values are checked here, every one of them.
    """
    if cfg.type == "LambdaLR":
        if lr_lambda is None:
            raise ConfigError(
                "train.lr_scheduler.type=LambdaLR takes its schedule from Python: pass lr_lambda=FUNCTION "
                "(step -> factor) to gpt3zh.train, or choose noam, cosine or constant"
            )
        at = (lambda s: s // steps_per_epoch) if cfg.options.by_epoch else (lambda s: s)
        return [_checked(lr_lambda, at(s)) for s in range(total_steps)]
    if lr_lambda is not None:
        raise ConfigError(
            f"lr_lambda= was given but train.lr_scheduler.type is {cfg.type!r}; set it to LambdaLR to use the function"
        )
    if cfg.type == "noam":
        return [noam(s, cfg.warmup_steps) for s in range(total_steps)]
    if cfg.type == "cosine":
        return [warmup_cosine(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio) for s in range(total_steps)]
    return [constant(s, cfg.warmup_steps) for s in range(total_steps)]


def _checked(fn: LRLambda, i: int) -> float:
    name = getattr(fn, "__qualname__", type(fn).__name__)
    try:
        value = fn(i)
    except Exception as err:  # the user's function: any exception is theirs to see, named
        raise ConfigError(
            f"train.lr_scheduler.lr_lambda ({name}) raised {type(err).__name__} at {i}: {err}"
        ) from err
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"train.lr_scheduler.lr_lambda ({name}) returned {value!r} at {i}; expected a finite number >= 0 "
            f"(the factor of the base lr)"
        )
    return float(value)
