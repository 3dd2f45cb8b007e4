"""Fine-tuning and training from scratch: `gpt3zh.train(config, *overrides, **overrides)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TrainConfig, load_config


def train(config_or_path: str | Path | dict | TrainConfig, *overrides: str, **kw_overrides: Any):
    """Run training and return a TrainResult (work_dir, output_dir, step, train_loss, eval, ...).

    config_or_path: a YAML/JSON file, a dict or a TrainConfig. overrides: dotted `key=value`
    strings as on the command line; kw_overrides: section dicts (`train={"max_steps": 20}`) or
    dotted keys (`**{"train.max_steps": 20}`). Both win over the file.
    """
    from .loop import Trainer

    cfg = load_config(config_or_path, list(overrides))
    if kw_overrides:
        cfg = load_config(cfg, kw_overrides)
    return Trainer(cfg).run()


__all__ = ["TrainConfig", "load_config", "train"]
