"""The training loop (single process); the distributed trainer subclasses `Trainer`."""

from .trainer import Trainer, TrainResult, token_loss_sum

__all__ = ["TrainResult", "Trainer", "token_loss_sum"]
