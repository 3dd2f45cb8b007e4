"""Named tensor transforms between gpt3zh's layout and foreign layouts.

Each transform maps a gpt3zh tensor to the foreign layout (`forward`) and back (`inverse`); both
are pure permutations/transposes, so a round trip is bitwise exact. They also work on meta
tensors, which is how the expected foreign shapes are computed without allocating anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Fn = Callable[[torch.Tensor, int], torch.Tensor]  # (tensor, n_head) -> tensor


def qkv_per_head_to_blocked(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """qkv out-features [N, 3, D] (gpt3zh, Megatron) -> [3, N, D] (ModelScope single, HF GPT-2).

    Works for the weight (3H, H_in) and the bias (3H,): only dim 0 is permuted.
    """
    rest = t.shape[1:]
    per_head = t.reshape(n_head, 3, -1, *rest)  # (N, 3, D, *rest)
    return per_head.transpose(0, 1).reshape(t.shape)  # (3, N, D, *rest) flattened back


def qkv_blocked_to_per_head(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `qkv_per_head_to_blocked`: [3, N, D] -> [N, 3, D] along dim 0."""
    rest = t.shape[1:]
    blocked = t.reshape(3, n_head, -1, *rest)  # (3, N, D, *rest)
    return blocked.transpose(0, 1).reshape(t.shape)


def conv1d_transpose(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """nn.Linear weight (out, in) <-> HF Conv1D weight (in, out); its own inverse."""
    return t.t().contiguous()


def _identity(t: torch.Tensor, n_head: int) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Transform:
    name: str
    forward: Fn  # gpt3zh layout -> foreign layout
    inverse: Fn  # foreign layout -> gpt3zh layout

    def then(self, other: Transform) -> Transform:
        """Apply self, then other (inverse runs in the opposite order)."""
        return Transform(
            f"{self.name} + {other.name}",
            lambda t, n: other.forward(self.forward(t, n), n),
            lambda t, n: self.inverse(other.inverse(t, n), n),
        )


IDENTITY = Transform("identity", _identity, _identity)
QKV_BLOCKED = Transform("qkv [N,3,D] -> [3,N,D]", qkv_per_head_to_blocked, qkv_blocked_to_per_head)
CONV1D = Transform("transpose (Linear -> Conv1D)", conv1d_transpose, conv1d_transpose)
QKV_BLOCKED_CONV1D = QKV_BLOCKED.then(CONV1D)
