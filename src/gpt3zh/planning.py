"""Per-rank training memory of a (dp, tp) layout, measured on the real parallelization.

`plan_layout` builds the model on the meta device (no memory), starts a *fake* process group of
the requested world size in this one process (torch's testing backend "fake": collectives are
no-ops, so 512 ranks cost nothing) and applies `parallel.parallelize` exactly as training does.
Parameter, gradient and optimizer bytes are then read from the local shards the chosen rank would
hold (FSDP shards are uneven when a dim does not divide by dp, which is why the rank matters).

What cannot be read off meta tensors is estimated from the shapes in model.py:
- activations: per layer and token 4H values replicated across tp (ln_1 and ln_2 inputs and
  outputs) plus (4H + 2F)/tp sharded (q, k, v, attention output, fc and GELU outputs); with
  activation checkpointing only each block input (H) is kept, plus one block's full set while it
  is recomputed. The vocab-parallel loss keeps two fp32 (B, T, V/tp) tensors (logits, softmax).
- transient: with dp > 1, FSDP all-gathers a block before use and prefetches the next (two
  unsharded blocks of weights, one of gradients before the reduce-scatter); the root (embeddings,
  ln_f) stays unsharded for the whole step.
A fit leaves 10% of the GPU for the CUDA context, communication buffers and fragmentation.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from .config import GPTConfig
from .parallel import ParallelDims, ParallelError, local_tensor

GiB = 1024**3
RESERVE = 0.10  # of the GPU, kept free: CUDA context, NCCL buffers, allocator fragmentation
TP_CHOICES = (1, 2, 4, 8)  # one node: tp's all-reduces run twice per layer, keep them on NVLink


@dataclass(frozen=True)
class MemoryPlan:
    dp: int
    tp: int
    rank: int
    params: int  # bytes on this rank
    grads: int
    optimizer: int
    activations: int
    transient: int
    gpu_bytes: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.transient

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes * (1 - RESERVE)

    def to_dict(self) -> dict:
        """JSON form: sizes named *_bytes (as `gpt3zh info --json`'s bf16_bytes; `params` there is a count)."""
        d = asdict(self)
        sizes = ("params", "grads", "optimizer", "activations", "transient", "gpu_bytes")
        out = {k: v for k, v in d.items() if k not in sizes}
        out.update({k if k.endswith("_bytes") else f"{k}_bytes": d[k] for k in sizes})
        return {**out, "total_bytes": self.total, "fits": self.fits}


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int):
    """A process group of `world_size` ranks that lives in this process only (this one is `rank`)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan needs its own fake process group; a process group is already running")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _bytes(tensors) -> int:
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


def plan_layout(
    cfg: GPTConfig,
    dims: ParallelDims,
    *,
    seq_len: int | None = None,
    micro_batch: int = 1,
    gpu_mem_gib: float = 80.0,
    param_dtype: torch.dtype = torch.bfloat16,
    act_bytes: int = 2,
    activation_checkpointing: bool = False,
    rank: int = 0,
) -> MemoryPlan:
    """Memory of global `rank` in a dims.dp x dims.tp run (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh

    from .model import GPT
    from .parallel import apply_dp, apply_tp

    dims.validate(cfg, vocab_parallel=dims.tp > 1)
    if not 0 <= rank < dims.world_size:
        raise ParallelError(f"rank {rank} is outside the world of {dims.world_size}")
    T = seq_len or cfg.max_seq_len
    if T > cfg.max_seq_len:
        raise ParallelError(f"sequence length {T} exceeds the model's context max_seq_len={cfg.max_seq_len}")
    with fake_process_group(rank, dims.world_size):
        mesh = init_device_mesh("cpu", (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))
        with torch.device("meta"):
            model = GPT(cfg).to(param_dtype)
        apply_tp(model, mesh["tp"], vocab_parallel=dims.tp > 1)
        block = _bytes(model.blocks[0].parameters())  # one block's tp-local weights, unsharded on dp
        root = _bytes(p for n, p in model.named_parameters() if not n.startswith("blocks."))
        apply_dp(model, mesh["dp"])
        params = list(model.parameters())
        param_bytes = _bytes(params)
    # AdamW: two moments per element (fp32 for bf16 weights: BF16AdamW) and a 4-byte step per tensor
    moment = 4 if param_dtype == torch.bfloat16 else torch.finfo(param_dtype).bits // 8
    elements = sum(local_tensor(p).numel() for p in params)
    optimizer = 2 * moment * elements + 4 * len(params)
    transient = 3 * block + 2 * root if dims.dp > 1 else 0
    activations = activation_bytes(cfg, dims.tp, micro_batch, T, act_bytes, activation_checkpointing)
    return MemoryPlan(dims.dp, dims.tp, rank, param_bytes, param_bytes, optimizer, activations, transient,
                      int(gpu_mem_gib * GiB))


def activation_bytes(cfg: GPTConfig, tp: int, batch: int, seq: int, act_bytes: int, checkpointing: bool) -> int:
    H, F, V, L = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.n_layer
    tokens = batch * seq
    per_layer = 4 * H + (4 * H + 2 * F) // tp  # values per token
    layers = L * H + per_layer if checkpointing else L * per_layer
    loss = 2 * 4 * V // tp  # fp32 logits and softmax of the vocab-parallel loss
    return tokens * ((layers + H) * act_bytes + loss)  # + H: the embedding output


def search(cfg: GPTConfig, max_world: int = 512, **kw) -> MemoryPlan | None:
    """The smallest world (then the smallest tp) whose rank 0 fits; None if none up to max_world."""
    world = 1
    while world <= max_world:
        for tp in TP_CHOICES:
            if tp > world or world % tp or cfg.n_head % tp or cfg.vocab_size % tp or cfg.ffn_dim % tp:
                continue
            if _lower_bound(cfg, world, tp, **kw) > kw.get("gpu_mem_gib", 80.0) * GiB * (1 - RESERVE):
                continue  # cannot fit even with perfect sharding: skip the (slower) measurement
            plan = plan_layout(cfg, ParallelDims(dp=world // tp, tp=tp), **kw)
            if plan.fits:
                return plan
        world *= 2
    return None


def _lower_bound(cfg: GPTConfig, world: int, tp: int, **kw) -> float:
    pbytes = torch.finfo(kw.get("param_dtype", torch.bfloat16)).bits // 8
    moment = 4 if pbytes == 2 else pbytes
    states = cfg.num_params / world * (2 * pbytes + 2 * moment)
    act = activation_bytes(cfg, tp, kw.get("micro_batch", 1), kw.get("seq_len") or cfg.max_seq_len,
                           kw.get("act_bytes", 2), kw.get("activation_checkpointing", False))
    return states + act


def format_plan(name: str, plan: MemoryPlan) -> str:
    def gib(n: float) -> str:
        return f"{n / GiB:8.2f} GiB"

    rows = [
        f"{name}: dp={plan.dp} x tp={plan.tp} = {plan.dp * plan.tp} GPUs (rank {plan.rank})",
        f"  params       {gib(plan.params)}",
        f"  grads        {gib(plan.grads)}",
        f"  optimizer    {gib(plan.optimizer)}",
        f"  activations  {gib(plan.activations)}",
        f"  fsdp buffers {gib(plan.transient)}",
        (f"  total        {gib(plan.total)} of {plan.gpu_bytes / GiB:.0f} GiB "
         f"({'fits' if plan.fits else 'does NOT fit'}, {RESERVE:.0%} kept free)"),
    ]
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ serving
@dataclass(frozen=True)
class ServePlan:
    """Per-GPU memory of `gpt3zh serve --tp N` (every rank holds the same amounts)."""

    tp: int
    batch: int  # engine rows (--max-batch)
    context: int  # KV cache slots per row (--max-len)
    weights: int  # bytes per GPU
    kv_cache: int
    activations: int
    gpu_bytes: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes * (1 - RESERVE)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}


def plan_serving(cfg: GPTConfig, tp: int, *, batch: int = 8, context: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, act_bytes: int = 2, gpu_mem_gib: float = 80.0,
                 prefill_tokens: int | None = None) -> ServePlan:
    """Memory of one rank of the serving layout, measured where it can be.

    Weights and the KV cache are read off the real thing on the meta device: the model in the
    inference layout (`parallel.tensor_parallel_model` under a fake process group of tp ranks:
    qkv / fc / proj sliced, embeddings, positions and layer norms whole on every rank) and the
    engine's cache for `batch` rows of `context` slots (`GPT.setup_kv_cache`: local heads only).
    Activations are estimated for the largest prefill the engine runs (engine.PREFILL_TOKENS
    padded prompt tokens, or batch x context if fewer): one layer's values at a time (4H replicated
    plus (4H + 2F)/tp sliced per token, as `activation_bytes`), plus fp32 logits of every row.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from .engine import PREFILL_TOKENS
    from .model import GPT
    from .parallel import check_tp_inference, tensor_parallel_model

    check_tp_inference(cfg, tp, tp, "serve")
    T = context or cfg.max_seq_len
    if not 0 < T <= cfg.max_seq_len:
        raise ParallelError(f"context {T} must be in [1, max_seq_len={cfg.max_seq_len}]")
    if batch < 1:
        raise ParallelError(f"batch must be >= 1, got {batch}")
    with fake_process_group(0, tp):
        with torch.device("meta"):
            model = GPT(cfg).to(dtype)
        if tp > 1:
            tensor_parallel_model(model, init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",)))
        weights = _bytes(model.parameters())
        model.setup_kv_cache(batch, T)
        kv = _bytes(model.buffers())
    tokens = min(prefill_tokens or PREFILL_TOKENS, batch * T)
    H, F, V = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    activations = tokens * (4 * H + (4 * H + 2 * F) // tp) * act_bytes + batch * V * 4
    return ServePlan(tp, batch, T, weights, kv, activations, int(gpu_mem_gib * GiB))


def serving_tps(cfg: GPTConfig) -> list[int]:
    """The tp sizes of one node that the model's heads and FFN width allow."""
    return [tp for tp in TP_CHOICES if cfg.n_head % tp == 0 and cfg.ffn_dim % tp == 0]


def format_serve_plans(name: str, plans: list[ServePlan], dtype: str) -> str:
    p0 = plans[0]

    def gib(n: float) -> str:
        return f"{n / GiB:.1f} GiB"

    head = (f"{name} serving, {dtype} weights and KV cache, batch {p0.batch} x context {p0.context}, "
            f"{p0.gpu_bytes / GiB:.0f} GiB GPUs ({RESERVE:.0%} kept free); per GPU:")
    cols = ("tp", "GPUs", "weights", "KV cache", "activations", "total", "fits")
    rows = [(str(p.tp), str(p.tp), gib(p.weights), gib(p.kv_cache), gib(p.activations), gib(p.total),
             "yes" if p.fits else "no") for p in plans]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([head, line(cols), *map(line, rows)])


# ------------------------------------------------------------------------------------------ LoRA
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # gpt3zh's LoRA default: every block linear


@dataclass(frozen=True)
class LoraPlan:
    """One GPU's memory for LoRA fine-tuning (train.lora): a frozen base, fp32 adapters."""

    r: int
    adapter_params: int
    base_params: int
    base: int  # bytes: the frozen base weights (no gradients, no optimizer state)
    adapters: int  # fp32 adapter weights
    grads: int  # fp32, adapters only
    optimizer: int  # AdamW: two fp32 moments per adapter weight
    activations: int
    gpu_bytes: int

    @property
    def total(self) -> int:
        return self.base + self.adapters + self.grads + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes * (1 - RESERVE)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}


def plan_lora(
    cfg: GPTConfig,
    *,
    r: int = 8,
    targets: tuple[str, ...] = LORA_TARGETS,
    base_dtype: torch.dtype = torch.bfloat16,
    seq_len: int | None = None,
    micro_batch: int = 1,
    gpu_mem_gib: float = 80.0,
    act_bytes: int = 2,
    activation_checkpointing: bool = False,
    dropout: float = 0.0,
) -> LoraPlan:
    """Memory of LoRA fine-tuning on one GPU, read off the model built on the meta device.

    Adapter sizes are exact: a target nn.Linear (in, out) gets A (r, in) and B (out, r). The
    activations are full fine-tuning's (the same tensors are saved: the frozen weights need no
    gradient, but every layer still passes one back), plus per target layer the (tokens, r)
    output of A and, with dropout > 0, the dropped copy of its input.
    """
    from torch import nn

    from .model import GPT

    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    T = seq_len or cfg.max_seq_len
    if T > cfg.max_seq_len:
        raise ParallelError(f"sequence length {T} exceeds the model's context max_seq_len={cfg.max_seq_len}")
    with torch.device("meta"):
        model = GPT(cfg).to(base_dtype)
    targeted = [m for name, m in model.named_modules()
                if type(m) is nn.Linear and any(name == t or name.endswith("." + t) for t in targets)]
    if not targeted:
        raise ValueError(f"LoRA targets {list(targets)} name no linear layer "
                         f"(each block has {', '.join(LORA_TARGETS)})")
    adapter_params = sum(r * (m.in_features + m.out_features) for m in targeted)
    extra_per_token = r * len(targeted)  # A's outputs
    if dropout > 0:
        extra_per_token += sum(m.in_features for m in targeted)
    layers_kept = 1 if activation_checkpointing else cfg.n_layer  # with checkpointing: one block's recompute
    extra = micro_batch * T * extra_per_token // cfg.n_layer * layers_kept * act_bytes
    activations = activation_bytes(cfg, 1, micro_batch, T, act_bytes, activation_checkpointing) + extra
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    base_params = sum(p.numel() for p in model.parameters())
    return LoraPlan(r, adapter_params, base_params, base, 4 * adapter_params, 4 * adapter_params,
                    8 * adapter_params + 4 * 2 * len(targeted), activations, int(gpu_mem_gib * GiB))


def format_lora_plan(name: str, plan: LoraPlan) -> str:
    def gib(n: float) -> str:
        return f"{n / GiB:8.2f} GiB"

    rows = [
        (f"{name}: LoRA r={plan.r} on 1 GPU ({plan.adapter_params:,} trained parameters, "
         f"{plan.adapter_params / plan.base_params:.2%} of the base's {plan.base_params:,})"),
        f"  frozen base  {gib(plan.base)}",
        f"  adapters     {gib(plan.adapters)}",
        f"  grads        {gib(plan.grads)}",
        f"  optimizer    {gib(plan.optimizer)}",
        f"  activations  {gib(plan.activations)}",
        (f"  total        {gib(plan.total)} of {plan.gpu_bytes / GiB:.0f} GiB "
         f"({'fits' if plan.fits else 'does NOT fit'}, {RESERVE:.0%} kept free)"),
    ]
    return "\n".join(rows)
