"""`gpt3zh eval`: perplexity on continuation data, greedy generation + ROUGE-L / BLEU-4 on
prompt->target data, through the functions the trainer's periodic evaluation calls
(gpt3zh.training.evaluate; the training package never imports this command module).

Reported numbers: `loss` = mean NLL (nats) per trained token (as training counts them: all real
tokens and <sep> for continuation, target tokens and <sep> for prompt->target), `ppl` = exp(loss),
`tokens`, `chars` (characters of the scored text, so `bits_per_char` compares across
tokenizers), and `ppl_modelscope`, ModelScope's unmasked definition (ModelScope's PplMetric).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from .training.data import TGT, detect_mode, first_row_without_target, read_rows, tokenize_rows
from .training.evaluate import evaluate_generation, evaluate_ppl

__all__ = ["evaluate_generation", "evaluate_ppl", "run_eval", "run_eval_command"]


def run_eval(
    model_path: str,
    data_path: str,
    metrics: list[str] | None = None,
    tokenizer: str | None = None,
    sequence_length: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_rows: int | None = None,
    remap_columns: dict[str, str] | None = None,
    device: str = "auto",
    ppl_modelscope: bool = True,
    progress: bool | None = False,
) -> dict[str, Any]:
    from .checkpoint import load_model
    from .config import ConfigError
    from .tokenizer import load_tokenizer

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    rows = read_rows(data_path, remap_columns)
    mode = detect_mode(rows, data_path)
    metrics = metrics or (["ppl", "rouge", "bleu"] if mode == "prompt" else ["ppl"])
    if {"rouge", "bleu"} & set(metrics) and mode != "prompt":
        raise ConfigError(
            f"--metric rouge/bleu needs prompt->target data: {data_path} row {first_row_without_target(rows)} "
            f"has no {TGT}"
        )
    model = load_model(model_path).to(dev).eval()
    sequence_length = sequence_length or min(512, model.config.max_seq_len)
    if sequence_length > model.config.max_seq_len:
        raise ConfigError(
            f"--sequence-length {sequence_length} exceeds the model's context {model.config.max_seq_len}"
        )
    tok = load_tokenizer(tokenizer or model_path)
    data = tokenize_rows(rows, tok, sequence_length, mode, progress)
    n = len(data) if max_rows is None else min(max_rows, len(data))
    if not data.trained_tokens[:n].any():
        raise ConfigError(f"{data_path}: no token to score: all {n} rows evaluated are empty after tokenization")
    out: dict[str, Any] = {"model": str(model_path), "data": str(data_path), "mode": mode}
    out.update(evaluate_ppl(model, data, batch_size, dev, pad_to=sequence_length - 1 if ppl_modelscope else None,
                            max_rows=max_rows, progress=progress))
    if {"rouge", "bleu"} & set(metrics):
        out.update(evaluate_generation(model, tok, rows, data, max_new_tokens, batch_size, max_rows, progress))
    return out


# -------------------------------------------------------------------------------------------- CLI
def run_eval_command(args: argparse.Namespace) -> int:
    remap = {}
    for item in args.remap:
        src, sep, dst = item.partition("=")
        if not sep:
            raise ValueError(f"--remap {item!r}: expected FROM=TO, e.g. text1=src_txt")
        remap[src] = dst
    for name in ("sequence_length", "batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    result = run_eval(
        args.model, args.data, args.metric, args.tokenizer, args.sequence_length, args.batch_size,
        args.max_new_tokens, args.limit, remap, args.device, not args.no_ppl_modelscope,
        progress=True if args.progress else None,
    )
    if args.json:
        from .cli import json_safe

        print(json.dumps(json_safe(result), ensure_ascii=False, indent=2, allow_nan=False))
        return 0
    for key in ("mode", "rows", "tokens", "chars", "loss", "ppl", "bits_per_char", "ppl_modelscope", "rouge_l", "bleu4"):
        if key in result:
            value = result[key]
            print(f"{key:<15} {value:.4f}" if isinstance(value, float) else f"{key:<15} {value}")
    for ex in result.get("examples", []):
        print(f"  pred: {ex['pred']!r}\n  ref:  {ex['ref']!r}")
    return 0
