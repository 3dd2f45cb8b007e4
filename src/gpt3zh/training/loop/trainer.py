"""The single-process training loop.

`Trainer.run()` reads top to bottom: check everything (config, model context, tokenizer, data)
before step 1, then for each optimizer step: collate the step's micro-batches, forward/backward
with autocast, clip, step, log; evaluate and checkpoint on their intervals; export at the end.

The parts a parallel trainer replaces are methods with one job each: `build_model`,
`build_optimizer`, `shard` (rank and world are attributes passed in, never read from the
environment), `all_reduce_sum`, `save_checkpoint` / `load_checkpoint`, `export`. The data
position is a pure function of the global step (batches come from `epoch_batches(seed, epoch)`),
so resume needs only the step, the model, the optimizer, the loss scaler and the RNG state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...config import ConfigError, GenerationDefaults, GPTConfig
from ...model import GPT
from ..config import TrainConfig
from ..data import (
    Batch,
    TokenRows,
    collate,
    epoch_batches,
    load_token_rows,
    read_rows,
    shard,
    tokenizer_fingerprint,
)
from ..optim import apply_activation_checkpointing, build_optimizer, estimate_memory, format_estimate
from ..schedules import lr_factor

CKPT_DIR = "checkpoints"
STATE_FILE = "state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainResult:
    work_dir: Path
    output_dir: Path | None
    step: int
    train_loss: float | None
    eval: dict[str, Any] = field(default_factory=dict)
    best_checkpoint: Path | None = None


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1) -> None:
        self.cfg = cfg
        self.rank, self.world = rank, world
        self.work_dir = Path(cfg.train.work_dir)
        self.device = self.resolve_device()
        self.is_main = rank == 0

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
            # a fine-tuned model ends its answers with <sep>: make that the saved stop token
            self.generation = GenerationDefaults(eod_id=self.tok.sep_id)
        else:
            from ...checkpoint import load_pretrained

            loaded = load_pretrained(self.cfg.model.path)
            model, self.generation = loaded.model, loaded.generation
        model = model.to(self.device)
        if self.cfg.train.param_dtype == "bf16":
            model = model.to(torch.bfloat16)
        else:
            model = model.float()  # checkpoints may store bf16; training keeps fp32 weights
        if self.cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        return model

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
        """Write state into dest atomically: a temp dir, then one rename."""
        tmp = dest.parent / f".tmp-{dest.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state["train"], tmp / STATE_FILE)
        (tmp / "meta.json").write_text(json.dumps(state["meta"], indent=2, ensure_ascii=False))
        if dest.exists():  # re-saving the same step (e.g. after resume): replace it whole
            shutil.rmtree(dest)
        os.replace(tmp, dest)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)

    def export(self, model: torch.nn.Module, tok) -> Path | None:
        from ...checkpoint import save_model

        if not self.is_main:
            return None
        out = None
        for fmt in self.cfg.train.export_formats:
            dest = self.work_dir / ("output" if fmt == "gpt3zh" else f"output_{fmt}")
            save_model(model, dest, format=fmt, tokenizer=tok, overwrite=True, generation=self.generation)
            out = out or dest
        return out

    # -------------------------------------------------------------------------------------- setup
    def prepare(self) -> None:
        """Every check that can fail on user input, before any training work."""
        cfg = self.cfg
        self.gpt_cfg = self.model_config()
        L = cfg.preprocessor.sequence_length
        if L > self.gpt_cfg.max_seq_len:
            raise ConfigError(
                f"preprocessor.sequence_length={L} exceeds the model's context "
                f"(max_seq_len={self.gpt_cfg.max_seq_len}); use at most {self.gpt_cfg.max_seq_len}"
            )
        self.tok, tok_source = self.load_tokenizer()
        if self.tok.vocab_size > self.gpt_cfg.vocab_size:
            raise ConfigError(
                f"tokenizer {tok_source}: vocab_size {self.tok.vocab_size} exceeds the model's "
                f"vocab_size {self.gpt_cfg.vocab_size}"
            )
        tok_id = tokenizer_fingerprint(self.tok, tok_source)
        load = lambda p: load_token_rows(
            p, self.tok, L, cfg.dataset.remap_columns, self.work_dir / "cache", tok_id
        )
        self.train_data: TokenRows = load(cfg.dataset.train)
        if int(self.train_data.trained_tokens.sum()) == 0:
            raise ConfigError(f"dataset.train {cfg.dataset.train}: no trainable tokens after preprocessing")
        self.eval_data: TokenRows | None = load(cfg.dataset.eval) if cfg.dataset.eval else None
        self.eval_rows = None
        wants_text = {"rouge", "bleu"} & set(cfg.evaluation.metrics)
        if wants_text and self.eval_data is not None:
            if self.eval_data.mode != "prompt":
                raise ConfigError("evaluation.metrics rouge/bleu need prompt->target eval data (a tgt_txt column)")
            self.eval_rows = read_rows(cfg.dataset.eval, cfg.dataset.remap_columns)
        # Rows with no trained label (a prompt that fills sequence_length) add nothing to the loss
        # or its normaliser, so they are left out of the batches instead of costing a forward.
        self.train_rows = np.flatnonzero(self.train_data.trained_tokens > 0)
        global_batch = cfg.train.dataloader.batch_size_per_gpu * self.world
        self.batches_per_epoch = math.ceil(len(self.train_rows) / global_batch)
        accum = cfg.train.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)
        self.total_steps = cfg.train.max_steps or cfg.train.max_epochs * self.steps_per_epoch

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
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = RunLog(self.work_dir, step, enabled=self.is_main)
        self.describe_run(log)
        bar = _progress(self.total_steps, step, enabled=t.progress_bar and self.is_main)
        last_loss, last_eval, best = None, {}, _read_best(self.work_dir)
        if step == 0 and cfg.evaluation.at_start and self.eval_data is not None:
            log.eval(0, self.evaluate(model))  # the untrained start, as a baseline
        model.train()
        while step < self.total_steps:
            t0 = time.perf_counter()
            lr = t.optimizer.lr * lr_factor(t.lr_scheduler, step, self.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, n_tok, grad_norm = self.train_step(model, optimizer, scaler, self.micro_batches(step))
            step += 1
            last_loss = loss
            dt = time.perf_counter() - t0
            log.step(step, loss=loss, lr=lr, tokens=n_tok, tokens_per_s=n_tok / dt, grad_norm=grad_norm)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:,.0f}")
            end_of_epoch = step % self.steps_per_epoch == 0 or step == self.total_steps
            if self._due(step, t.eval_interval, end_of_epoch) and self.eval_data is not None:
                last_eval = self.evaluate(model)
                log.eval(step, last_eval)
                model.train()
            if self._due(step, t.save_interval, end_of_epoch) or step == self.total_steps:
                best = self.checkpoint(model, optimizer, scaler, step, last_eval, best)
        bar.close()
        out = self.export(model, self.tok)  # called on every rank: a parallel export gathers
        log.close(plot=self.is_main)
        best_path = self.work_dir / CKPT_DIR / _step_name(best["step"]) if best else None
        return TrainResult(self.work_dir, out, step, last_loss, last_eval, best_path)

    def train_step(self, model, optimizer, scaler, batches: list[Batch]) -> tuple[float, int, float | None]:
        """One optimizer step over micro-batches; loss normalised by the step's trained tokens, so
        k micro-batches give exactly the gradient of one batch holding all their rows."""
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
        grad_norm = None
        clip = self.cfg.train.optimizer.options.grad_clip.max_norm
        if clip is not None:
            scaler.unscale_(optimizer)
            grad_norm = self.clip_grad_norm(model, clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss = self.all_reduce_sum(total) / n_tok if n_tok else 0.0  # ModelScope: empty mask -> 0
        return loss, n_tok, grad_norm

    def evaluate(self, model) -> dict[str, Any]:
        from ...evaluation import evaluate_generation, evaluate_ppl

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
        ckpt_dir = self.work_dir / CKPT_DIR
        state = {
            "train": {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
                "step": step,
            },
            "meta": {"step": step, "eval": last_eval, "config": self.cfg.to_dict()},
        }
        if self.is_main:
            self.save_checkpoint(state, ckpt_dir / _step_name(step))
            best = self.record_best(ckpt_dir, step, last_eval, best)
        return best

    def maybe_resume(self, model, optimizer, scaler) -> int:
        path = self.resume_path()
        if path is None:
            return 0
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"train.resume: {path} is not a checkpoint (no {STATE_FILE})")
        state = self.load_checkpoint(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        return int(state["step"])

    def record_best(self, ckpt_dir: Path, step: int, last_eval: dict, best: dict | None) -> dict | None:
        """After a checkpoint is in place (main rank): update best.json, prune, return the best."""
        ppl = last_eval.get("ppl")
        if ppl is not None and math.isfinite(ppl) and (best is None or ppl < best["ppl"]):
            best = {"step": step, "ppl": ppl}
            _atomic_write(ckpt_dir / "best.json", json.dumps(best))
        _prune(ckpt_dir, self.cfg.train.keep_last, best)
        return best

    def resume_path(self) -> Path | None:
        """The checkpoint `train.resume` names (true: the latest), or None to start fresh."""
        resume = self.cfg.train.resume
        if resume is False:
            return None
        path = _latest(self.work_dir / CKPT_DIR) if resume is True else Path(resume)
        if path is None:
            raise FileNotFoundError(f"train.resume: no checkpoint under {self.work_dir / CKPT_DIR}")
        return path

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
            "rows_without_trained_tokens": len(d) - len(self.train_rows),
            "truncated_rows": d.truncated, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "device": str(self.device), "params": est["params"],
        }
        log.info(info)
        if self.device.type == "cuda" and self.is_main:
            print(format_estimate(est))


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
            print("gpt3zh train: tensorboard is not installed (pip install 'gpt3zh[train]'); no event files")

    def _write(self, record: dict) -> None:
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
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if plot:
            plot_loss_curve(self.path, self.path.parent / "loss_curve.png")


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _truncate_log(path: Path, start_step: int) -> None:
    keep = [r for r in read_log(path) if "step" in r and r["step"] <= start_step]
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))


def plot_loss_curve(log_path: Path, dest: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        print("gpt3zh train: matplotlib is not installed (pip install 'gpt3zh[train]'); no loss curve")
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
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, dest)
    return dest


# ------------------------------------------------------------------------------- small utilities
def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("step-*") if (p / STATE_FILE).is_file())


def _latest(ckpt_dir: Path) -> Path | None:
    found = _checkpoints(ckpt_dir)
    return found[-1] if found else None


def _read_best(work_dir: Path) -> dict | None:
    p = work_dir / CKPT_DIR / "best.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _prune(ckpt_dir: Path, keep_last: int, best: dict | None) -> None:
    """Keep the newest `keep_last` step checkpoints and the best one."""
    keep_best = _step_name(best["step"]) if best else None
    for p in _checkpoints(ckpt_dir)[:-keep_last]:
        if p.name != keep_best:
            shutil.rmtree(p)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
