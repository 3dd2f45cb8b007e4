"""Data and tensor parallelism for the unchanged GPT model, built on torch.distributed.

world = dp x tp. A 2-D DeviceMesh ("dp", "tp") holds the ranks; tensor parallelism is the table
`TP_PLAN` turned into DTensor parallel styles (`apply_tp`), data parallelism is FSDP2's
`fully_shard` over the "dp" dimension (`apply_dp`). `model.py` knows nothing of this: attention
infers its local head count from the local qkv width, and qkv out-features are laid out per head
([N, 3, D]), so a contiguous column shard of qkv holds whole heads.

Environment variables (RANK, WORLD_SIZE, LOCAL_RANK) are read in one place, `read_env`; everything
else takes ranks, sizes and meshes as arguments, so the same code runs under a fake process group
(`gpt3zh plan`) and in tests.
"""

from __future__ import annotations

import datetime
import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from .config import GPTConfig

# Tensor-parallel plan: {module name pattern: style}. colwise = out-features split (Megatron's
# ColumnParallelLinear: weight and bias dim 0); rowwise = in-features split (RowParallelLinear: weight
# dim 1, bias replicated, output all-reduced). Everything not listed is replicated across tp ranks.
TP_PLAN: dict[str, str] = {
    "blocks.*.attn.qkv": "colwise",  # [N, 3, D] rows: a contiguous shard is whole heads
    "blocks.*.attn.proj": "rowwise",
    "blocks.*.mlp.fc": "colwise",
    "blocks.*.mlp.proj": "rowwise",
}

# Added by `apply_tp(..., vocab_parallel=True)`: the embedding split along the vocabulary (rows, i.e.
# "rowwise" for nn.Embedding, Megatron's VocabParallelEmbedding). The output head is tied to this
# weight, so logits come out sharded on the vocab dim and the loss must run under `loss_parallel`.
VOCAB_PLAN: dict[str, str] = {"tok_emb": "rowwise", "ln_f": "replicate_dtensor"}

# Where each plan style cuts a parameter (name suffix -> tensor dim), used to slice checkpoints.
_SHARD_DIM = {("colwise", "weight"): 0, ("colwise", "bias"): 0, ("rowwise", "weight"): 1}


class ParallelError(ValueError):
    """An impossible parallel layout; the message says which sizes disagree and what would work."""


@dataclass(frozen=True)
class DistEnv:
    """What torchrun tells this process. Built only by `read_env` (or explicitly in tests)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The one place that reads the launcher's environment variables."""
    env = os.environ if environ is None else environ
    try:
        return DistEnv(
            rank=int(env.get("RANK", 0)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
        )
    except ValueError as err:
        raise ParallelError(f"bad torchrun environment (RANK / LOCAL_RANK / WORLD_SIZE): {err}") from None


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallelError(f"ParallelDims.{name} must be a positive int, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1) -> ParallelDims:
        """dp = world_size / tp."""
        if tp < 1 or world_size % tp:
            raise ParallelError(
                f"world size {world_size} is not divisible by tensor-parallel size tp={tp} "
                f"(world = dp x tp; valid tp for this world: {_divisors(world_size)})"
            )
        return cls(dp=world_size // tp, tp=tp)

    @classmethod
    def from_megatron(cls, block: Mapping[str, Any], world_size: int, where: str = "megatron") -> ParallelDims:
        """ModelScope's `megatron` block: {world_size, tensor_model_parallel_size[, ...]}.

        ModelScope's `megatron.world_size` is tp x pp (its model-parallel world); here there is no
        pipeline parallelism, so it must be tp, or the whole launched world (dp x tp).
        """
        tp = megatron_tp(block, where) or 1
        declared = block.get("world_size")
        if declared is not None and declared not in (tp, world_size):
            raise ParallelError(
                f"{where}.world_size={declared} does not match the launched world size {world_size} "
                f"(torchrun --nproc_per_node x --nnodes); with tensor_model_parallel_size={tp} it must be "
                f"{tp} (model-parallel size) or {world_size} (all processes)"
            )
        return cls.from_world(world_size, tp)

    def validate(self, cfg: GPTConfig, world_size: int | None = None, vocab_parallel: bool = True) -> None:
        """Raise one ParallelError naming every problem, before any process group or tensor exists."""
        problems = []
        if world_size is not None and world_size != self.world_size:
            problems.append(
                f"launched world size {world_size} != dp x tp = {self.dp} x {self.tp} = {self.world_size}"
            )
        t = self.tp
        if cfg.n_head % t:
            problems.append(f"n_head={cfg.n_head} is not divisible by tp={t} (tp must divide the heads)")
        if cfg.ffn_dim % t:
            problems.append(f"ffn width {cfg.ffn_dim} is not divisible by tp={t}")
        if vocab_parallel and cfg.vocab_size % t:
            problems.append(f"vocab_size={cfg.vocab_size} is not divisible by tp={t} (pad the vocabulary)")
        if problems:
            ok = [d for d in _divisors(cfg.n_head)
                  if cfg.ffn_dim % d == 0 and (not vocab_parallel or cfg.vocab_size % d == 0)]
            raise ParallelError(
                f"impossible parallel layout dp={self.dp} x tp={self.tp}: " + "; ".join(problems)
                + f". tp values that fit this model: {ok}"
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------------------ process group
def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_process_group(env: DistEnv, device_type: str, cpu_too: bool = False) -> None:
    """Start the default group once (gloo on CPU, nccl on CUDA); a no-op when already started.

    cpu_too: on CUDA, gloo for CPU tensors beside nccl (the server's control messages and the
    DCP reader travel as CPU tensors).
    """
    if dist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    backend = ("cpu:gloo,cuda:nccl" if cpu_too else "nccl") if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The (dp, tp) mesh over the default group; ranks r = dp_rank * tp + tp_rank (tp is innermost,
    so a tp group sits on one node, where its per-layer all-reduces are cheapest)."""
    return init_device_mesh(device_type, (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))


# ----------------------------------------------------------------------------------- tensor parallel
def _plan(vocab_parallel: bool) -> dict[str, str]:
    return {**TP_PLAN, **VOCAB_PLAN} if vocab_parallel else dict(TP_PLAN)


def _style(kind: str, module: nn.Module):
    if kind == "colwise":
        return ColwiseParallel()
    if kind == "rowwise":
        # Embedding rows are the vocabulary: each rank looks up its slice, the partial sums are reduced.
        return RowwiseParallel(input_layouts=Replicate()) if isinstance(module, nn.Embedding) else RowwiseParallel()
    if kind == "replicate_dtensor":
        # Hand the (replicated) final hidden states on as a DTensor so the tied head `h @ W_emb^T`
        # multiplies two DTensors and yields vocab-sharded logits.
        return PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Replicate(),
                                   use_local_output=False)
    raise ValueError(f"unknown tensor-parallel style {kind!r} (expected colwise or rowwise)")


def tp_plan_for(model: nn.Module, vocab_parallel: bool = False) -> dict[str, str]:
    """The plan table expanded to concrete module names of `model`."""
    plan = _plan(vocab_parallel)
    matched = {name: kind for name, _ in model.named_modules()
               for pat, kind in plan.items() if fnmatch.fnmatchcase(name, pat)}
    missing = [pat for pat in plan if not any(fnmatch.fnmatchcase(n, pat) for n in matched)]
    if missing:
        raise ValueError(f"tensor-parallel plan patterns match no module of the model: {missing}")
    return matched


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, vocab_parallel: bool = False) -> nn.Module:
    """Shard `model` in place over the 1-D `tp_mesh` following TP_PLAN (plus VOCAB_PLAN).

    Without vocab_parallel, activations between modules stay plain replicated tensors and the model's
    outputs are ordinary full logits. With it, logits are a DTensor sharded on the vocab dim: compute
    the loss inside `torch.distributed.tensor.parallel.loss_parallel()` (see `token_losses`).
    """
    if tp_mesh.size() == 1:
        return model
    modules = dict(model.named_modules())
    plan = {name: _style(kind, modules[name]) for name, kind in tp_plan_for(model, vocab_parallel).items()}
    return parallelize_module(model, tp_mesh, plan)


def shard_dims(model: nn.Module, vocab_parallel: bool = False) -> dict[str, int | None]:
    """{parameter name: tensor dim split across tp ranks, or None if replicated}."""
    out: dict[str, int | None] = {name: None for name, _ in model.named_parameters()}
    for module_name, kind in tp_plan_for(model, vocab_parallel).items():
        for suffix in ("weight", "bias"):
            name = f"{module_name}.{suffix}"
            if name in out:
                out[name] = 0 if module_name == "tok_emb" else _SHARD_DIM.get((kind, suffix))
    return out


# ------------------------------------------------------------------------------------- data parallel
def apply_dp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 over `dp_mesh`: each block is one all-gather/reduce-scatter unit, the root holds the
    embeddings and ln_f. Gradients are averaged over dp ranks in fp32 (reduce_dtype).

    Parameters that are already tp DTensors become 2-D (Shard on dp, tp's placement on tp).
    """
    if dp_mesh.size() == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    return model


def parallelize(model: nn.Module, mesh: DeviceMesh, vocab_parallel: bool = False, param_dtype=None) -> nn.Module:
    """apply_tp over mesh["tp"], then apply_dp over mesh["dp"] (torchtitan's order)."""
    apply_tp(model, mesh["tp"], vocab_parallel)
    return apply_dp(model, mesh["dp"], param_dtype)


# ------------------------------------------------------------------------------- weights and losses
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for DTensors)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into a parallelized model: each rank keeps its own slice.

    Every rank passes the same full tensors; names and shapes are checked against the model.
    """
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}")
    for name, p in params.items():
        full = state[name]
        if tuple(full.shape) != tuple(p.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(full.shape)} != model shape {tuple(p.shape)}")
        if isinstance(p, DTensor):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(full.to_local())
        else:
            p.copy_(full)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (B, T) in fp32, for full logits or vocab-sharded DTensor logits.

    Vocab-sharded logits are never gathered: each rank reduces its slice (Megatron's
    vocab_parallel_cross_entropy), which is what makes the vocab split pay. The result is a plain
    tensor, identical on the ranks of a tp group, and backward works outside any context manager.
    """
    if not isinstance(logits, DTensor):
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    if logits.placements != (Shard(logits.dim() - 1),):
        raise ValueError(f"token_losses: expected logits sharded on the vocab dim, got {logits.placements}")
    mesh = logits.device_mesh
    v_local = logits.to_local().shape[-1]
    start = mesh.get_local_rank() * v_local
    local = logits.to_local().flatten(0, 1)  # (B*T, V/tp)
    return _VocabParallelCE.apply(local, targets.flatten(), start, mesh.get_group()).view_as(targets)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, targets: torch.Tensor, start: int, group) -> torch.Tensor:
        x = local.float()  # (M, V/tp)
        peak = x.max(-1).values
        dist.all_reduce(peak, dist.ReduceOp.MAX, group=group)
        x = x - peak[:, None]  # stable exp; the max cancels in the loss
        in_range = (targets >= start) & (targets < start + x.shape[-1])
        idx = torch.where(in_range, targets - start, 0)
        picked = x.gather(1, idx[:, None]).squeeze(1) * in_range  # target logit, on its owner only
        exp = x.exp()
        sums = torch.stack([exp.sum(-1), picked])  # (2, M): one all-reduce for both
        dist.all_reduce(sums, group=group)
        ctx.save_for_backward(exp / sums[0][:, None], idx, in_range)
        return sums[0].log() - sums[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, idx, in_range = ctx.saved_tensors  # softmax slice (M, V/tp)
        g = probs.clone()
        g.scatter_add_(1, idx[:, None], -in_range.to(g.dtype)[:, None])
        return g * grad[:, None], None, None, None


# ------------------------------------------------------------------------------- gradient clipping
@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> float:
    """torch's clip_grad_norm_ for a mix of plain tensors and DTensors on different meshes.

    torch stacks the per-tensor norms, which needs them all on one mesh; with tp-only layouts the
    replicated parameters (layer norms, positions) are plain tensors beside tp DTensors. Norms are
    taken per (mesh, placements) group, made whole, then combined; a replicated tensor counts once.
    """
    params = [p for p in parameters if p.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=False)
        squares.append(full_tensor(norm).float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return float(total)


# ------------------------------------------------------------------------------ tensor-parallel inference
def tensor_parallel_model(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place for inference over `tp_mesh` with plain local tensors (gpt-fast style).

    Same table as training (TP_PLAN), as module swaps: a column-parallel layer becomes an nn.Linear
    holding its slice of the output features, a row-parallel one a `RowParallelLinear` holding its
    slice of the input features, which all-reduces its partial products. Plain tensors keep
    everything that reads parameter shapes working unchanged: the KV cache sizes itself from the
    local qkv width, and the tied head sees the whole (replicated) embedding. Every rank must run the
    same calls with the same inputs; all ranks then hold the same logits and pick the same tokens.
    """
    tp = tp_mesh.size()
    if tp == 1:
        return model
    cfg = model.config
    ParallelDims(tp=tp).validate(cfg, vocab_parallel=False)
    rank, group = tp_mesh.get_local_rank(), tp_mesh.get_group()
    modules = dict(model.named_modules())
    for name, kind in tp_plan_for(model).items():
        lin = modules[name]
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        if kind == "colwise":
            part = nn.Linear(lin.in_features, lin.out_features // tp, device=lin.weight.device, dtype=lin.weight.dtype)
            part.weight = nn.Parameter(lin.weight.detach().chunk(tp, 0)[rank].clone(), requires_grad=False)
            part.bias = nn.Parameter(lin.bias.detach().chunk(tp, 0)[rank].clone(), requires_grad=False)
        else:
            part = RowParallelLinear(lin.weight.detach().chunk(tp, 1)[rank].clone(), lin.bias.detach().clone(), group)
        setattr(parent, child, part)
    return model


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_slice @ W_slice^T) + b: this rank's slice of the input features (inference)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, group) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in / tp)
        self.bias = nn.Parameter(bias, requires_grad=False)  # (out,), added once, after the sum
        self._group = _SharedRef(group)  # a prepared view (deepcopy of the modules) shares the group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self._group.value)
        return y + self.bias


class _SharedRef:
    """Holds an object that copies of a module must share, not copy (a process group)."""

    def __init__(self, value) -> None:
        self.value = value

    def __deepcopy__(self, memo) -> _SharedRef:
        return self


def check_tp_inference(cfg: GPTConfig, tp: int, world_size: int, command: str = "generate") -> None:
    """The inference layout (one tp group of every launched process), checked before any process
    group or weight: the same ParallelError on every rank, so none waits on a collective.

    The serving layout keeps the vocabulary whole on every rank (the tied head's logits come out
    whole, and every rank samples the same token from them), so tp need not divide the vocabulary.
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ParallelError(f"--tp must be a positive int, got {tp!r}")
    if world_size != tp:
        raise ParallelError(
            f"tensor parallelism tp={tp} needs {tp} processes: launch with "
            f"`torchrun --nproc_per_node {tp} -m gpt3zh {command} --tp {tp} ...` (this launch has {world_size})"
        )
    ParallelDims(tp=tp).validate(cfg, vocab_parallel=False)


def megatron_tp(block: Mapping[str, Any] | None, where: str = "configuration.json megatron") -> int | None:
    """tensor_model_parallel_size of a ModelScope `megatron` block (None without one). Its
    world_size is the training world (tp x pp x dp), which inference does not use."""
    if not block:
        return None
    tp = block.get("tensor_model_parallel_size", 1)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ParallelError(f"{where}.tensor_model_parallel_size must be a positive int, got {tp!r}")
    pp = block.get("pipeline_model_parallel_size", 1)
    if pp != 1:
        raise ParallelError(f"{where}.pipeline_model_parallel_size={pp!r}: pipeline parallelism is not supported")
    return tp


def start_tp_inference(env: DistEnv, tp: int, device_type: str) -> DeviceMesh:
    """The process group (gloo beside nccl on CUDA, for CPU tensors) and the 1-D "tp" mesh."""
    init_process_group(env, device_type, cpu_too=True)
    return init_device_mesh(device_type, (tp,), mesh_dim_names=("tp",))


def gloo_group(timeout: float):
    """A gloo group of every rank whose collectives raise after `timeout` seconds (a collective:
    every rank calls it). The model's own collectives keep the default group's long timeout, so
    loading a large checkpoint on a slow rank is no failure."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))


def agree_across_ranks(what: str, value: str) -> None:
    """Raise the same ParallelError on every rank unless all ranks pass the same `value` (a collective)."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise ParallelError(f"the ranks disagree on the {what}: "
                            + "; ".join(f"rank {r}: {v}" for r, v in enumerate(values)))


def load_tp_inference(source, tp_mesh: DeviceMesh, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> tuple[nn.Module, str]:
    """(the model in the inference layout on `device`, what this rank read) from a
    `gpt3zh.checkpoint.sharded.Source`: the layout is built on the meta device (no memory), then
    each rank reads only its slices where the format allows (see checkpoint/sharded.py)."""
    from .checkpoint.sharded import read_tp_shard
    from .model import GPT

    with torch.device("meta"):
        model = GPT(source.config)
    split = shard_dims(model)  # TP_PLAN's cut of every tensor; the vocabulary stays whole
    tensor_parallel_model(model, tp_mesh)
    mesh = tp_mesh
    if source.format == "dcp" and tp_mesh.device_type != "cpu":  # DCP reads into CPU tensors
        mesh = init_device_mesh("cpu", (tp_mesh.size(),))
    state, read = read_tp_shard(source, split, tp_mesh.get_local_rank(), tp_mesh.size(), dtype, mesh)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval(), read


def setup_tp_inference(model: nn.Module, tp: int, env: DistEnv | None = None) -> DeviceMesh:
    """`gpt3zh generate --tp N` under torchrun: check the launch, start the group, shard `model`."""
    env = env or read_env()
    check_tp_inference(model.config, tp, env.world_size)
    device_type = model.tok_emb.weight.device.type
    init_process_group(env, device_type)
    mesh = init_device_mesh(device_type, (tp,), mesh_dim_names=("tp",))
    tensor_parallel_model(model, mesh)
    return mesh
