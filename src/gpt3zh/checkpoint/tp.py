"""Tensor-parallel split / merge of state dicts (gpt3zh-named or Megatron-named).

Megatron shards every partitioned tensor into `tp` contiguous, equal chunks along its partition
dim (tables.partition_dim: 0 for qkv / fc / vocab, 1 for attn.proj / mlp.proj weights; stride 1).
A contiguous split of qkv gives each rank whole heads because the qkv out-features are laid out
per head, [N, 3, D]; that is why the caller passes n_head: the split is refused when a rank would
get part of a head. Replicated tensors (layer norms, row-parallel biases, positions) are copied.

Split shards are views of the input where possible (dim-0 chunks); files.save_torch clones views
before writing, so memory stays at one copy of the model.
"""

from __future__ import annotations

import torch

from .errors import CheckpointError
from .files import progress
from .tables import partition_dim


def split_state_dict(sd: dict[str, torch.Tensor], tp: int, *, n_head: int) -> list[dict[str, torch.Tensor]]:
    """One full state dict -> `tp` shards, shard r holding chunk r of every partitioned tensor."""
    if not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"tp must be a positive int, got {tp!r}")
    if n_head % tp:
        raise CheckpointError(f"tp={tp} does not divide n_head={n_head}: each rank must hold whole heads")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for name, t in sd.items():
        dim = partition_dim(name)
        if dim is None:
            chunks = [t] * tp
        else:
            if t.shape[dim] % tp:
                raise CheckpointError(
                    f"{name}: size {t.shape[dim]} along partition dim {dim} is not divisible by tp={tp}"
                )
            chunks = torch.split(t, t.shape[dim] // tp, dim=dim)
        for shard, chunk in zip(shards, chunks):
            shard[name] = chunk
    return shards


def merge_state_dicts(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`tp` shards -> one full state dict. Replicated tensors must agree across shards."""
    if not shards:
        raise CheckpointError("merge_state_dicts: no shards given")
    names = list(shards[0])
    for r, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))
            raise CheckpointError(f"shard {r} and shard 0 hold different keys: {', '.join(diff[:8])}")
    return {name: _merge_one(name, [s[name] for s in shards]) for name in progress(names, "merging shards")}


def _merge_one(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    dim = partition_dim(name)
    if dim is None:
        for r, p in enumerate(parts[1:], start=1):
            if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                raise CheckpointError(f"{name} is replicated across TP ranks but shard {r} differs from shard 0")
        return parts[0]
    for r, p in enumerate(parts[1:], start=1):
        other = [s for d, s in enumerate(p.shape) if d != dim]
        if other != [s for d, s in enumerate(parts[0].shape) if d != dim]:
            raise CheckpointError(
                f"{name}: shard {r} has shape {list(p.shape)}, incompatible with shard 0 {list(parts[0].shape)}"
            )
    return torch.cat(parts, dim=dim)


def reshard(shards: list[dict[str, torch.Tensor]], n: int, *, n_head: int) -> list[dict[str, torch.Tensor]]:
    """k shards -> n shards (any k, n dividing n_head and the vocab / ffn widths)."""
    if len(shards) == n:
        return list(shards)
    return split_state_dict(merge_state_dicts(shards), n, n_head=n_head)
