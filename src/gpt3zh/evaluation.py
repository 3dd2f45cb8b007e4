"""`gpt3zh eval`: perplexity on continuation data, greedy generation + ROUGE-L / BLEU-4 on
prompt->target data, through the functions the trainer's periodic evaluation calls
(gpt3zh.training.evaluate; the training package never imports this command module), and accuracy
on multiple-choice data.

Reported numbers: `loss` = mean NLL (nats) per trained token (as training counts them: all real
tokens and <sep> for continuation, target tokens and <sep> for prompt->target), `ppl` = exp(loss),
`tokens`, `chars` (characters of the scored text, so `bits_per_char` compares across
tokenizers), and `ppl_modelscope`, ModelScope's unmasked definition (ModelScope's PplMetric).

Multiple choice (rows `{"context": str, "choices": [str, ...], "gold": int}`), scored as
lm-evaluation-harness's `multiple_choice` tasks score them: each choice's log-likelihood given the
context (gpt3zh.scoring.loglikelihood; the choice text is the continuation exactly as written, no
delimiter added), `acc` = the most likely choice is the gold one, `acc_norm` = the same after
dividing each log-likelihood by its choice's length in characters, and their standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

from .training.data import TGT, detect_mode, first_row_without_target, read_rows, tokenize_rows
from .training.evaluate import evaluate_generation, evaluate_ppl

__all__ = ["evaluate_choices", "evaluate_generation", "evaluate_ppl", "run_eval", "run_eval_command"]


CHOICE_COLUMNS = ("context", "choices", "gold")


def is_choice_data(rows: list[dict]) -> bool:
    return "choices" in rows[0]


def check_choice_rows(rows: list[dict], where: str) -> None:
    """Every row: a non-empty context string, at least two non-empty choice strings, a gold index."""
    from .config import ConfigError

    for i, row in enumerate(rows, 1):
        missing = [c for c in CHOICE_COLUMNS if c not in row]
        if missing:
            raise ConfigError(f"{where}: row {i} has no {missing[0]!r} (multiple-choice rows need "
                              f"{', '.join(CHOICE_COLUMNS)}; columns: {', '.join(map(str, row))})")
        context, choices, gold = (row[c] for c in CHOICE_COLUMNS)
        if not isinstance(context, str) or not context:
            raise ConfigError(f"{where}: row {i} context must be a non-empty string, got {context!r}")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ConfigError(f"{where}: row {i} choices must be a list of at least 2 non-empty strings, "
                              f"got {choices!r}")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise ConfigError(f"{where}: row {i} gold must be an index into its {len(choices)} choices, got {gold!r}")


def evaluate_choices(model, tok, rows: list[dict], batch_size: int = 16, max_rows: int | None = None) -> dict[str, Any]:
    """acc / acc_norm of multiple-choice rows (see the module docstring); rows checked first."""
    from .scoring import loglikelihood

    rows = rows[:max_rows] if max_rows is not None else rows
    check_choice_rows(rows, "data")
    pairs = [(row["context"], choice) for row in rows for choice in row["choices"]]
    scored = iter(loglikelihood(model, tok, pairs, batch_size))
    hits, hits_norm, examples, truncated = [], [], [], 0
    for row in rows:
        lls = [next(scored) for _ in row["choices"]]
        truncated += any(ll.truncated for ll in lls)
        pred = max(range(len(lls)), key=lambda j: lls[j].logprob)
        pred_norm = max(range(len(lls)), key=lambda j: lls[j].logprob / len(row["choices"][j]))
        hits.append(float(pred == row["gold"]))
        hits_norm.append(float(pred_norm == row["gold"]))
        if len(examples) < 3:
            examples.append({"context": row["context"][:80], "pred": row["choices"][pred],
                             "gold": row["choices"][row["gold"]], "logprobs": [ll.logprob for ll in lls]})
    return {"rows": len(rows), "acc": _mean(hits), "acc_stderr": _stderr(hits), "acc_norm": _mean(hits_norm),
            "acc_norm_stderr": _stderr(hits_norm), "truncated_rows": truncated, "examples": examples}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _stderr(xs: list[float]) -> float | None:
    """Standard error of the mean (sample deviation / sqrt(n)), as lm-eval reports it."""
    n = len(xs)
    if n < 2:
        return None
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)



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
    adapter: str | None = None,
) -> dict[str, Any]:
    from .checkpoint import load_pretrained
    from .config import ConfigError
    from .tokenizer import load_tokenizer

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                       else "cpu" if device == "auto" else device)
    rows = read_rows(data_path, remap_columns)
    if is_choice_data(rows):
        return _run_choice_eval(model_path, data_path, rows, metrics, tokenizer, batch_size, max_rows, dev, adapter)
    if metrics and "acc" in metrics:
        raise ConfigError(f"--metric acc needs multiple-choice data ({', '.join(CHOICE_COLUMNS)} in every row); "
                          f"{data_path} row 1 has no 'choices'")
    mode = detect_mode(rows, data_path)
    metrics = metrics or (["ppl", "rouge", "bleu"] if mode == "prompt" else ["ppl"])
    if {"rouge", "bleu"} & set(metrics) and mode != "prompt":
        raise ConfigError(
            f"--metric rouge/bleu needs prompt->target data: {data_path} row {first_row_without_target(rows)} "
            f"has no {TGT}"
        )
    loaded = load_pretrained(model_path, adapter=adapter)
    model = loaded.model.to(dev).eval()
    sequence_length = sequence_length or min(512, model.config.max_seq_len)
    if sequence_length > model.config.max_seq_len:
        raise ConfigError(
            f"--sequence-length {sequence_length} exceeds the model's context {model.config.max_seq_len}"
        )
    tok = load_tokenizer(tokenizer or loaded.path)
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


def _run_choice_eval(model_path, data_path, rows, metrics, tokenizer, batch_size, max_rows, dev,
                     adapter=None) -> dict[str, Any]:
    from .checkpoint import load_pretrained
    from .config import ConfigError
    from .tokenizer import load_tokenizer

    if metrics and set(metrics) != {"acc"}:
        raise ConfigError(f"{data_path} is multiple-choice data (rows with choices): it is scored by --metric acc "
                          f"(acc and acc_norm), not {', '.join(m for m in metrics if m != 'acc')}")
    check_choice_rows(rows, str(data_path))  # before the (possibly large) model load
    loaded = load_pretrained(model_path, adapter=adapter)
    model = loaded.model.to(dev).eval()
    tok = load_tokenizer(tokenizer or loaded.path)
    out: dict[str, Any] = {"model": str(model_path), "data": str(data_path), "mode": "choice"}
    out.update(evaluate_choices(model, tok, rows, batch_size, max_rows))
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
        progress=True if args.progress else None, adapter=args.adapter,
    )
    if args.json:
        from .cli import json_safe

        print(json.dumps(json_safe(result), ensure_ascii=False, indent=2, allow_nan=False))
        return 0
    for key in ("mode", "rows", "tokens", "chars", "loss", "ppl", "bits_per_char", "ppl_modelscope", "rouge_l", "bleu4",
                "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        if key in result:
            value = result[key]
            print(f"{key:<15} {value:.4f}" if isinstance(value, float) else f"{key:<15} {value}")
    for ex in result.get("examples", []):
        print(f"  pred: {ex['pred']!r}\n  {'gold' if 'gold' in ex else 'ref'}:  {ex.get('gold', ex.get('ref'))!r}")
    return 0
