"""The `gpt3zh` command line: one subcommand per function, registered in COMMANDS.

Each subcommand is a pair (add_arguments(parser), run(args) -> exit code). Heavy imports happen
inside `run`, so `gpt3zh --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

from .cli_generate import DEMO, GENERATE  # light: nothing heavy is imported until a command runs
from .config import PRESETS, ConfigError, GPTConfig


class CLIError(Exception):
    """A user mistake: printed as `gpt3zh: error: ...`, exit code 2."""


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def _count_params_on_meta(cfg: GPTConfig) -> int:
    import torch

    from .model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- info
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="a model directory (any supported format)")
    p.add_argument("--preset", choices=list(PRESETS), help="describe a preset instead of a directory")
    p.add_argument("--json", action="store_true", help="print JSON")


def _info_run(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.preset is None):
        raise CLIError("info: give either a model directory PATH or --preset NAME")
    weights = None
    if args.preset:
        cfg, fmt, extra = PRESETS[args.preset], "preset", {"preset": args.preset}
        params = _count_params_on_meta(cfg)
        assert params == cfg.num_params, (params, cfg.num_params)
    else:
        from .checkpoint import describe, inspect_weights

        desc = describe(args.path)
        cfg, fmt, extra = desc.config, desc.format, desc.extra
        weights = inspect_weights(args.path)  # the real tensors' names and shapes, not the config's claim
        params = weights.params
    info = {"format": fmt, "params": params, "bf16_bytes": 2 * params, "config": cfg.to_dict(), **extra}
    if weights is not None:
        info["weights"] = {"files": weights.files, "tensors": weights.tensors, "config_params": cfg.num_params,
                           "matches_config": weights.ok, "problems": weights.problems}
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
    else:
        _print_info(fmt, extra, params, cfg, weights)
    if weights is not None and not weights.ok:
        raise CLIError(f"{args.path}: the weights do not match its config ({weights.problems[0]}"
                       f"{f'; {len(weights.problems) - 1} more problems above' if len(weights.problems) > 1 else ''})")
    return 0


def _print_info(fmt: str, extra: dict, params: int, cfg: GPTConfig, weights) -> None:
    print(f"format      {fmt}")
    for key, value in extra.items():
        print(f"{key:<11} {value}")
    print(f"params      {params:,}" + ("" if weights is None else f" in {weights.tensors} tensors"))
    print(f"bf16 size   {_human_bytes(2 * params)}")
    print(
        f"shape       {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, "
        f"ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}, {cfg.gelu} GELU"
    )
    if weights is not None and not weights.ok:
        print(f"MISMATCH    the config describes {cfg.num_params:,} params; the weight files hold:")
        for line in weights.problems:
            print(f"  {line}")


# ------------------------------------------------------------------------------------------- convert
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a model directory in any supported format")
    p.add_argument("dst", help="the output directory (written atomically)")
    p.add_argument("--to", required=True, choices=["gpt3zh", "modelscope", "megatron", "hf"], help="output format")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel shards (megatron only)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast the weights (default: keep)")
    p.add_argument("--force", action="store_true", help="replace a non-empty DST that is not a model directory")
    p.add_argument("--merge-lora", action="store_true",
                   help="SRC is a LoRA adapter directory (or --adapter one for SRC): write base + adapter merged, "
                   "as a plain model")
    p.add_argument("--adapter", help="a LoRA adapter directory for the model SRC (with --merge-lora)")


def _convert_run(args: argparse.Namespace) -> int:
    from .checkpoint import convert, describe

    out = convert(args.src, args.dst, to=args.to, tp=args.tp, overwrite=args.force, dtype=args.dtype,
                  merge_lora=args.merge_lora, adapter=args.adapter)
    desc = describe(out)
    shards = f", {desc.extra['tp']} TP shards" if "tp" in desc.extra else ""
    print(f"wrote {out} ({desc.format}, {desc.extra.get('dtype')}{shards})")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    _convert_args(p)
    p.set_defaults(to="gpt3zh")
    for action in p._actions:  # the same flags as convert, but --to defaults to gpt3zh
        if action.dest == "to":
            action.required = False
            action.help = "output format (default: gpt3zh)"
        elif action.dest == "src":
            action.help = "a training checkpoint (work_dir/checkpoints/step-N) or any model directory"


# ---------------------------------------------------------------------------------------------- init
def _init_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the model directory to write (gpt3zh format)")
    p.add_argument("--preset", required=True, choices=list(PRESETS), help="architecture")
    p.add_argument("--tokenizer", help="a tokenizer file or directory to put beside the weights "
                   "(1.3B and up: ModelScope's tokenizer.json; base/large: a BERT vocab.txt)")
    p.add_argument("--seed", type=int, default=0, help="init seed (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT that is not a model directory")


def _init_run(args: argparse.Namespace) -> int:
    """A randomly initialised model of a preset (Megatron's init), e.g. to try the tools or benchmark."""
    import torch

    from .checkpoint import save_model
    from .model import GPT
    from .tokenizer import load_tokenizer

    cfg = PRESETS[args.preset]
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise CLIError(f"init: the tokenizer has {tok.vocab_size} ids, more than preset {args.preset}'s "
                       f"vocab_size {cfg.vocab_size}")
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(getattr(torch, args.dtype))
    out = save_model(model, args.out, tokenizer=tok, overwrite=args.force)
    what = "with its tokenizer" if tok is not None else "no tokenizer (pass --tokenizer to generate text)"
    print(f"wrote {out}: random {args.preset} ({cfg.num_params:,} parameters, {args.dtype}), {what}")
    return 0


# --------------------------------------------------------------------------------------- train / eval
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config (YAML or JSON); paths inside are relative to the current directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=20")


def _train_run(args: argparse.Namespace) -> int:
    from .parallel import read_env
    from .training import train  # one process, or under torchrun dp x tp processes

    result = train(args.config, *args.overrides)
    if read_env().rank != 0:
        return 0
    summary = {"work_dir": str(result.work_dir), "output": str(result.output_dir), "step": result.step,
               "train_loss": result.train_loss, **{k: v for k, v in result.eval.items() if k != "examples"}}
    print(json.dumps(json_safe(summary), ensure_ascii=False, allow_nan=False))
    return 0


def json_safe(value):
    """NaN and infinities as null: json.dumps would print NaN, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (any supported format)")
    p.add_argument("--data", required=True, help="JSONL / JSON / CSV / parquet file with src_txt (and tgt_txt), "
                   "or multiple-choice rows {context, choices, gold}")
    p.add_argument(
        "--metric", action="append", choices=["ppl", "rouge", "bleu", "acc"],
        help="repeatable; default: ppl for continuation data, ppl+rouge+bleu for prompt->target data, "
        "acc (acc and acc_norm) for multiple-choice data (rows with context, choices, gold)",
    )
    p.add_argument("--adapter", help="a LoRA adapter directory for --model (an adapter directory that names its "
                   "base can also be given as --model)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the model's)")
    p.add_argument("--sequence-length", type=int,
                   help="truncate rows as training does (default: 512 or the model's context if shorter)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy generation length for rouge/bleu")
    p.add_argument("--limit", type=int, help="evaluate the first N rows only")
    p.add_argument("--remap", action="append", default=[], metavar="FROM=TO", help="rename a data column")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ppl-modelscope", action="store_true",
                   help="skip ModelScope's unmasked ppl (it needs logits of every padded position)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--progress", action="store_true",
                   help="draw progress bars on stderr even when it is not a terminal (default: only on a terminal)")


def _eval_run(args: argparse.Namespace) -> int:
    from .evaluation import run_eval_command

    return run_eval_command(args)


# ---------------------------------------------------------------------------------------------- serve
def _serve_args(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from .serve.settings import ServeConfig  # light: no FastAPI import until run

    p.add_argument("--model", help="model directory to serve (any supported format; its tokenizer beside it; "
                   "default: the embedded poetry-small model), or a distributed training checkpoint (with --tp)")
    p.add_argument("--adapter", help="a LoRA adapter directory, merged into --model at load (an adapter directory "
                   "that names its base can also be given as --model)")
    p.add_argument("--model-id", help="the name clients pass as `model` (default: the directory name)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the model's, or a training "
                   "checkpoint's run's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast the weights (default: keep)")
    for f in dataclasses.fields(ServeConfig):  # the remaining flags are ServeConfig's fields
        kind = int if f.type in ("int", "int | None") else float if f.type == "float" else str
        flag = "--" + f.name.replace("_", "-")
        shown = "" if f.default is None else f" (default: {f.default})"
        p.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + shown)
    group = p.add_argument_group("tensor parallel (launch with torchrun --nproc_per_node N; rank 0 serves HTTP)")
    group.add_argument("--tp", type=int, help="tensor-parallel ranks (default under torchrun: the model's "
                       "configuration.json megatron.tensor_model_parallel_size, else the number of processes)")
    group.add_argument("--dist-timeout", type=float, default=120.0,
                       help="seconds a rank may wait on another before the server ends (default: 120)")
    from .cli_generate import inference_flags

    inference_flags(p)


def _serve_run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from .assets import default_model_path
    from .parallel import read_env
    from .serve.settings import ServeConfig

    model_dir = Path(args.model) if args.model else default_model_path()  # a clear error when not installed
    config = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    env = read_env()
    if env.is_distributed or (args.tp or 1) > 1:
        return _serve_tp(args, env, model_dir, config)
    from .checkpoint import load_pretrained
    from .cli_generate import inference_options
    from .serve import serve
    from .tokenizer import load_tokenizer

    # any format, training checkpoints too; an adapter is merged in
    loaded = load_pretrained(model_dir, device=args.device, dtype=args.dtype, adapter=args.adapter)
    tokenizer = load_tokenizer(args.tokenizer or loaded.path)
    adapter = f", LoRA adapter {args.adapter}" if args.adapter else ""
    print(f"gpt3zh serve: model {loaded.path} ({loaded.format} format, {tokenizer.kind} tokenizer{adapter})",
          file=sys.stderr, flush=True)
    name = Path(args.adapter or model_dir).resolve().name
    serve(loaded.model, tokenizer, config, args.model_id or name, loaded.generation, inference_options(args))
    return 0


def _serving_tp(flag: int | None, source, world_size: int) -> tuple[int, str]:
    """(tp, where it came from): --tp, else the model's megatron block, else every process."""
    from .checkpoint.files import read_json
    from .parallel import megatron_tp

    if flag is not None:
        return flag, "--tp"
    conf = source.path / "configuration.json"
    block = read_json(conf).get("megatron") if source.format != "dcp" and conf.is_file() else None
    tp = megatron_tp(block, f"{conf} megatron")
    if tp is not None:
        return tp, f"{conf.name} megatron.tensor_model_parallel_size"
    return world_size, "the number of processes"


def _serve_tp(args: argparse.Namespace, env, model_dir, config) -> int:
    """`torchrun --nproc_per_node N -m gpt3zh serve --tp N`: rank 0 serves HTTP, every rank steps."""
    import torch.distributed as dist

    from .checkpoint.api import as_dtype
    from .checkpoint.sharded import describe_source
    from .parallel import ParallelError, check_tp_inference, load_tp_inference, start_tp_inference

    source = describe_source(model_dir)
    tp, where = _serving_tp(args.tp, source, env.world_size)
    try:  # every rank finds the same problem here, before any process group or weight
        check_tp_inference(source.config, tp, env.world_size, "serve")
    except ParallelError as err:
        raise ParallelError(f"{err} [tp from {where}]") from None
    device_type = "cuda" if args.device.startswith("cuda") else args.device
    device = f"cuda:{env.local_rank}" if args.device == "cuda" else args.device
    mesh = start_tp_inference(env, tp, device_type)
    try:
        model, read = load_tp_inference(source, mesh, device, as_dtype(args.dtype))
        print(f"gpt3zh serve: rank {env.rank} of {tp} (pid {os.getpid()}): {read}", file=sys.stderr, flush=True)
        return _serve_rank(args, env, source, model, config, tp)
    except ParallelError:
        raise
    except (RuntimeError, OSError) as err:  # a peer gone (closed connection, timeout) or this rank diverged
        print(f"gpt3zh serve: error: rank {env.rank}: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        dist.destroy_process_group()


def _serve_rank(args: argparse.Namespace, env, source, model, config, tp: int) -> int:
    import signal

    import torch

    from .cli_generate import inference_options
    from .config import GenerationDefaults
    from .engine import Engine
    from .inference import prepare
    from .parallel import agree_across_ranks, gloo_group
    from .serve.runner import Channel, TensorParallelRunner, TPFollower
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or source.tokenizer)
    generation = source.generation or GenerationDefaults(eod_id=tokenizer.sep_id)  # the trainer's rule
    inference = inference_options(args)
    prepared = prepare(model, inference)
    # Every rank must compute bit-identical logits (each samples its own copy of the next token).
    agree_across_ranks("inference path", f"{prepared.description}, {torch.get_num_threads()} threads")
    channel = Channel(gloo_group(args.dist_timeout), env.rank)
    if env.rank != 0:
        # Ctrl-C and torchrun's SIGTERM reach every rank; rank 0 then finishes the open streams
        # (which needs this rank) and sends the stop order. A rank 0 that is gone ends the wait too.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        engine = Engine(prepared, tokenizer, max_batch=config.max_batch, max_len=config.max_len)
        TPFollower(engine, channel).run()
        return 0
    from .serve import serve

    backend = "gloo" if args.device == "cpu" else "nccl, control over gloo"
    layout = f"tp={tp} over {tp} ranks ({backend}), {source.format} checkpoint"
    runner = TensorParallelRunner(channel, tp, layout, args.dist_timeout, on_fatal=_end_server)
    try:
        signal.signal(signal.SIGTERM, _stopped)  # uvicorn re-raises the SIGTERM it shut down on, after
        serve(model, tokenizer, config, args.model_id or source.path.resolve().name, generation, inference, runner)
    except _Stopped:
        pass
    failed = runner.leader.failed if runner.leader is not None else None
    if failed:
        print(f"gpt3zh serve: error: {failed}", file=sys.stderr, flush=True)
    return 1 if failed else 0


class _Stopped(Exception):
    """SIGTERM on rank 0 (torchrun stopping the job, or `_end_server`), after uvicorn shut down."""


def _stopped(signum, frame) -> None:
    raise _Stopped


def _end_server(message: str) -> None:
    """A rank failed: shut this server down as a SIGTERM does (uvicorn answers the open streams
    first), and for sure after 10 s."""
    import signal
    import threading

    os.kill(os.getpid(), signal.SIGTERM)
    timer = threading.Timer(10.0, os._exit, args=(1,))
    timer.daemon = True
    timer.start()


# ----------------------------------------------------------------------------------------------- plan
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, choices=list(PRESETS), help="model size to plan for")
    p.add_argument("--dp", type=int, help="data-parallel size (default: search the smallest layout that fits)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: search)")
    p.add_argument("--seq", type=int, help="sequence length (default: the model's context)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per GPU per forward (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    p.add_argument("--param-dtype", choices=["bf16", "fp32"], default="bf16",
                   help="weights and gradients dtype (bf16: fp32 AdamW moments, as train.param_dtype=bf16)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="activation dtype (autocast)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--rank", type=int, default=0, help="which rank to measure (FSDP shards can be uneven)")
    p.add_argument("--serve", action="store_true",
                   help="serving instead: weights + KV cache + prefill activations per GPU for each tp "
                        "(or --tp), for --batch rows of --seq context; --param-dtype is the weights' and cache's dtype")
    p.add_argument("--batch", type=int, default=8, help="with --serve: engine rows, as serve --max-batch (default 8)")
    p.add_argument("--lora", action="store_true", help="LoRA fine-tuning on one GPU (train.lora) instead of a full one")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (with --lora; default 8)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="LoRA dropout (with --lora; > 0 keeps more activations)")
    p.add_argument("--base-dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="dtype of the frozen base (with --lora; default bf16)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _plan_lora_run(args: argparse.Namespace) -> int:
    import torch

    from .planning import format_lora_plan, plan_lora

    if args.dp is not None or args.tp is not None:
        raise CLIError("plan --lora: plans one GPU; LoRA with tensor parallelism is not supported "
                       "(leave out --dp/--tp)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.base_dtype]
    plan = plan_lora(PRESETS[args.preset], r=args.lora_r, base_dtype=dtype, seq_len=args.seq,
                     micro_batch=args.micro_batch, gpu_mem_gib=args.gpu_mem, dropout=args.lora_dropout,
                     act_bytes=2 if args.precision == "bf16" else 4,
                     activation_checkpointing=args.activation_checkpointing)
    print(json.dumps({"preset": args.preset, **plan.to_dict()}) if args.json else format_lora_plan(args.preset, plan))
    return 0


def _plan_run(args: argparse.Namespace) -> int:
    import torch

    if args.lora and args.serve:
        raise CLIError("plan: give --lora (LoRA fine-tuning) or --serve (serving), not both")
    if args.lora:
        return _plan_lora_run(args)

    from .parallel import ParallelDims
    from .planning import format_plan, plan_layout, search

    cfg = PRESETS[args.preset]
    if args.serve:
        return _plan_serve(args, cfg)
    kw = {"seq_len": args.seq, "micro_batch": args.micro_batch, "gpu_mem_gib": args.gpu_mem,
          "param_dtype": torch.bfloat16 if args.param_dtype == "bf16" else torch.float32,
          "act_bytes": 2 if args.precision == "bf16" else 4,
          "activation_checkpointing": args.activation_checkpointing}
    if args.dp is None and args.tp is None:
        plan = search(cfg, **kw)
        if plan is None:
            raise CLIError(f"plan: no layout up to 512 GPUs fits {args.preset} in {args.gpu_mem} GiB; "
                           "try --activation-checkpointing or a smaller --micro-batch / --seq")
    else:
        plan = plan_layout(cfg, ParallelDims(dp=args.dp or 1, tp=args.tp or 1), rank=args.rank, **kw)
    print(json.dumps({"preset": args.preset, **plan.to_dict()}, indent=2) if args.json
          else format_plan(args.preset, plan))
    return 0


def _plan_serve(args: argparse.Namespace, cfg: GPTConfig) -> int:
    import torch

    from .planning import format_serve_plans, plan_serving, serving_tps

    if args.dp not in (None, 1):
        raise CLIError("plan --serve: serving has no data parallelism (--dp); run more servers for throughput")
    dtype = torch.bfloat16 if args.param_dtype == "bf16" else torch.float32
    tps = [args.tp] if args.tp else serving_tps(cfg)
    plans = [plan_serving(cfg, tp, batch=args.batch, context=args.seq, dtype=dtype,
                          act_bytes=2 if args.precision == "bf16" else 4, gpu_mem_gib=args.gpu_mem) for tp in tps]
    if args.json:
        print(json.dumps({"preset": args.preset, "dtype": args.param_dtype, "plans": [p.to_dict() for p in plans]},
                         indent=2))
    else:
        print(format_serve_plans(args.preset, plans, args.param_dtype))
    return 0


Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]

COMMANDS: dict[str, Command] = {
    "generate": GENERATE,
    "demo": DEMO,
    "info": (_info_args, _info_run, "parameter count, size and format of a preset or model directory"),
    "init": (_init_args, _init_run, "write a randomly initialised model of a preset (to try the tools)"),
    "convert": (_convert_args, _convert_run,
                "convert a model directory to another format (gpt3zh, modelscope, megatron, hf)"),
    "export": (_export_args, _convert_run, "write a training checkpoint (or any model directory) as a model directory"),
    "train": (_train_args, _train_run, "fine-tune or train from a YAML/JSON config (KEY=VALUE overrides win)"),
    "eval": (_eval_args, _eval_run, "perplexity, or greedy ROUGE-L / BLEU-4, of a model on a data file"),
    "plan": (_plan_args, _plan_run, "per-GPU memory of a dp x tp training layout, or of serving (--serve); "
             + "measured on a fake process group"),
    "serve": (_serve_args, _serve_run, "OpenAI-compatible HTTP server with continuous batching and a playground"),
}


class _LazySubcommands(argparse._SubParsersAction):
    """Subcommands whose flags are added only when the subcommand is chosen.

    Some commands derive their flags from dataclasses in modules that import torch (seconds);
    `gpt3zh --help` and every other command then never pay for them.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        add_args = self.pending.pop(values[0], None)  # values: [command, its arguments...]
        if add_args is not None:
            add_args(self._name_parser_map[values[0]])
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt3zh", description="Chinese GPT-3 toolkit")
    parser.add_argument("--version", action="version", version="gpt3zh 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=_LazySubcommands)
    for name, (add_args, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
        sub.pending[name] = add_args
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][1](args)
    except (CLIError, ConfigError, ValueError) as err:
        print(f"gpt3zh {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a missing file, a full or read-only disk, a path under a regular file
        from .fileio import describe_os_error

        print(f"gpt3zh {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
