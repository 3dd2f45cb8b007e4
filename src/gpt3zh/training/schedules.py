"""Learning-rate schedules as pure functions of the optimizer step.

The trainer sets `lr = base_lr * lr_factor(cfg, step, total_steps)` before each step, so the
schedule carries no state of its own and resuming needs only the step count.
"""

from __future__ import annotations

import math

from .config import LRSchedulerConfig


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


def lr_factor(cfg: LRSchedulerConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base lr at 0-based optimizer step `step`."""
    if cfg.type == "noam":
        return noam(step, cfg.warmup_steps)
    if cfg.type == "cosine":
        return warmup_cosine(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return constant(step, cfg.warmup_steps)
