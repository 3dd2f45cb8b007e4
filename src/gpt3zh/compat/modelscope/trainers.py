"""`build_trainer(name=Trainers.gpt3_trainer, default_args=...)`: the model cards' fine-tuning
scripts on gpt3zh's trainer.

`build_trainer` reads the model directory's configuration.json into an attribute-access config
(ModelScope's default hooks merged in), hands it to `cfg_modify_fn`, and translates the result
(compat.modelscope.translate) into one gpt3zh run. Everything is checked there, the datasets'
columns included, so a setting gpt3zh cannot honour or a dataset without src_txt fails at
build_trainer, before anything is written. `train()` runs gpt3zh.train: one process, or under
torchrun the dp x tp trainer from the `megatron` block; `evaluate()` scores the eval dataset
with ModelScope's metric names.

The work_dir gets what ModelScope writes there, beside gpt3zh's own run (checkpoints/ for resume,
train_log.jsonl, tb/, loss_curve.png):
- per epoch (CheckpointHook): `epoch_{n}_mp_rank_{XX}_model_states.pt`, one per tensor-parallel
  rank, for a Megatron model (MegatronHook's MpuProcessor names), `epoch_{n}.pth` for a
  single-process one; weights only (ModelScope's `*_trainer_state.pth` optimizer files are not
  written: gpt3zh's resumable state is checkpoints/step-N);
- `output/`: the trained model directory in the model's own ModelScope layout, with its
  configuration.json rewritten as ModelScope's save_pretrained does; the pipeline loads it.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from ...config import ConfigError
from ...hub import resolve_model
from .config import CONFIGURATION, ConfigDict
from .constants import Trainers
from .translate import DEFAULT_HOOKS, ModelInfo, Plan, plan

HONOURED = ("model", "cfg_file", "train_dataset", "eval_dataset", "max_epochs", "work_dir", "cfg_modify_fn",
            "seed", "device", "use_fp16", "launcher", "model_revision")
# ModelScope trainer arguments gpt3zh has no counterpart for: refused, never dropped
REFUSED = {
    "data_collator": "gpt3zh collates its own token rows",
    "preprocessor": "gpt3zh tokenizes with the model directory's tokenizer "
                    "(cfg.preprocessor.sequence_length is honoured)",
    "optimizers": "set cfg.train.optimizer / cfg.train.lr_scheduler in cfg_modify_fn instead",
    "arg_parse_fn": "set the values in cfg_modify_fn instead",
    "train_iters_per_epoch": "gpt3zh's epoch is one pass over train_dataset",
    "val_iters_per_epoch": "gpt3zh evaluates the whole eval_dataset",
    "remove_unused_data": "gpt3zh reads src_txt / tgt_txt and ignores other columns",
    "compile": "torch.compile is not applied to training",
    "efficient_tuners": "gpt3zh fine-tunes every weight",
}


def build_trainer(name: str = Trainers.gpt3_trainer, default_args: dict[str, Any] | None = None) -> GPT3Trainer:
    """ModelScope's build_trainer for the GPT-3 trainers (Trainers.gpt3_trainer, nlp_base_trainer)."""
    names = (Trainers.gpt3_trainer, Trainers.nlp_base_trainer)
    if name not in names:
        raise ValueError(f"build_trainer(name={name!r}): gpt3zh builds the GPT-3 trainers "
                         f"{', '.join(map(repr, names))}")
    return GPT3Trainer(name=name, **(default_args or {}))


class GPT3Trainer:
    """ModelScope's GPT3Trainer / NlpEpochBasedTrainer over gpt3zh.train (see the module docstring)."""

    def __init__(self, model: Any = None, name: str = Trainers.gpt3_trainer, **kwargs: Any) -> None:
        _check_arguments(kwargs)
        self.name = name
        self.model_dir = _model_dir(model, kwargs.get("model_revision"))
        self.cfg = _configuration(self.model_dir, kwargs.get("cfg_file"))
        self.info = _model_info(self.model_dir, self.cfg.to_dict())
        self.cfg.merge_from_dict({"train.hooks": DEFAULT_HOOKS}, force=False)
        modify = kwargs.get("cfg_modify_fn")
        if modify is not None:
            self.cfg = modify(self.cfg)
            if not isinstance(self.cfg, dict):
                raise ConfigError(f"cfg_modify_fn returned {self.cfg!r}; it must return the config it was given")
            self.cfg = ConfigDict(self.cfg)
        for key in ("work_dir", "max_epochs"):  # the trainer's arguments win over the file, and are recorded in it
            if kwargs.get(key) is not None:
                self.cfg.merge_from_dict({f"train.{key}": kwargs[key]})
        device = {"gpu": "auto", "cpu": "cpu"}.get(kwargs.get("device", "gpu"), kwargs.get("device"))
        own = {k: kwargs[k] for k in ("seed", "use_fp16") if kwargs.get(k) is not None}
        self.plan: Plan = plan(self.cfg, self.info, {**own, "device": device})
        self.work_dir = Path(self.plan.config["train"]["work_dir"])
        self.train_rows = _rows(kwargs.get("train_dataset"), "train_dataset")
        self.eval_rows = _rows(kwargs.get("eval_dataset"), "eval_dataset")
        if self.train_rows is None:
            raise ConfigError("build_trainer: default_args has no train_dataset (gpt3zh reads no cfg.dataset)")
        self._check_metrics()
        self._check_config()
        self.result = None

    # ---------------------------------------------------------------------------------- train
    def train(self, checkpoint_path: str | None = None, *args: Any, **kwargs: Any) -> None:
        """Fine-tune; the work_dir gets ModelScope's files and gpt3zh's run (module docstring)."""
        from ...parallel import read_env
        from ...training import train

        if checkpoint_path is not None or args or kwargs:
            raise ConfigError("train(checkpoint_path=...): resume a gpt3zh run with gpt3zh.train(..., train={'resume': "
                              "True}) on the same work_dir; ModelScope's checkpoint files are not resumed")
        env = read_env()
        self._check_work_dir(clean=env.rank == 0)  # every rank raises alike: none waits on a collective
        self.result = train(
            self.plan.config,
            train_dataset=self.train_rows,
            eval_dataset=self.eval_rows if self.plan.evaluate else None,
            lr_lambda=self.plan.lr_lambda,
            on_epoch_end=self._epoch_end if self.plan.checkpoint_every else None,
        )
        if env.rank == 0:
            self._finish_output(Path(self.result.output_dir))

    def evaluate(self, checkpoint_path: str | os.PathLike | None = None) -> dict[str, float]:
        """ModelScope's metric values on eval_dataset: {'ppl': ...} (ModelScope's unmasked ppl) and,
        for 'text-gen-metric', {'rouge-l': ..., 'bleu-4': ...} (gpt3zh's character-level ROUGE-L F
        and BLEU-4 of greedy answers). checkpoint_path: a model directory; default: the trained
        work_dir/output after train(), else the model."""
        import torch

        from ...checkpoint import load_model
        from ...parallel import read_env
        from ...tokenizer import load_tokenizer
        from ...training.data import detect_mode, tokenize_rows
        from ...training.evaluate import evaluate_generation, evaluate_ppl

        if self.eval_rows is None:
            raise ConfigError("evaluate(): build_trainer was given no eval_dataset")
        path = Path(checkpoint_path) if checkpoint_path else self.work_dir / "output" if self.result else self.model_dir
        if not path.is_dir():
            raise FileNotFoundError(f"evaluate(checkpoint_path={str(path)!r}): expected a model directory "
                                    f"(e.g. {self.work_dir / 'output'})")
        want = self.plan.config["train"]["device"]
        cuda = torch.cuda.is_available() and want != "cpu"
        device = torch.device("cuda", read_env().local_rank) if cuda else torch.device("cpu")
        model, tok = load_model(path, device=device).eval(), load_tokenizer(path)
        ev, L = self.plan.config["evaluation"], self.plan.config["preprocessor"]["sequence_length"]
        data = tokenize_rows(self.eval_rows, tok, L, detect_mode(self.eval_rows, "eval_dataset"))
        batch = ev["dataloader"]["batch_size_per_gpu"]
        out: dict[str, float] = {}
        if "ppl" in self.plan.metrics:
            out["ppl"] = evaluate_ppl(model, data, batch, device, pad_to=L - 1)["ppl_modelscope"]
        if "text-gen-metric" in self.plan.metrics:
            gen = evaluate_generation(model, tok, self.eval_rows, data, ev["max_new_tokens"], batch)
            out.update({"rouge-l": gen["rouge_l"], "bleu-4": gen["bleu4"]})
        return out

    # ---------------------------------------------------------------------------------- checks
    def _check_metrics(self) -> None:
        if "text-gen-metric" in self.plan.metrics and self.eval_rows is not None:
            from ...training.data import detect_mode, first_row_without_target

            if detect_mode(self.eval_rows, "eval_dataset") != "prompt":
                row = first_row_without_target(self.eval_rows)
                raise ConfigError(
                    f"cfg.evaluation.metrics 'text-gen-metric' (ModelScope's default for text-generation) scores "
                    f"generated answers: eval_dataset row {row} has no tgt_txt; set cfg.evaluation.metrics = 'ppl'"
                )

    def _check_config(self) -> None:
        from ...training.config import load_config

        load_config(self.plan.config)  # gpt3zh's own checks, before anything is written

    def _check_work_dir(self, clean: bool) -> None:
        """ModelScope files of another run are never mixed with this one's (gpt3zh refuses its own)."""
        wd = self.work_dir
        if not wd.is_dir():
            return
        for stale in wd.glob(".tmp-epoch_*") if clean else ():  # a killed run's half-written epoch files
            shutil.rmtree(stale, ignore_errors=True)
        found = sorted(p.name for p in wd.glob("epoch_*") if p.name.endswith((".pth", "_model_states.pt")))
        if found:
            raise ConfigError(f"work_dir {wd} already holds ModelScope checkpoints of another run ({found[0]}, ...); "
                              f"choose another work_dir or remove them")

    # ---------------------------------------------------------------------------------- files
    def _epoch_end(self, trainer, model, epoch: int) -> None:
        """ModelScope's per-epoch weight files (every rank takes part: a parallel export gathers)."""
        from ...checkpoint.files import load_torch, save_torch
        if epoch % self.plan.checkpoint_every:
            return
        tmp = self.work_dir / f".tmp-epoch_{epoch}"
        trainer.export(model, trainer.tok, {self.plan.export_format: tmp})
        if not trainer.is_main:
            return
        if self.plan.export_format == "megatron":
            for shard in sorted((tmp / "model").glob("mp_rank_*_model_states.pt")):
                # a bare state dict, as MegatronHook's MpuProcessor writes (the hub's files wrap it in 'module')
                bare = tmp / f"bare-{shard.name}"
                save_torch(load_torch(shard, "Megatron shard", mmap=False)["module"], bare)
                os.replace(bare, self.work_dir / f"epoch_{epoch}_{shard.name}")
        else:
            os.replace(tmp / "pytorch_model.bin", self.work_dir / f"epoch_{epoch}.pth")
        shutil.rmtree(tmp)

    def _finish_output(self, exported: Path) -> None:
        """work_dir/output_<format> -> work_dir/output, configuration.json as ModelScope saves it."""
        from ...checkpoint.configs import megatron_configuration, single_configuration
        from ...checkpoint.formats import MegatronFormat

        out = self.work_dir / "output"
        os.replace(exported, out)
        base = self.cfg.to_dict()
        base.get("model", {}).pop("rank", None)
        if self.plan.export_format == "megatron":
            conf = megatron_configuration(base, len(MegatronFormat.shard_paths(out)))
        else:
            conf = single_configuration(base)
        tmp = out / f".tmp-{CONFIGURATION}"
        tmp.write_text(json.dumps(conf, indent=4, ensure_ascii=False, default=_python_name) + "\n", encoding="utf-8")
        os.replace(tmp, out / CONFIGURATION)


# ------------------------------------------------------------------------------------ helpers
def _check_arguments(kwargs: dict[str, Any]) -> None:
    for key in kwargs:
        if key in REFUSED:
            raise ConfigError(f"build_trainer default_args[{key!r}]: not supported by gpt3zh ({REFUSED[key]})")
    if kwargs.get("launcher") not in (None, "pytorch"):
        raise ConfigError(f"build_trainer default_args['launcher'] = {kwargs['launcher']!r}: gpt3zh runs under "
                          f"torchrun (launcher 'pytorch') or in one process")
    if kwargs.get("device", "gpu") not in ("gpu", "cpu") and not str(kwargs.get("device")).startswith("cuda"):
        raise ConfigError(f"build_trainer default_args['device'] = {kwargs['device']!r}: expected 'gpu' or 'cpu'")
    for key in kwargs:
        if key not in HONOURED:
            # ModelScope's trainer takes **kwargs and ignores what it does not know; so does this one,
            # loudly (the base model card passes `eval_datase=`: it trains without evaluation)
            close = difflib.get_close_matches(key, HONOURED, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            warnings.warn(f"build_trainer default_args[{key!r}] is not an argument of the trainer and is ignored, as "
                          f"ModelScope ignores it{hint}", UserWarning, stacklevel=4)


def _model_dir(model: Any, revision: str | None) -> Path:
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"build_trainer default_args['model']: expected a model id or directory, got "
                          f"{type(model).__name__} (gpt3zh fine-tunes model directories)")
    if revision not in (None, "master"):
        raise ConfigError(f"build_trainer default_args['model_revision'] = {revision!r}: gpt3zh uses the cached "
                          f"snapshot (revision None)")
    path = resolve_model(model)
    if not path.is_dir():
        raise FileNotFoundError(f"build_trainer: model {str(model)!r} is neither a model directory nor a cached "
                                f"ModelScope id")
    return path


def _configuration(model_dir: Path, cfg_file: str | None) -> ConfigDict:
    path = Path(cfg_file) if cfg_file else model_dir / CONFIGURATION
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ModelScope configuration.json (the trainer's settings come from it; "
                                f"pass cfg_file= to use another)")
    return ConfigDict.from_file(path)


def _model_info(model_dir: Path, shipped: dict[str, Any]) -> ModelInfo:
    from ...checkpoint import describe

    desc = describe(model_dir)
    if desc.format not in ("megatron", "modelscope"):
        raise ConfigError(f"{model_dir}: a {desc.format} model directory; the ModelScope trainer takes ModelScope "
                          f"directories (convert it with `gpt3zh convert --to megatron`)")
    return ModelInfo(model_dir, shipped, desc.format == "megatron", desc.extra.get("tp", 1),
                     desc.generation.tokens_to_generate, desc.extra.get("runtime_dtype"))


def _rows(data: Any, where: str) -> list[dict[str, Any]] | None:
    """A dataset's src_txt / tgt_txt rows, checked now (columns, types), as gpt3zh.train takes them."""
    if data is None:
        return None
    from ...training.data import detect_mode, rows_from_dataset

    rows = rows_from_dataset(data, where)
    detect_mode(rows, where)
    return rows


def _python_name(value: Any) -> str:
    return f"<python {getattr(value, '__qualname__', type(value).__name__)}>"
