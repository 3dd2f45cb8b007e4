"""`gpt3zh generate` and `gpt3zh demo`: the text-generation pipeline on the command line.

The sampling flags are derived from GenerationConfig's fields, so they cannot drift from the
library; a flag left out keeps the model's own default (config.json), as the pipeline does.
Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

DEMO_OPENINGS = ("床前明月光，", "春眠不觉晓，", "白日依山尽，")
_NOISE_BANNER = (
    "!" * 78 + "\n"
    "!! The embedded default model (poetry-small) is not installed.\n"
    "!! This demo is running a TINY model with RANDOM weights instead:\n"
    "!! the text below is NOISE from random weights, not what gpt3zh models write.\n" + "!" * 78
)


# ------------------------------------------------------------------------------------------ flags
def _generation_flags(p: argparse.ArgumentParser) -> None:
    from .config import GenerationConfig  # a dataclass module: no torch import at parse time

    group = p.add_argument_group("generation (default: the model's config.json, as ModelScope)")
    fields = []
    for f in dataclasses.fields(GenerationConfig):
        flag = "--" + f.name.replace("_", "-")
        fields.append(f.name)
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "eos_token_id":
            group.add_argument(flag, type=int, action="append", default=None, metavar="ID", help=help_text)
        elif f.name == "stop":
            group.add_argument(flag, action="append", default=None, metavar="TEXT", help=help_text)
        else:
            kind = int if f.type.startswith("int") else float if f.type.startswith("float") else str
            group.add_argument(flag, type=kind, default=None, help=help_text)
    group.add_argument("--max-length", type=int, help="total tokens including the prompt (ModelScope's meaning); "
                       "instead of --max-new-tokens")
    p.set_defaults(generation_options=[*fields, "max_length"])


def inference_flags(p: argparse.ArgumentParser) -> None:
    """--quantize, --compile, --cpu-kernels, --pack-weights: InferenceOptions' fields (the model's
    --dtype casts at load)."""
    from .config import QUANTIZE, InferenceOptions

    group = p.add_argument_group("inference path (default: the fastest for the device)")
    for f in dataclasses.fields(InferenceOptions):
        if f.name == "dtype":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "quantize":
            group.add_argument(flag, choices=QUANTIZE, default=None, help=f.metadata["help"])
        else:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
    p.add_argument("--verbose", action="store_true", help="print the chosen inference path to stderr")


def inference_options(args: argparse.Namespace):
    from .config import InferenceOptions

    return InferenceOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(InferenceOptions)
                               if f.name != "dtype"})


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {n: getattr(args, n) for n in args.generation_options if getattr(args, n) is not None}
    for name in ("eos_token_id", "stop"):
        if isinstance(opts.get(name), list):
            opts[name] = tuple(opts[name])
    return opts


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (any supported format; default: the embedded poetry-small)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the model's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast the weights (default: keep)")


def _load_pipeline(args: argparse.Namespace):
    from .pipelines import TextGenerationPipeline, pipeline

    tp = getattr(args, "tp", 1)
    inference = inference_options(args)
    if tp == 1:
        pipe = pipeline("text-generation", model=args.model, tokenizer=args.tokenizer, device=args.device,
                        dtype=args.dtype, quantize=inference.quantize, compile=inference.compile,
                        cpu_kernels=inference.cpu_kernels, pack_weights=inference.pack_weights)
    else:  # under torchrun: every rank holds a slice and computes the same tokens
        from .assets import default_model_path
        from .checkpoint import load_pretrained
        from .parallel import read_env, setup_tp_inference
        from .tokenizer import load_tokenizer

        device = f"cuda:{read_env().local_rank}" if args.device == "cuda" else args.device
        loaded = load_pretrained(args.model or default_model_path(), device=device, dtype=args.dtype)
        setup_tp_inference(loaded.model, tp)  # before the pipeline prepares its view of the model
        tok = load_tokenizer(args.tokenizer or loaded.path)
        pipe = TextGenerationPipeline(loaded.model, tok, loaded.generation, inference)
    if getattr(args, "verbose", False):
        print(f"gpt3zh: {pipe!r}", file=sys.stderr, flush=True)
    return pipe


# --------------------------------------------------------------------------------------- generate
def generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="*",
                   help="prompts (none: read --file, or stdin; on a terminal, an interactive loop)")
    _model_flags(p)  # before the sampling flags: its --dtype wins over GenerationConfig.dtype
    p.add_argument("--file", help="read prompts from this file, one per line (blank lines skipped), batched")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts per batch for --file / stdin / --json (default 8)")
    p.add_argument("--json", action="store_true", help='print one JSON object per prompt: {"prompt": ..., "text": ...}')
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (launch with torchrun --nproc_per_node N; rank 0 prints)")
    _generation_flags(p)
    inference_flags(p)


def generate_run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.file and args.prompt:
        raise ValueError("give prompts as arguments or with --file, not both")
    opts = _options(args)
    if args.tp > 1:
        import os

        from .parallel import read_env

        if not (args.file or args.prompt):
            raise ValueError("--tp: give prompts as arguments or with --file (stdin reaches one process only)")
        if read_env().rank != 0:
            stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    if args.file:
        prompts, streamed = _read_lines(args.file), False
    elif args.prompt:
        prompts, streamed = list(args.prompt), True
    elif stdin.isatty():
        return interactive(_load_pipeline(args), opts, stdout)
    else:
        prompts, streamed = [line.rstrip("\r\n") for line in stdin if line.strip()], False
    if not prompts:
        raise ValueError("no prompts: the input has no non-blank lines")
    pipe = _load_pipeline(args)
    if args.json:
        for prompt, text in _batched(pipe, prompts, args.batch_size, opts):
            print(json.dumps({"prompt": prompt, "text": text}, ensure_ascii=False), file=stdout, flush=True)
    elif streamed:
        for prompt in prompts:
            _stream_to(stdout, pipe.stream(prompt, **opts), prompt)
    else:
        for _, text in _batched(pipe, prompts, args.batch_size, opts):
            print(text, file=stdout, flush=True)
    return 0


def _read_lines(path: str) -> list[str]:
    from pathlib import Path

    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"--file {path}: no such file")
    return [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def _batched(pipe, prompts: list[str], size: int, opts) -> Iterator[tuple[str, str]]:
    for start in range(0, len(prompts), size):
        chunk = prompts[start : start + size]
        for prompt, out in zip(chunk, pipe(chunk, **opts)):
            yield prompt, out["text"]


def _stream_to(out: TextIO, pieces: Iterable[str], prompt: str = "") -> None:
    out.write(prompt)
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()


def interactive(pipe, opts: dict[str, Any], out: TextIO, read: Callable[[str], str] = input) -> int:
    """Read a prompt, stream its continuation, repeat; an empty line, `exit` or EOF ends it."""
    print("gpt3zh generate: type a prompt and press Enter (empty line or Ctrl-D to quit)", file=out, flush=True)
    while True:
        try:
            prompt = read("> ")
        except EOFError:
            break
        if not prompt.strip() or prompt.strip() in ("exit", "quit"):
            break
        try:
            _stream_to(out, pipe.stream(prompt, **opts), prompt)
        except ValueError as err:  # a bad prompt (e.g. too long) should not end the session
            print(f"error: {err}", file=out, flush=True)
    return 0


# -------------------------------------------------------------------------------------------- demo
def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the i-th opening uses seed + i; default 0)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per continuation (default 48)")


def demo_run(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    stdout = stdout or sys.stdout
    from .assets import default_model_path

    try:
        from .pipelines import pipeline

        pipe = pipeline("text-generation", model=default_model_path(), device=args.device)
        print(f"gpt3zh demo: {default_model_path()}", file=stdout)
    except FileNotFoundError:
        print(_NOISE_BANNER, file=stdout, flush=True)
        print(_NOISE_BANNER, file=sys.stderr, flush=True)
        pipe = random_demo_pipeline(args.device)
    for i, opening in enumerate(DEMO_OPENINGS):
        _stream_to(stdout, pipe.stream(opening, max_new_tokens=args.max_new_tokens, seed=args.seed + i), opening)
    return 0


def random_demo_pipeline(device: str = "cpu"):
    """A tiny random-weight model over a character vocabulary of the demo's classic poems."""
    import torch

    from .config import GenerationDefaults, GPTConfig
    from .model import GPT
    from .pipelines import TextGenerationPipeline
    from .tokenizer import train_char_tokenizer

    poems = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
             "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]
    tok = train_char_tokenizer(poems)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, max_seq_len=128)
    model = GPT(cfg).to(device).eval()
    return TextGenerationPipeline(model, tok, GenerationDefaults(eod_id=tok.eod_id, tokens_to_generate=48))


GENERATE = (generate_args, generate_run, "generate text: stream continuations of prompts (arguments, --file, stdin)")
DEMO = (demo_args, demo_run, "continue three classic poem openings with the embedded default model")
