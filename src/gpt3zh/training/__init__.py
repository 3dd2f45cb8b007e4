"""Fine-tuning and training from scratch: `gpt3zh.train(config, *overrides, **overrides)`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainConfig, load_config

if TYPE_CHECKING:
    from ..parallel import DistEnv
    from .loop import TrainResult


def train(
    config_or_path: str | Path | dict | TrainConfig | None = None,
    *overrides: str,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    lr_lambda: Callable[[int], float] | None = None,
    on_epoch_end: Callable | None = None,
    env: DistEnv | None = None,
    **kw_overrides: Any,
) -> TrainResult:
    """Run training and return a TrainResult (work_dir, output_dir, step, train_loss, eval, ...).

    One process, or, in a process started by torchrun (or with a megatron block asking for more
    than one process), the data x tensor parallel trainer on every rank: the layout is the
    config's `megatron` block (tp) and the launched world (dp = world / tp), as `gpt3zh train`.

    config_or_path: a YAML/JSON file, a dict or a TrainConfig. overrides: dotted `key=value`
    strings as on the command line; kw_overrides: section dicts (`train={"max_steps": 20}`) or
    dotted keys (`**{"train.max_steps": 20}`). Both win over the file.
    train_dataset / eval_dataset: in-memory data instead of dataset.train / dataset.eval: a
    `datasets.Dataset`, an MsDataset or a list of dicts with src_txt (and tgt_txt: the target is
    trained, the prompt masked, as ModelScope's trainer), or a data file path (.jsonl, .json,
    .csv, .parquet or a saved `datasets` directory).
    lr_lambda: step -> lr factor for train.lr_scheduler.type=LambdaLR (torch's and ModelScope's
    LambdaLR; with options.by_epoch the argument is the epoch). on_epoch_end(trainer, model,
    epoch): called on every rank after each epoch's checkpoint. env: the launcher's environment
    (default: read once from RANK / LOCAL_RANK / WORLD_SIZE).
    """
    from ..parallel import read_env
    from .loop.trainer import Extras, Trainer

    cfg = load_config(config_or_path, list(overrides))
    if kw_overrides:
        cfg = load_config(cfg, kw_overrides)
    extras = Extras(train_dataset, eval_dataset, lr_lambda, on_epoch_end)
    env = env or read_env()
    m = cfg.megatron
    if env.world_size == 1 and m.world_size == 1 and m.tensor_model_parallel_size == 1:
        return Trainer(cfg, extras=extras).run()
    import torch.distributed as dist

    from .distributed import DistributedTrainer

    try:  # the process group is torn down on the way out, error or not
        return DistributedTrainer(cfg, env, extras).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["TrainConfig", "load_config", "train"]
