"""Perplexity and greedy-generation metrics of a model on token rows: the trainer's periodic
evaluation and `gpt3zh eval` (gpt3zh.evaluation) both call these.

Reported numbers: `loss` = mean NLL (nats) per trained token (as training counts them: all real
tokens and <sep> for continuation, target tokens and <sep> for prompt->target), `ppl` = exp(loss),
`tokens`, `chars` (characters of the scored text, so `bits_per_char` compares across
tokenizers), and `ppl_modelscope`, ModelScope's unmasked definition (spec §8.3).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ..model import GPT
from .data import SRC, TGT, TokenRows, collate
from .metrics import BleuStats, PPLAccumulator, rouge_l


@torch.no_grad()
def evaluate_ppl(
    model,
    data: TokenRows,
    batch_size: int,
    device,
    pad_to: int | None = None,
    max_rows: int | None = None,
    autocast=contextlib.nullcontext,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Masked loss / ppl over trained tokens; with pad_to (= sequence_length - 1) also ModelScope's
    unmasked ppl, which needs the rows padded exactly as ModelScope pads them.

    Without pad_to (and for a plain GPT) only the trained positions go through the output head: on prompt->target data
    the (B, T, V) logits of every prompt position are most of an evaluation's cost. With no
    scored token at all, loss and ppl are None (not NaN, which is not JSON).
    progress: a bar on stderr (None: only when stderr is a terminal)."""
    n = len(data) if max_rows is None else min(max_rows, len(data))
    acc = PPLAccumulator()
    for i in _bar(range(0, n, batch_size), "ppl", progress):
        idx = range(i, min(i + batch_size, n))
        if pad_to is None and not data.trained_tokens[idx.start : idx.stop].any():
            continue  # only empty rows (nothing to score): their batch would be zero positions wide
        batch = collate(data, idx, pad_to=pad_to).to(device)
        with autocast():
            if pad_to is not None or not isinstance(model, GPT):  # a wrapped model: logits only
                logits = model(batch.tokens)  # (B, T, V)
                acc.update(logits, batch.labels, batch.mask, modelscope=True)
                continue
            logits = model.head(model.hidden(batch.tokens)[batch.mask])  # (N, V), N trained tokens
        labels = batch.labels[batch.mask]  # (N,)
        acc.update(logits[None], labels[None], torch.ones_like(labels[None], dtype=torch.bool))
    out = acc.result()
    chars = int(data.chars[:n].sum())
    out["chars"] = chars
    if not out["tokens"]:
        out["loss"] = out["ppl"] = None
    out["bits_per_char"] = out["loss"] * out["tokens"] / (math.log(2) * chars) if chars and out["tokens"] else None
    out["rows"] = n
    out["truncated_rows"] = int(data.truncated) if n == len(data) else None
    return out


@torch.no_grad()
def evaluate_generation(
    model, tok, rows: list[dict], data: TokenRows, max_new_tokens: int, batch_size: int,
    max_rows: int | None = None,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Greedy continuation of each prompt, cut at <sep>, scored against tgt_txt (characters)."""
    from ..generation import generate

    n = len(rows) if max_rows is None else min(max_rows, len(rows))
    # A prompt that fills the context (truncated at sequence_length) keeps its head, leaving room
    # for the answer; the head holds what the task puts first (the answer in the QG template).
    room = max(model.config.max_seq_len - max_new_tokens, 1)
    preds = []
    for i in _bar(range(0, n, batch_size), "generation", progress):
        idx = range(i, min(i + batch_size, n))
        # the prompt as ModelScope feeds it: the row's first prompts_len tokens (start + 1)
        prompts = [data.row(j)[: min(int(data.starts[j]) + 1, room)].tolist() for j in idx]
        outs = generate(model, prompts, max_new_tokens=max_new_tokens, eos_token_id=tok.sep_id)
        for p, o in zip(prompts, outs):
            new = o[len(p) :]
            if tok.sep_id in new:
                new = new[: new.index(tok.sep_id)]
            preds.append(tok.decode(new))
    refs = [rows[j][TGT] for j in range(n)]
    stats = BleuStats()
    for p, r in zip(preds, refs):
        stats.add(p, r)
    scores = [rouge_l(p, r) for p, r in zip(preds, refs)]
    return {
        "rouge_l": sum(scores) / len(scores) if scores else 0.0,
        "bleu4": stats.score(),
        "examples": [{"src": rows[j][SRC][:80], "pred": preds[j], "ref": refs[j]} for j in range(min(n, 3))],
    }


def _bar(batches: range, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    # tqdm's disable=None: drawn only when stderr is a terminal, so a redirected log stays clean
    return tqdm(batches, desc=desc, unit="batch", leave=False, disable=None if progress is None else not progress)
