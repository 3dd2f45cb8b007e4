"""Generation entry points: thin synchronous drivers of the one engine (gpt3zh.engine).

- `generate(model, prompts, ...)`: each prompt followed by its continuation, as token-id lists;
- `stream(model, prompts, ...)`: the new token of each row, step by step;
- `run(model, requests, tokenizer)`: the engine's events for any list of requests, each with its own
  GenerationConfig (the pipeline and the CLI use it for text, stop strings and per-row budgets).

`model` is a GPT (prepared once, with the fastest path for its device, and cached: see
gpt3zh.inference), an InferenceModel from `gpt3zh.prepare(model, dtype=..., quantize=...)`, or what
`gpt3zh.load_pretrained(path)` returns: then the model directory's defaults are the starting
options (`GenerationConfig.from_defaults`, as the pipeline's: its stop ids, sampling settings and
length), as transformers' `generate` starts from a model's generation_config.json. A bare GPT
starts from `GenerationConfig()`: greedy, no stop id.
Sequence i of a seeded call samples with seed + i, the rule the server follows for its choices, so
a seeded row gives the same tokens alone, in a batch, or through any other way in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .config import GenerationConfig
from .detokenize import TextDecoder
from .engine import Engine, Event, FinishEvent, Request, TokenEvent, rows_config
from .inference import InferenceModel
from .model import GPT

ModelLike = GPT | InferenceModel


def resolve_config(config: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
    """`config` (default GenerationConfig()) with `options` overriding its fields."""
    config = config or GenerationConfig()
    return config.replace(**options) if options else config


# ------------------------------------------------------------------------------------------ prompts
def as_rows(prompts: Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> list[list[int]]:
    """Prompts as a list of token-id lists; each non-empty and inside the vocabulary."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise ValueError("prompts tensor must be an integer (B, T) tensor, "
                             f"got {prompts.dtype} {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists (or a (B, T) LongTensor), got "
                         f"{prompts!r}")
    rows = []
    for i, row in enumerate(prompts):
        if isinstance(row, int) or not isinstance(row, (list, tuple)):
            raise ValueError(f"prompt {i} must be a list of token ids, got {row!r} (a single prompt is [[ids...]])")
        if not row:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
        bad = [t for t in row if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]!r} outside the vocabulary [0, {vocab_size})")
        rows.append(list(row))
    return rows


def fit_context(cfg: GenerationConfig, rows: list[list[int]], max_seq_len: int) -> GenerationConfig:
    """Clamp max_new_tokens so prompt + new tokens fit the context; a prompt alone must leave room."""
    longest = max(len(r) for r in rows)
    if longest >= max_seq_len:
        raise ValueError(
            f"prompt of {longest} tokens leaves no room in the model's context of {max_seq_len} tokens "
            f"(a prompt must be shorter than max_seq_len)"
        )
    room = max_seq_len - longest
    if cfg.max_new_tokens > room:
        warnings.warn(
            f"max_new_tokens={cfg.max_new_tokens} with a {longest}-token prompt exceeds the context of "
            f"{max_seq_len} tokens; generating at most {room} new tokens",
            stacklevel=4,
        )
        cfg = dataclasses.replace(cfg, max_new_tokens=room)
    return cfg


def _unwrap(model, tokenizer) -> tuple[ModelLike, GenerationConfig | None]:
    """(the model to run, the starting config of a loaded model directory or None)."""
    from .checkpoint.api import Pretrained

    if isinstance(model, Pretrained):
        sep = getattr(tokenizer, "sep_id", None)
        return model.model, GenerationConfig.from_defaults(model.generation, model.model.config.vocab_size, sep)
    return model, None


def _requests(model: ModelLike, prompts, config: GenerationConfig | None, options: dict,
              base: GenerationConfig | None = None) -> list[Request]:
    cfg = resolve_config(config or base, **options)
    rows = as_rows(prompts, model.config.vocab_size)
    bad = [i for i in cfg.stop_ids if i >= model.config.vocab_size]
    if bad:
        raise ValueError(f"eos_token_id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
    cfg = fit_context(cfg, rows, model.config.max_seq_len)
    return [Request(row, c, index=i) for i, (row, c) in enumerate(zip(rows, rows_config(cfg, len(rows))))]


# ------------------------------------------------------------------------------------------ drivers
def run(model: ModelLike, requests: Sequence[Request], tokenizer: TextDecoder | None = None,
        cache_len: int | None = None) -> Iterator[list[Event]]:
    """Run `requests` to the end on an engine sized for them; yield each step's events.

    Prompts must be validated (as_rows) and fit the context. The first yield holds every row's first
    token (one batched prefill); each later one a decode step. Closing the iterator early frees the
    engine and its KV cache. cache_len: KV slots per row (default: just enough for the requests).
    """
    todo = [r for r in requests if r.config.max_new_tokens > 0]
    if not todo:
        return
    longest = max(len(r.prompt) for r in todo)
    need = max(len(r.prompt) + r.config.max_new_tokens - 1 for r in todo)  # the last token needs no slot
    slots = max(need, cache_len or 0)
    with Engine(model, tokenizer, max_batch=len(todo), max_len=slots, prefill_tokens=len(todo) * longest) as engine:
        engine.add(todo)
        while engine.has_work:
            for phase in (engine.admit, engine.decode):
                events = phase()
                if events:
                    yield events


def generate(
    model: ModelLike,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    tokenizer: TextDecoder | None = None,
    **options: Any,
) -> list[list[int]]:
    """Each prompt followed by its continuation, as token-id lists.

    `options` are GenerationConfig fields (max_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, eos_token_id, stop, seed) and override `config`. A row ends with its first
    stop id (included), at the token that completes a stop string (these need `tokenizer`), or after
    max_new_tokens; every row equals what generating it alone gives.
    """
    model, base = _unwrap(model, tokenizer)
    requests = _requests(model, prompts, config, options, base)
    new: list[list[int]] = [[] for _ in requests]
    with contextlib.closing(run(model, requests, tokenizer)) as steps:
        for events in steps:
            for ev in events:
                if isinstance(ev, TokenEvent):
                    new[ev.request.index].append(ev.token_id)
    return [req.prompt + ids for req, ids in zip(requests, new)]


def stream(
    model: ModelLike,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    tokenizer: TextDecoder | None = None,
    **options: Any,
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token id (None once the row has stopped).

    The concatenated ids of a row equal its continuation from `generate` with the same options
    (the stop id included). Closing the iterator early frees the KV cache.
    """
    model, base = _unwrap(model, tokenizer)
    requests = _requests(model, prompts, config, options, base)
    with contextlib.closing(run(model, requests, tokenizer)) as steps:
        for events in steps:
            out: list[int | None] = [None] * len(requests)
            for ev in events:
                if isinstance(ev, TokenEvent):
                    out[ev.request.index] = ev.token_id
            yield out


__all__ = ["FinishEvent", "GenerationConfig", "Request", "TokenEvent", "as_rows", "fit_context", "generate",
           "resolve_config", "run", "stream"]
