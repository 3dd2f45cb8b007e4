"""The single-process training loop.

`Trainer.run()` reads top to bottom: check everything (config, model context, tokenizer, data)
before step 1, then for each optimizer step: collate the step's micro-batches, forward/backward
with autocast, clip, step, log; evaluate and checkpoint on their intervals; export at the end.

What a config file cannot hold comes in `Extras`: in-memory datasets (a `datasets.Dataset`, an
MsDataset, a list of dicts), a Python learning-rate function (`LambdaLR`), and a callback at each
epoch's end (gpt3zh.compat.modelscope writes ModelScope's per-epoch files with it).

The parts a parallel trainer replaces are methods with one job each: `build_model`,
`build_optimizer`, `shard` (rank and world are attributes passed in, never read from the
environment), `all_reduce_sum`, `save_checkpoint` / `load_checkpoint`, `export`. The data
position is a pure function of the global step (batches come from `epoch_batches(seed, epoch)`),
so resume needs only the step, the model, the optimizer, the loss scaler and the RNG state.

Failure rules: a work_dir holding another run is refused (unless resumed or `train.overwrite`);
what a killed run left half-written is cleaned at start; checkpoints and exports are written to a
temp dir and renamed, so a crash or a full disk never damages an earlier one; resume falls back
past an unreadable newest checkpoint; a non-finite loss or gradient stops the run before its
update is applied, leaving the last checkpoint as the last good state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...checkpoint.errors import CheckpointError
from ...checkpoint.files import load_torch, recover_output_dir, save_torch
from ...config import ConfigError, GenerationDefaults, GPTConfig
from ...failpoints import failpoint
from ...fileio import describe_os_error, writing
from ...model import GPT
from ..config import EXPORT_FORMATS, TrainConfig
from ..data import (
    Batch,
    TokenRows,
    collate,
    detect_mode,
    epoch_batches,
    first_row_without_target,
    load_rows_tokens,
    load_token_rows,
    read_rows,
    rows_from_dataset,
    shard,
    tokenizer_fingerprint,
)
from ..evaluate import evaluate_generation, evaluate_ppl
from ..optim import apply_activation_checkpointing, build_optimizer, estimate_memory, format_estimate
from ..schedules import LRLambda, lr_factors

CKPT_DIR = "checkpoints"
STATE_FILE = "state.pt"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_TAG = "gpt3zh-train"  # config.json "format" of a checkpoint dir (checkpoint.formats reads it)


class TrainingError(ValueError):
    """The run cannot go on (it diverged, or a checkpoint cannot be resumed); the message says why
    and what to do. A ValueError, so the command line prints it as one line."""


_logger = logging.getLogger("gpt3zh.train")


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a redirect, a test's capture)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def note(message: str, level: int = logging.INFO) -> None:
    """A line for the person running the job, through logging (stdout ends with the JSON summary).

    Unless the application gave the `gpt3zh.train` logger handlers of its own, the lines go to
    stderr as `gpt3zh train: ...` (set up at the first line, never on import)."""
    if not _logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("gpt3zh train: %(message)s"))
        _logger.addHandler(handler)
        _logger.setLevel(logging.INFO)
        _logger.propagate = False  # the handler above already shows it; a root handler would repeat it
    _logger.log(level, message)


@dataclass
class TrainResult:
    work_dir: Path
    output_dir: Path | None
    step: int
    train_loss: float | None
    eval: dict[str, Any] = field(default_factory=dict)
    best_checkpoint: Path | None = None


@dataclass(frozen=True)
class Extras:
    """What a config file cannot hold (gpt3zh.train's keyword arguments).

    train_dataset / eval_dataset: a `datasets.Dataset`, an MsDataset, a list of dicts (rows with
    src_txt, optionally tgt_txt, as ModelScope's trainer reads them) or a data file path, instead
    of dataset.train / dataset.eval. lr_lambda: step (or epoch, with by_epoch) -> lr factor, for
    train.lr_scheduler.type=LambdaLR. on_epoch_end(trainer, model, epoch): called on every rank
    after epoch `epoch` (1-based) and its checkpoint; a collective (trainer.export) is allowed."""

    train_dataset: Any = None
    eval_dataset: Any = None
    lr_lambda: LRLambda | None = None
    on_epoch_end: Callable[[Trainer, torch.nn.Module, int], None] | None = None


@dataclass
class DataSource:
    """One split: a data file, or in-memory rows already checked (their columns and types)."""

    name: str  # how messages name it: "dataset.train FILE" or "train_dataset"
    path: Path | None = None
    rows: list[dict[str, Any]] | None = None
    mode: str | None = None


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1, extras: Extras | None = None) -> None:
        self.cfg = cfg
        self.extras = extras or Extras()
        self.rank, self.world = rank, world
        self.work_dir = Path(cfg.train.work_dir)
        self.device = self.resolve_device()
        self.is_main = rank == 0
        self.lora = cfg.train.lora if cfg.train.lora.r else None  # LoRA fine-tuning (training/config.py)

    # ------------------------------------------------------------------------------ swappable parts
    def resolve_device(self) -> torch.device:
        want = self.cfg.train.device
        if want == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"train.device={want!r} but CUDA is not available")
        return torch.device(want)

    def model_config(self) -> GPTConfig:
        """The architecture, without loading weights (to check the context before training)."""
        m = self.cfg.model
        if m.preset is not None:
            return m.gpt_config()
        from ...checkpoint import describe

        return describe(m.path).config

    def load_tokenizer(self):
        from ...hub import resolve_model
        from ...tokenizer import load_tokenizer

        # resolved here (an id -> its cached dir) so the token cache's fingerprint reads the files
        source = resolve_model(self.cfg.tokenizer or self.cfg.model.path)
        return load_tokenizer(source), source

    def build_model(self, gpt_cfg: GPTConfig) -> torch.nn.Module:
        """A fresh preset model (seeded init) or the model directory's weights, on self.device."""
        if self.cfg.model.preset is not None:
            model = GPT(gpt_cfg)
        else:
            from ...checkpoint import load_model

            model = load_model(self.cfg.model.path)  # its generation defaults: self.generation
        model = model.to(self.device)
        if self.lora is not None:
            model = self.add_adapters(model)
        elif self.cfg.train.param_dtype == "bf16":
            model = model.to(torch.bfloat16)
        else:
            model = model.float()  # checkpoints may store bf16; training keeps fp32 weights
        if self.cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        return model

    def add_adapters(self, model: GPT) -> GPT:
        """LoRA: the base frozen in train.lora.base_dtype, fp32 rank-r adapters on the target layers
        (peft's layers, swapped in). The base is recorded (where, config, fingerprint) first."""
        from ...checkpoint import lora

        self.base_record = lora.describe_base(self.cfg.model.path, self.gpt_cfg, self.generation, model)
        model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.lora.base_dtype])
        return lora.add_lora(model, self.peft_config())

    def peft_config(self):
        from ...checkpoint import lora

        c = self.lora
        return lora.peft_config(c.r, c.alpha, c.dropout, c.target_modules, self.base_record["base"])

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model: every weight, or with LoRA the adapters only (the
        frozen base is read again from model.path on resume)."""
        if self.lora is None:
            return model.state_dict()
        return {k: v for k, v in model.state_dict().items() if "lora_" in k}

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(model, self.cfg.train.optimizer, self.device)

    def shard(self, indices: list[int]) -> list[int]:
        return shard(indices, self.rank, self.world)

    def all_reduce_sum(self, value: int) -> int:
        return value  # one process: nothing to sum across

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return token_loss_sum(model, batch)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def save_checkpoint(self, state: dict[str, Any], dest: Path) -> None:
        """Write state into dest atomically: a temp dir, then one rename (a crash or a full disk
        leaves only the temp dir, removed here on failure or at the next start)."""
        with self.staging(dest) as tmp:
            save_torch(state["train"], tmp / STATE_FILE, clone_views=False)  # state dicts hold no views
            self.write_checkpoint_files(tmp, state["meta"])
            if self.lora is not None:
                self.write_adapter_files(tmp, state["train"]["model"])

    @contextlib.contextmanager
    def staging(self, dest: Path):
        """A fresh temp dir beside dest; on success it replaces dest in one rename."""
        tmp = dest.parent / f".tmp-{dest.name}"
        try:
            with writing(dest, name_this=True):
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                yield tmp
                failpoint("checkpoint.write")
                if dest.exists():  # re-saving the same step (e.g. after resume): replace it whole
                    _discard(dest)
                os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write_checkpoint_files(self, tmp: Path, meta: dict[str, Any]) -> None:
        """meta.json, and what makes the checkpoint a model directory of its own (config.json, the
        tokenizer), so load_model / eval / export take it directly."""
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        config = {"format": CHECKPOINT_TAG, "model": self.gpt_cfg.to_dict(), "generation": self.generation.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        self.tok.save(tmp)

    def write_adapter_files(self, tmp: Path, adapter: dict[str, torch.Tensor]) -> None:
        """A LoRA checkpoint is also an adapter directory (peft's files, the base record): every
        gpt3zh command loads it as base + adapter."""
        from ...checkpoint import lora

        lora.write_adapter(tmp, lora.adapter_weights(adapter), self.peft_config(), self.base_record)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """The training state at `path` (weights only; an unreadable file is a CheckpointError)."""
        state = load_torch(path / STATE_FILE, "training checkpoint", mmap=False)  # resumed state is written to
        missing = {"model", "optimizer", "scaler", "rng", "step"} - set(state if isinstance(state, dict) else ())
        if missing:
            raise CheckpointError(f"{path / STATE_FILE}: not a training state (no {', '.join(sorted(missing))})")
        return state

    def export(self, model: torch.nn.Module, tok, dests: dict[str, Path] | None = None) -> Path | None:
        """Write the model as model directories {format: dir} (default: train.export_formats in the
        work_dir); returns the first. Called on every rank (a parallel export gathers)."""
        if not self.is_main:
            return None
        return self.write_exports(model, tok, dests=dests)

    def write_exports(self, model: torch.nn.Module, tok, megatron_tp: int = 1,
                      dests: dict[str, Path] | None = None) -> Path | None:
        """{format: dir} (default work_dir/output for gpt3zh, work_dir/output_<format> for the
        others). With LoRA, the gpt3zh directory is the adapter directory (always written) and the
        other formats get base + adapter merged (they cannot hold an adapter)."""
        from ...checkpoint import lora, save_model

        _check_finite(model, "export")
        out = None
        dests = dict(dests or self.export_dests())
        if self.lora is not None:
            out = lora.save_adapter(model, dests.pop("gpt3zh", self.work_dir / _output_name("gpt3zh")),
                                    self.peft_config(), self.base_record, tokenizer=tok, overwrite=True)
            if dests:
                model = lora.merge_lora(model)  # the run is over: the adapters fold into the base in place
        for fmt, dest in dests.items():
            tp = megatron_tp if fmt == "megatron" else 1
            save_model(model, dest, format=fmt, tp=tp, tokenizer=tok, overwrite=True, generation=self.generation)
            out = out or dest
        return out

    def export_dests(self) -> dict[str, Path]:
        return {fmt: self.work_dir / _output_name(fmt) for fmt in self.cfg.train.export_formats}

    # -------------------------------------------------------------------------------------- setup
    def prepare(self) -> None:
        """Every check that can fail on user input, before any training work. Nothing is written
        before the data sources, the model, the tokenizer and the schedule's first value pass."""
        cfg = self.cfg
        self.train_source, self.eval_source = self.data_sources()
        self.gpt_cfg = self.model_config()
        L = cfg.preprocessor.sequence_length
        if L > self.gpt_cfg.max_seq_len:
            raise ConfigError(
                f"preprocessor.sequence_length={L} exceeds the model's context "
                f"(max_seq_len={self.gpt_cfg.max_seq_len}); use at most {self.gpt_cfg.max_seq_len}"
            )
        if self.lora is not None:
            self.check_lora_base()
        self.tok, tok_source = self.load_tokenizer()
        if self.tok.vocab_size > self.gpt_cfg.vocab_size:
            raise ConfigError(
                f"tokenizer {tok_source}: vocab_size {self.tok.vocab_size} exceeds the model's "
                f"vocab_size {self.gpt_cfg.vocab_size}"
            )
        self.generation = self.generation_defaults()
        lr_factors(cfg.train.lr_scheduler, 1, 1, self.extras.lr_lambda)  # a bad schedule fails before any write
        if self.is_main:
            self.prepare_work_dir()
        tok_id = tokenizer_fingerprint(self.tok, tok_source)
        progress = _progress_setting(cfg.train.progress_bar, self.is_main)
        self.train_data: TokenRows = self.load_tokens(self.train_source, tok_id, progress)
        if int(self.train_data.trained_tokens.sum()) == 0:
            raise ConfigError(f"{self.train_source.name}: no trainable tokens after preprocessing")
        src = self.eval_source
        self.eval_data: TokenRows | None = self.load_tokens(src, tok_id, progress) if src else None
        if self.eval_data is not None and int(self.eval_data.trained_tokens.sum()) == 0:
            raise ConfigError(f"{src.name}: no token to score (every row is empty after preprocessing)")
        self.eval_rows = None
        wants_text = {"rouge", "bleu"} & set(cfg.evaluation.metrics)
        if wants_text and self.eval_data is not None:
            self.eval_rows = src.rows if src.rows is not None else read_rows(src.path, cfg.dataset.remap_columns)
            if self.eval_data.mode != "prompt":
                row = first_row_without_target(self.eval_rows)
                raise ConfigError(
                    f"evaluation.metrics rouge/bleu need prompt->target eval data: {src.name} "
                    f"row {row} has no tgt_txt"
                )
        # Rows with no trained label (a prompt that fills sequence_length) add nothing to the loss
        # or its normaliser, so they are left out of the batches instead of costing a forward.
        self.train_rows = np.flatnonzero(self.train_data.trained_tokens > 0)
        global_batch = cfg.train.dataloader.batch_size_per_gpu * self.world
        self.batches_per_epoch = math.ceil(len(self.train_rows) / global_batch)
        accum = cfg.train.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)
        self.total_steps = cfg.train.max_steps or cfg.train.max_epochs * self.steps_per_epoch
        self.lr_factors = lr_factors(cfg.train.lr_scheduler, self.total_steps, self.steps_per_epoch,
                                     self.extras.lr_lambda)
        d = self.train_data
        if self.is_main and d.mode == "mixed":
            note(f"{self.train_source.name}: {d.with_target} of {len(d)} rows have tgt_txt and train their "
                 f"target only; the other {len(d) - d.with_target} train all their tokens (ModelScope's rule per row)")

    def data_sources(self) -> tuple[DataSource, DataSource | None]:
        """The train and eval splits: a file from the config or a dataset from Extras (one of
        the two per split). In-memory rows are checked here, before anything is written."""
        ds = self.cfg.dataset
        train = _source(ds.train, self.extras.train_dataset, "dataset.train", "train_dataset", ds.remap_columns)
        if train is None:
            raise ConfigError("dataset.train: no training data given (a data file, or train_dataset= in gpt3zh.train)")
        return train, _source(ds.eval, self.extras.eval_dataset, "dataset.eval", "eval_dataset", ds.remap_columns)

    def load_tokens(self, src: DataSource, tok_id: str, progress: bool | None) -> TokenRows:
        """Token rows of a split, through the token cache in work_dir/cache."""
        L, cache = self.cfg.preprocessor.sequence_length, self.work_dir / "cache"
        if src.path is not None:
            return load_token_rows(src.path, self.tok, L, self.cfg.dataset.remap_columns, cache, tok_id, progress)
        return load_rows_tokens(src.rows, src.mode, self.tok, L, cache, tok_id, progress)

    def check_lora_base(self) -> None:
        from ...checkpoint import lora
        from ...hub import resolve_model

        if lora.is_adapter_dir(resolve_model(self.cfg.model.path)):
            raise ConfigError(f"model {self.cfg.model.path} is a LoRA adapter: train.lora needs a plain base; write "
                              f"one with `gpt3zh convert {self.cfg.model.path} MERGED --to gpt3zh --merge-lora` and "
                              f"train on MERGED")

    def generation_defaults(self) -> GenerationDefaults:
        """What the checkpoints and the export say about generation: a fine-tuned directory keeps its
        own; a model trained from a preset learns to end its answers with <sep>, its stop token."""
        if self.cfg.model.preset is not None:
            return GenerationDefaults(eod_id=self.tok.sep_id)
        from ...checkpoint import describe

        return describe(self.cfg.model.path).generation

    # ---------------------------------------------------------------------------------- work_dir
    def prepare_work_dir(self) -> None:
        """Main rank, before any training work: the work_dir is writable, what a killed run left
        half-written is cleaned up, and another run's files are never mixed with this one's."""
        wd, t = self.work_dir, self.cfg.train
        if wd.exists() and not wd.is_dir():
            raise ConfigError(f"train.work_dir {wd}: exists and is not a directory")
        try:
            wd.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=wd).close()  # EACCES / EROFS show here, not at the first save
        except OSError as err:
            raise ConfigError(f"train.work_dir {wd}: cannot be written ({describe_os_error(err)})") from None
        removed = _clean_stale(wd)
        if removed:
            note(f"removed what an interrupted run left half-written: {', '.join(str(p) for p in removed)}")
        previous = _run_files(wd)
        if t.resume is False and previous:
            if not t.overwrite:
                raise ConfigError(
                    f"train.work_dir {wd} already holds a run ({', '.join(p.name for p in previous)}); continue it "
                    f"with train.resume=true, replace it with train.overwrite=true, or choose another train.work_dir"
                )
            for path in previous:
                _discard(path)
            note(f"train.overwrite=true: removed the previous run in {wd} ({', '.join(p.name for p in previous)})")
        elif t.resume not in (True, False):
            resumed = _step_of(Path(t.resume))
            newer = [c for c in _checkpoints(wd / CKPT_DIR) if resumed is not None and _step_of(c) > resumed]
            if newer:
                raise ConfigError(
                    f"train.resume={t.resume}: {wd / CKPT_DIR} holds later checkpoints ({newer[-1].name}), which "
                    f"would mix with this run; resume the latest with train.resume=true, or use another train.work_dir"
                )

    def micro_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of global optimizer step `step` (0-based)."""
        t, accum = self.cfg.train, self.cfg.train.gradient_accumulation_steps
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != getattr(self, "_epoch_cached", None):
            batches = epoch_batches(
                self.train_data.lengths[self.train_rows], t.dataloader.batch_size_per_gpu * self.world,
                t.seed, epoch, t.dataloader.shuffle, t.bucket_by_length,
            )
            self._epoch = [self.train_rows[b].tolist() for b in batches]
            self._epoch_cached = epoch
        return [collate(self.train_data, self.shard(b)) for b in self._epoch[k * accum : (k + 1) * accum]]

    def autocast(self):
        p = self.cfg.train.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    # --------------------------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        self.prepare()
        torch.manual_seed(t.seed)
        model = self.build_model(self.gpt_cfg)
        optimizer = self.build_optimizer(model)
        scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        step = self.maybe_resume(model, optimizer, scaler)
        log = RunLog(self.work_dir, step, enabled=self.is_main)
        bar = _progress(self.total_steps, step, _progress_setting(t.progress_bar, self.is_main))
        try:
            self.describe_run(log)
            last_loss, last_eval, best = None, {}, _read_best(self.work_dir, step)
            if step == 0 and cfg.evaluation.at_start and self.eval_data is not None:
                log.eval(0, self.evaluate(model))  # the untrained start, as a baseline
            model.train()
            while step < self.total_steps:
                t0 = time.perf_counter()
                lr = t.optimizer.lr * self.lr_factors[step]
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, n_tok, grad_norm = self.train_step(model, optimizer, scaler, self.micro_batches(step), step, lr)
                step += 1
                last_loss = loss
                dt = time.perf_counter() - t0
                log.step(step, loss=loss, lr=lr, tokens=n_tok, tokens_per_s=n_tok / dt, grad_norm=grad_norm)
                failpoint("train.step")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:,.0f}")
                end_of_epoch = step % self.steps_per_epoch == 0 or step == self.total_steps
                # the last step always evaluates: a short run (eval_interval > max_steps) still gets its eval
                due = self._due(step, t.eval_interval, end_of_epoch) or step == self.total_steps
                if due and self.eval_data is not None:
                    last_eval = self.evaluate(model)
                    log.eval(step, last_eval)
                    model.train()
                if self._due(step, t.save_interval, end_of_epoch) or step == self.total_steps:
                    best = self.checkpoint(model, optimizer, scaler, step, last_eval, best)
                if step % self.steps_per_epoch == 0 and self.extras.on_epoch_end is not None:
                    self.extras.on_epoch_end(self, model, step // self.steps_per_epoch)
                    model.train()
        finally:
            bar.close()
            log.close(plot=False)
        out = self.export(model, self.tok)  # called on every rank: a parallel export gathers
        log.plot(enabled=self.is_main)
        best_path = self.work_dir / CKPT_DIR / _step_name(best["step"]) if best else None
        return TrainResult(self.work_dir, out, step, last_loss, last_eval, best_path)

    def train_step(
        self, model, optimizer, scaler, batches: list[Batch], step: int = 0, lr: float = 0.0
    ) -> tuple[float, int, float | None]:
        """One optimizer step over micro-batches; loss normalised by the step's trained tokens, so
        k micro-batches give exactly the gradient of one batch holding all their rows.

        A non-finite loss (or, without fp16 loss scaling, gradient norm) stops the run before the
        update is applied: the weights and the last checkpoint stay as they were."""
        n_tok = self.all_reduce_sum(sum(b.n_tokens for b in batches))
        # Data-parallel wrappers average gradients over ranks; multiplying by world undoes that,
        # leaving sum-over-all-tokens / all-tokens.
        scale = self.world / max(n_tok, 1)
        total = 0.0
        for batch in batches:
            batch = batch.to(self.device)
            with self.autocast():
                loss_sum = self.loss_sum(model, batch)
            scaler.scale(loss_sum * scale).backward()
            total += float(loss_sum.detach())
        loss = self.all_reduce_sum(total) / n_tok if n_tok else 0.0  # ModelScope: empty mask -> 0
        if not math.isfinite(loss):
            self.diverged(f"the loss is {loss}", step, lr)
        grad_norm = None
        clip = self.cfg.train.optimizer.options.grad_clip.max_norm
        if clip is not None:
            scaler.unscale_(optimizer)
            grad_norm = self.clip_grad_norm(model, clip)
            if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16's scaler skips such steps itself
                self.diverged(f"the gradient norm is {grad_norm}", step, lr)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss, n_tok, grad_norm

    def diverged(self, what: str, step: int, lr: float):
        last = _latest(self.work_dir / CKPT_DIR)
        raise TrainingError(
            f"{what} at step {step + 1} (lr {lr:.3g}): training diverged and stopped before that step's update; "
            f"nothing was exported; the last checkpoint is {last or 'none (none was saved)'}; lower "
            f"train.optimizer.lr (or keep train.optimizer.options.grad_clip on) and resume or start again"
        )

    def evaluate(self, model) -> dict[str, Any]:
        ev = self.cfg.evaluation
        model.eval()
        out = evaluate_ppl(
            model, self.eval_data, ev.dataloader.batch_size_per_gpu, self.device,
            pad_to=self.cfg.preprocessor.sequence_length - 1 if ev.ppl_modelscope else None,
            max_rows=ev.max_examples,
            autocast=self.autocast,
        )
        if self.eval_rows is not None:
            out.update(evaluate_generation(
                model, self.tok, self.eval_rows, self.eval_data, ev.max_new_tokens,
                ev.dataloader.batch_size_per_gpu, max_rows=ev.max_examples,
            ))
        return out

    # -------------------------------------------------------------------------------- checkpoints
    def checkpoint(self, model, optimizer, scaler, step: int, last_eval: dict, best: dict | None):
        _check_finite(model, f"checkpoint at step {step}")
        ckpt_dir = self.work_dir / CKPT_DIR
        state = {
            "train": {
                "model": self.model_state(model),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
                "step": step,
                **({"lora_base": self.base_record} if self.lora is not None else {}),
            },
            "meta": {"step": step, "eval": last_eval, "config": self.cfg.to_dict()},
        }
        if self.is_main:
            self.save_checkpoint(state, ckpt_dir / _step_name(step))
            best = self.record_best(ckpt_dir, step, last_eval, best)
        return best

    def maybe_resume(self, model, optimizer, scaler) -> int:
        """The step to start from; with resume=true the newest checkpoint that can be read (an
        unreadable one, e.g. cut short by a full disk, is skipped with a note)."""
        candidates, skipped = self.resume_candidates(), []
        for path in candidates:
            try:
                state = self.load_checkpoint(path)
            except CheckpointError as err:
                if self.cfg.train.resume is not True:
                    raise
                skipped.append(f"{path.name}: {str(err).splitlines()[0].removeprefix(f'{path / STATE_FILE}: ')}")
                note(f"train.resume: {path / STATE_FILE} cannot be read; falling back to the checkpoint before it",
                     logging.WARNING)
                continue
            self.check_resumable(path, state, model)
            model.load_state_dict(state["model"], strict=self.lora is None)  # LoRA: adapters only (checked)
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
            if self.is_main:
                note(f"resuming from {path} (step {int(state['step'])})")
            return int(state["step"])
        if skipped:
            raise TrainingError(f"train.resume=true: no checkpoint under {self.work_dir / CKPT_DIR} can be read "
                                f"({'; '.join(skipped)})")
        if self.cfg.train.resume is True and self.is_main:
            note(f"train.resume=true: no checkpoint in {self.work_dir / CKPT_DIR} yet; starting at step 0")
        return 0

    def check_resumable(self, path: Path, state: dict, model) -> None:
        """The checkpoint fits this model and this run's length (one line naming what differs)."""
        from ...checkpoint.tables import compare_keys

        self.check_same_base(path, state.get("lora_base"))
        found = {k: tuple(v.shape) for k, v in state["model"].items()}
        problems = compare_keys(found, {k: v.shape for k, v in self.model_state(model).items()})
        if problems:
            first = problems[0] if len(problems[0]) <= 160 else problems[0][:157] + "..."
            raise TrainingError(
                f"train.resume: {path / STATE_FILE} was saved for another model architecture ({first}); resume "
                f"with the model config it was trained with, or start a new train.work_dir"
            )
        if int(state["step"]) > self.total_steps:
            raise TrainingError(
                f"train.resume: {path} is at step {int(state['step'])}, past this run's last step {self.total_steps} "
                f"(train.max_steps / max_epochs); raise it, or start a new train.work_dir"
            )

    def check_same_base(self, path: Path, recorded: dict | None) -> None:
        """A LoRA checkpoint resumes on the base it was trained on, and a full one without LoRA."""
        if (recorded is None) != (self.lora is None):
            kind = "LoRA adapters" if recorded is not None else "a full fine-tune"
            raise TrainingError(f"train.resume: {path} holds {kind}; resume it with the train.lora it was trained "
                                f"with, or start a new train.work_dir")
        if recorded is not None:
            from ...checkpoint import lora

            if not lora.same_fingerprint(recorded.get("fingerprint"), self.base_record["fingerprint"]):
                raise TrainingError(f"train.resume: {path} holds LoRA adapters trained on other base weights than "
                                    f"model.path {self.cfg.model.path} now has; resume with that base, or start a "
                                    f"new train.work_dir")

    def resume_candidates(self) -> list[Path]:
        """Checkpoints to try, newest first: every one in work_dir for resume=true, else the one named."""
        resume = self.cfg.train.resume
        if resume is False:
            return []
        if resume is True:
            return _checkpoints(self.work_dir / CKPT_DIR)[::-1]
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"train.resume: {path} is not a checkpoint (no {STATE_FILE})")
        return [path]

    def record_best(self, ckpt_dir: Path, step: int, last_eval: dict, best: dict | None) -> dict | None:
        """After a checkpoint is in place (main rank): update best.json, prune, return the best."""
        ppl = last_eval.get("ppl")
        if ppl is not None and math.isfinite(ppl) and (best is None or ppl < best["ppl"]):
            best = {"step": step, "ppl": ppl}
            _atomic_write(ckpt_dir / "best.json", json.dumps(best))
        _prune(ckpt_dir, self.cfg.train.keep_last, best, step)
        return best

    def resume_path(self) -> Path | None:
        """The checkpoint to resume (resume=true: the newest), or None to start at step 0."""
        candidates = self.resume_candidates()
        return candidates[0] if candidates else None

    # ------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _due(step: int, interval: int | None, end_of_epoch: bool) -> bool:
        return end_of_epoch if interval is None else step % interval == 0

    def describe_run(self, log: RunLog) -> None:
        t, d = self.cfg.train, self.train_data
        est = estimate_memory(
            self.gpt_cfg, t.dataloader.batch_size_per_gpu, self.cfg.preprocessor.sequence_length,
            t.precision, t.param_dtype, t.activation_checkpointing,
        )
        info = {
            "rows": len(d), "mode": d.mode, "trained_tokens": int(d.trained_tokens.sum()),
            "rows_with_target": d.with_target,
            "rows_without_trained_tokens": len(d) - len(self.train_rows),
            "truncated_rows": d.truncated, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "device": str(self.device), "params": est["params"],
        }
        log.info(info)
        if self.device.type == "cuda" and self.is_main:
            note(self.lora_estimate() if self.lora is not None else format_estimate(est))

    def lora_estimate(self) -> str:
        """gpt3zh plan --lora for this run (the full fine-tuning estimate does not apply)."""
        from ...planning import format_lora_plan, plan_lora

        t, c = self.cfg.train, self.lora
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[c.base_dtype]
        plan = plan_lora(self.gpt_cfg, r=c.r, targets=tuple(c.target_modules), base_dtype=dtype,
                         seq_len=self.cfg.preprocessor.sequence_length, micro_batch=t.dataloader.batch_size_per_gpu,
                         act_bytes=2 if t.precision != "fp32" else 4,
                         activation_checkpointing=t.activation_checkpointing, dropout=c.dropout,
                         gpu_mem_gib=_gpu_gib(self.device))
        return "estimated GPU memory: " + format_lora_plan("this run", plan)


def _gpu_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return 80.0  # what plan assumes without a GPU to ask
    return torch.cuda.get_device_properties(device).total_memory / 1024**3


def token_loss_sum(model, batch: Batch) -> torch.Tensor:
    """Summed cross entropy over the trained positions only.

    The head runs on trained positions only: in prompt->target data most positions are prompt,
    and the (N, V) logits are the largest activation of a step.
    """
    h = model.hidden(batch.tokens)  # (B, T, H)
    logits = model.head(h[batch.mask])  # (N, V), N trained tokens
    return F.cross_entropy(logits.float(), batch.labels[batch.mask], reduction="sum")


# --------------------------------------------------------------------------------------- run log
class RunLog:
    """train_log.jsonl (one line per step / eval), TensorBoard events, the loss-curve PNG."""

    def __init__(self, work_dir: Path, start_step: int, enabled: bool = True) -> None:
        self.path, self.enabled = work_dir / LOG_FILE, enabled
        self.tb = None
        if not enabled:
            return
        _truncate_log(self.path, start_step)  # a resumed run rewrites what came after its checkpoint
        self.file = self.path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(work_dir / "tb"), purge_step=start_step or None)
        except ImportError:
            note("tensorboard is not installed (pip install 'gpt3zh[train]'); no event files", logging.WARNING)

    def _write(self, record: dict) -> None:
        with writing(self.path):
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.file.flush()

    def info(self, info: dict) -> None:
        if self.enabled:
            self._write({"info": info})

    def step(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **values})
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(f"train/{k}", v, step)

    def eval(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._write({"step": step, "eval": scalars})
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"eval/{k}", v, step)

    def close(self, plot: bool = True) -> None:
        if not self.enabled or self.file.closed:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if plot:
            self.plot()

    def plot(self, enabled: bool = True) -> None:
        if self.enabled and enabled:
            plot_loss_curve(self.path, self.path.parent / "loss_curve.png")


def read_log(path: Path) -> list[dict]:
    """The log's records; a last line cut short (the process was killed mid-write) is dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise TrainingError(f"{path} line {i + 1}: not a JSON record; remove the line or the file") from None
    return records


def _truncate_log(path: Path, start_step: int) -> None:
    keep = [r for r in read_log(path) if "step" in r and r["step"] <= start_step]
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))


def plot_loss_curve(log_path: Path, dest: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        note("matplotlib is not installed (pip install 'gpt3zh[train]'); no loss curve", logging.WARNING)
        return None
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval"]["loss"]) for r in records if "eval" in r and "loss" in r["eval"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (per trained token)", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = dest.with_name(f".tmp-{dest.name}")
    try:
        with writing(dest, name_this=True):
            fig.savefig(tmp, format="png", dpi=100)
            os.replace(tmp, dest)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------------------- small utilities
def _source(file: str | None, data: Any, key: str, arg: str, remap: dict[str, str]) -> DataSource | None:
    """One split from a config file path (`key`) or a gpt3zh.train argument (`arg`)."""
    if file is not None and data is not None:
        raise ConfigError(f"{key}={file} and {arg}= are both given; give one of them")
    if data is None and file is None:
        return None
    if data is None or isinstance(data, (str, os.PathLike)):
        name, path = (f"{key}", Path(file)) if data is None else (arg, Path(data))
        if not path.exists():
            raise FileNotFoundError(f"{name}: data file not found: {path}")
        return DataSource(f"{name} {path}", path=path)
    rows = rows_from_dataset(data, arg, remap)
    return DataSource(arg, rows=rows, mode=detect_mode(rows, arg))


_STEP_DIR = re.compile(r"step-(\d+)")


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(path: Path) -> int | None:
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """Step checkpoints (a state.pt in place), oldest first by step number, not by name."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def _latest(ckpt_dir: Path) -> Path | None:
    found = _checkpoints(ckpt_dir)
    return found[-1] if found else None


def _read_best(work_dir: Path, start_step: int) -> dict | None:
    """best.json, if it names a checkpoint of this run's past (a later one was abandoned on resume)."""
    p = work_dir / CKPT_DIR / "best.json"
    try:
        best = json.loads(p.read_text()) if p.is_file() else None
        step = int(best["step"]) if best else None
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: the next eval writes a new one
    if step is None or step > start_step or not (work_dir / CKPT_DIR / _step_name(step) / STATE_FILE).is_file():
        return None
    return best


def _prune(ckpt_dir: Path, keep_last: int, best: dict | None, step: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `step` and the best one.

    A checkpoint is first renamed out of the step-* namespace, then deleted: a kill in between
    leaves a .trash-* dir (removed at the next start), never a half-deleted step-* one.
    """
    keep_best = _step_name(best["step"]) if best else None
    past = [p for p in _checkpoints(ckpt_dir) if _step_of(p) <= step]
    for p in past[:-keep_last]:
        if p.name != keep_best:
            _discard(p)


def _discard(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    path.rename(trash)
    failpoint("checkpoint.prune")
    if trash.is_dir():
        shutil.rmtree(trash)
    else:
        trash.unlink()


def _output_name(fmt: str) -> str:
    return "output" if fmt == "gpt3zh" else f"output_{fmt}"


def _run_files(work_dir: Path, all_names: bool = False) -> list[Path]:
    """What a run leaves in work_dir (the token cache aside, which is keyed by content); with
    all_names, every such path whether it exists or not."""
    names = [CKPT_DIR, LOG_FILE, "tb", "loss_curve.png", *(_output_name(f) for f in EXPORT_FORMATS)]
    if all_names:
        return [work_dir / n for n in names]
    found = [work_dir / n for n in names if (work_dir / n).exists()]
    ckpt = work_dir / CKPT_DIR
    if ckpt in found and not any(_step_of(p) is not None for p in ckpt.iterdir()):
        found.remove(ckpt)  # no checkpoint in it (a best.json of nothing is ignored by _read_best)
    return found


def _clean_stale(work_dir: Path) -> list[Path]:
    """Remove what a killed run left half-written; return what was removed (main rank only: the
    work_dir belongs to this run). Only names this trainer writes are touched."""
    ckpt = work_dir / CKPT_DIR
    stale = [p for p in (ckpt.iterdir() if ckpt.is_dir() else ())
             if p.name.startswith((".tmp-", ".trash-")) or (_step_of(p) is not None and not (p / STATE_FILE).is_file())]
    for name in (p.name for p in _run_files(work_dir, all_names=True)):
        stale += [work_dir / f"{prefix}{name}" for prefix in (".tmp-", ".trash-")
                  if (work_dir / f"{prefix}{name}").exists()]
    stale += list((work_dir / "cache").glob(".tmp-*.npz"))
    for p in sorted(stale):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    removed = sorted(stale)
    for fmt in EXPORT_FORMATS:
        removed += recover_output_dir(work_dir / _output_name(fmt))
    return removed


def _check_finite(model: torch.nn.Module, what: str) -> None:
    """A guard before weights are written: nothing non-finite is ever saved as a good state."""
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not bool(p.isfinite().all())]
    if bad:
        raise TrainingError(
            f"{what}: the weights hold NaN or infinite values ({bad[0]}, {len(bad)} tensors); nothing was written; "
            f"lower train.optimizer.lr (or keep train.optimizer.options.grad_clip on)"
        )


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with writing(path, name_this=True):
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _progress_setting(setting, is_main: bool) -> bool | None:
    """train.progress_bar as tqdm's disable flag wants it: None = only when stderr is a terminal."""
    return False if not is_main else None if setting == "auto" else bool(setting)


def _progress(total: int, initial: int, enabled: bool | None):
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled  # tqdm: None disables on a non-terminal
    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True)
