"""The data x tensor parallel trainer: `torchrun --nproc_per_node N -m gpt3zh train CONFIG`, or
`gpt3zh.train(...)` in a script started by torchrun (gpt3zh.training.train picks this trainer).

`DistributedTrainer` is `Trainer` with its parallel parts swapped (the loop itself is shared):

- layout: the config's `megatron` block gives tp; dp = world / tp. It is checked against the
  launched world and the model (heads, ffn width and vocabulary divisible by tp) before the
  process group starts, so every rank raises the same error and nothing waits on a collective.
- model: the single-device model, built (or loaded, e.g. from Megatron shards of any tp) whole
  on every rank, then `parallel.parallelize`: TP from the plan table with a vocab-parallel
  embedding and loss, FSDP2 over dp.
- data: `rank` / `world` of the base class are the *data-parallel* rank and size; the ranks of a
  tp group read the same rows.
- checkpoints: `torch.distributed.checkpoint` (one shard file per rank plus metadata, written in
  parallel) so a run saved at one (dp, tp) resumes at any other; `state.pt` beside it holds the
  step, loss scaler and RNG.
- export: the full weights are gathered to rank 0 and written by `save_model`, Megatron shards
  at `megatron.checkpoint_tensor_model_parallel_size` (default: the training tp).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..parallel import (
    DistEnv,
    ParallelDims,
    ParallelError,
    build_mesh,
    clip_grad_norm_,
    init_process_group,
    parallelize,
    token_losses,
)
from .config import TrainConfig
from .data import Batch
from .loop import Trainer
from .loop.trainer import (
    CKPT_DIR,
    STATE_FILE,
    Extras,
    _discard,
    _rng_state,
    _set_rng_state,
    _step_name,
)

DCP_DIR = "dcp"


def layout(cfg: TrainConfig, world_size: int, gpt_cfg) -> ParallelDims:
    """(dp, tp) for this config and launched world; raises ParallelError naming every mismatch."""
    dims = ParallelDims.from_megatron(dataclasses.asdict(cfg.megatron), world_size)
    dims.validate(gpt_cfg, world_size, vocab_parallel=True)
    if dims.world_size > 1 and {"rouge", "bleu"} & set(cfg.evaluation.metrics):
        # generation calls model.hidden directly, outside the forward hooks FSDP and TP rely on
        raise ParallelError(
            "evaluation.metrics rouge/bleu generate text, which the sharded training model does not do "
            f"(dp={dims.dp} x tp={dims.tp}); evaluate ppl here and run `gpt3zh eval` on the export"
        )
    return dims


class DistributedTrainer(Trainer):
    def __init__(self, cfg: TrainConfig, env: DistEnv, extras: Extras | None = None) -> None:
        self.env = env
        super().__init__(cfg, rank=0, world=1, extras=extras)  # data rank / world are set once the mesh exists
        self.is_main = env.rank == 0

    def resolve_device(self) -> torch.device:
        device = super().resolve_device()
        return torch.device("cuda", self.env.local_rank) if device.type == "cuda" else device

    # ------------------------------------------------------------------------------------ setup
    def prepare(self) -> None:
        self.dims = layout(self.cfg, self.env.world_size, self.model_config())  # before any collective
        init_process_group(self.env, self.device.type)
        self.mesh = build_mesh(self.dims, self.device.type)
        self.rank, self.world = self.mesh["dp"].get_local_rank(), self.dims.dp
        self.dp_group = self.mesh["dp"].get_group()
        # Rank 0 reads and tokenizes the data (and fills the token cache) first; the others then
        # read the cache. A data error on rank 0 is raised on every rank, so none waits forever.
        error = None
        if self.env.rank == 0:
            try:
                super().prepare()
            except (ValueError, OSError) as err:
                error = err
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        if message[0] is not None:
            raise ConfigError(f"rank 0 failed to prepare the run: {message[0]}")
        if self.env.rank != 0:
            super().prepare()

    def build_model(self, gpt_cfg) -> torch.nn.Module:
        # Every rank builds the same whole model (same seed, or the same checkpoint: load_model
        # merges Megatron shards of any count), then keeps its slice.
        model = super().build_model(gpt_cfg)
        return parallelize(model, self.mesh, vocab_parallel=self.dims.tp > 1)

    # ------------------------------------------------------------------------------- step parts
    def all_reduce_sum(self, value):
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.dp_group)
        return int(t.item()) if isinstance(value, int) else float(t.item())

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        # Through forward (FSDP's hooks run there); with tp the logits stay vocab-sharded and the
        # loss is reduced slice by slice (token_losses), never gathered.
        losses = token_losses(model(batch.tokens), batch.labels)  # (B, T)
        return torch.where(batch.mask, losses, 0.0).sum()

    def clip_grad_norm(self, model, max_norm: float) -> float:
        return clip_grad_norm_(model.parameters(), max_norm)

    def evaluate(self, model) -> dict[str, Any]:
        return super().evaluate(_FullLogits(model))

    # ------------------------------------------------------------------------------ checkpoints
    def state_options(self, **kw):
        """DCP state-dict options: with LoRA the frozen base is left out (it is model.path's)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.lora is not None, **kw)

    def checkpoint(self, model, optimizer, scaler, step: int, last_eval: dict, best: dict | None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        ckpt_dir = self.work_dir / CKPT_DIR
        dest = ckpt_dir / _step_name(step)
        tmp = ckpt_dir / f".tmp-{dest.name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.state_options())
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
        adapter = None
        if self.lora is not None:  # a collective: the whole adapters to rank 0, for the adapter files
            adapter = get_model_state_dict(model, options=self.state_options(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            rest = {"scaler": scaler.state_dict(), "rng": _rng_state(), "step": step}
            if self.lora is not None:
                rest["lora_base"] = self.base_record
            torch.save(rest, tmp / STATE_FILE)
            meta = {"step": step, "eval": last_eval, "config": self.cfg.to_dict(),
                    "parallel": {"dp": self.dims.dp, "tp": self.dims.tp}}
            self.write_checkpoint_files(tmp, meta)
            if adapter is not None:
                self.write_adapter_files(tmp, adapter)
            if dest.exists():
                _discard(dest)
            os.replace(tmp, dest)
            best = self.record_best(ckpt_dir, step, last_eval, best)
        dist.barrier()  # nobody reads or overwrites a checkpoint that is still being renamed
        return best

    def maybe_resume(self, model, optimizer, scaler) -> int:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = self.resume_path()
        if path is None:
            return 0
        if not (path / DCP_DIR / ".metadata").is_file() or not (path / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"train.resume: {path} is not a distributed checkpoint (expected {DCP_DIR}/.metadata and "
                f"{STATE_FILE}); single-process checkpoints resume with single-process training"
            )
        rest = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        self.check_same_base(path, rest.get("lora_base"))
        # this run's layout: DCP reshards into it
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.state_options())
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=self.state_options(strict=self.lora is None))
        scaler.load_state_dict(rest["scaler"])
        _set_rng_state(rest["rng"])
        return int(rest["step"])

    def export(self, model, tok, dests: dict[str, Path] | None = None) -> Path | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ..checkpoint import lora
        from ..model import GPT

        # a collective: every rank takes part, rank 0 receives the whole tensors on the CPU
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out = None
        if self.is_main:
            with torch.device("meta"):
                whole = GPT(self.gpt_cfg)
                if self.lora is not None:  # the same layer swaps, so the names match
                    lora.add_lora(whole, self.peft_config())
            whole.load_state_dict(sd, assign=True)
            shards = self.cfg.megatron.checkpoint_tensor_model_parallel_size or self.dims.tp
            out = self.write_exports(whole, tok, megatron_tp=shards, dests=dests)
        dist.barrier()
        return out


class _FullLogits:
    """Evaluation sees ordinary (B, T, V) logits: vocab-sharded ones are gathered."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        from ..parallel import full_tensor

        return full_tensor(self.model(idx))

    def __getattr__(self, name: str):
        return getattr(self.model, name)
