"""`pipeline("text-generation", model=...)`: text in, `{"text": prompt + continuation}` out, as
ModelScope's TextGenerationPipeline / DistributedGPT3Pipeline answer (spec §7).

What ModelScope does, and so this does:
- inputs: a str, a dict with `src_txt` (Megatron models), `sentence` (single-process models) or
  `text`, or a list of them (`batch_size=` rows at a time); one output dict per input.
- defaults: sampling with the model's top_k / top_p / temperature from config.json, and
  `tokens_to_generate` new tokens; `max_length` is the TOTAL length, prompt included (capped at
  the context). A top_p of 0 in config.json means "off" there and becomes 1.0 here.
- output text: the tokenizer's `detokenize` of prompt + continuation (BERT: skip special tokens,
  then remove spaces between Chinese characters; JiebaBPE: cut at the first <sep>, prompt
  included). The continuation ends before the first stop token: config.json's eod_id, its
  extra stop ids, and the tokenizer's <sep> (fine-tuned models emit <sep>, spec §8.1).

Additions: every GenerationConfig option, `stop=` strings (the continuation is cut before the first
one), and `stream()`, which yields text pieces whose concatenation is exactly the returned text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import generation
from .checkpoint.api import as_dtype
from .generation import GenerationConfig
from .model import GPT
from .tokenizer import Tokenizer, load_tokenizer

TASKS = ("text-generation",)
INPUT_KEYS = ("src_txt", "sentence", "text")  # ModelScope's Megatron, single-process, and plain names
PIPELINE_OPTIONS = ("max_length", "stop")
_REPLACEMENT = "\ufffd"  # what a decoder shows for the first bytes of a character split across tokens


def pipeline(
    task: str = "text-generation",
    model: str | os.PathLike | GPT | None = None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> TextGenerationPipeline:
    """A text-generation pipeline over a model directory (or a GPT and its tokenizer).

    model=None uses the embedded default model (gpt3zh.assets.default_model_path()). A GPT object
    needs `tokenizer=` (a Tokenizer or a path); a directory brings its own tokenizer unless one
    is given. device=None keeps a GPT where it is and loads a directory onto the CPU.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; gpt3zh pipelines do: {', '.join(TASKS)}")
    if model is None:
        from .assets import default_model_path

        model = default_model_path()
    if isinstance(model, GPT):
        if tokenizer is None:
            raise ValueError("pipeline(model=<GPT object>) needs tokenizer= (a Tokenizer or a tokenizer path)")
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=as_dtype(dtype))
    elif isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_model

        path = model
        model = load_model(path, device=device or "cpu", dtype=dtype)
        tokenizer = path if tokenizer is None else tokenizer
    else:
        raise TypeError(f"model must be a model directory path, a gpt3zh GPT, or None; got {type(model).__name__}")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    return TextGenerationPipeline(model.eval(), tokenizer)


@dataclass(frozen=True)
class _Request:
    """One call's resolved settings: the generation config, per-row token budgets and stop strings."""

    config: GenerationConfig
    max_length: int | None
    stops: tuple[str, ...]


class TextGenerationPipeline:
    """Call with a prompt (or a list of prompts) and generation options; see `pipeline`."""

    def __init__(self, model: GPT, tokenizer: Tokenizer) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{model.config.vocab_size}: they do not belong together"
            )
        self.model = model
        self.tokenizer = tokenizer

    # ---------------------------------------------------------------------------------- options
    def default_config(self) -> GenerationConfig:
        """ModelScope's defaults: sample with config.json's top_k / top_p / temperature."""
        d = self.model.generation_defaults
        stops = {d.eod_id, *d.extra_stop_ids}
        if self.tokenizer.sep_id is not None:
            stops.add(self.tokenizer.sep_id)
        return GenerationConfig(
            max_new_tokens=d.tokens_to_generate,
            do_sample=d.top_k != 1,  # ModelScope's sample() takes top_k == 1 as argmax
            temperature=d.temperature,
            top_k=d.top_k,
            top_p=d.top_p if 0 < d.top_p <= 1 else 1.0,  # 0 = off in ModelScope
            eos_token_id=tuple(sorted(i for i in stops if i < self.model.config.vocab_size)) or None,
        )

    def _request(self, options: dict[str, Any]) -> _Request:
        options = dict(options)
        max_length = options.pop("max_length", None)
        stops = _stop_strings(options.pop("stop", None))
        if max_length is not None:
            if "max_new_tokens" in options:
                raise ValueError("give max_length (total tokens, prompt included) or max_new_tokens, not both")
            if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
                raise ValueError(f"max_length must be an int >= 1 (total tokens, prompt included), got {max_length!r}")
            max_length = min(max_length, self.model.config.max_seq_len)  # ModelScope caps it silently
        try:
            config = self.default_config().replace(**options)
        except ValueError as err:
            raise ValueError(f"{err} (pipeline options also take: {', '.join(PIPELINE_OPTIONS)})") from None
        return _Request(config, max_length, stops)

    def _budgets(self, rows: list[list[int]], req: _Request) -> tuple[list[int], GenerationConfig]:
        """New tokens allowed per row, and the config that runs long enough for all of them."""
        if req.max_length is None:
            return [req.config.max_new_tokens] * len(rows), req.config
        for i, row in enumerate(rows):
            if len(row) >= req.max_length:
                raise ValueError(
                    f"prompt {i} is {len(row)} tokens, which leaves nothing to generate within "
                    f"max_length={req.max_length} (the total length, prompt included)"
                )
        budgets = [req.max_length - len(row) for row in rows]
        return budgets, dataclasses.replace(req.config, max_new_tokens=max(budgets))

    # ---------------------------------------------------------------------------------- inputs
    def _encode(self, text: str, i: int = 0) -> list[int]:
        ids = self.tokenizer.encode_prompt(text)
        if not ids:
            raise ValueError(f"prompt {i} ({text!r}) encodes to no tokens; generation needs at least one")
        longest = self.model.config.max_seq_len
        if len(ids) >= longest:
            raise ValueError(
                f"prompt {i} is {len(ids)} tokens; the model's context is {longest} tokens, so a prompt "
                f"must be at most {longest - 1} tokens to leave room for generation"
            )
        return ids

    # ---------------------------------------------------------------------------------- calls
    def __call__(self, inputs, batch_size: int | None = None, **options: Any):
        """{"text": ...} for one input, a list of them for a list of inputs."""
        single = not isinstance(inputs, (list, tuple))
        texts = [_prompt_text(inputs)] if single else [_prompt_text(x, i) for i, x in enumerate(inputs)]
        if not texts:
            raise ValueError("inputs is an empty list: give a prompt or a list of prompts")
        size = len(texts) if batch_size is None else batch_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        req = self._request(options)
        out = []
        for start in range(0, len(texts), size):
            rows = [self._encode(t, start + j) for j, t in enumerate(texts[start : start + size])]
            out += [{"text": text} for text in self._generate(rows, req)]
        return out[0] if single else out

    def stream(self, inputs, **options: Any) -> Iterator[str]:
        """Yield text pieces of one prompt's output; joined they equal `self(inputs, **same)["text"]`.

        The first piece is the (decoded) prompt. A piece never ends inside a character: text whose
        last character is still incomplete (a trailing U+FFFD) or could still change is held back.
        """
        if isinstance(inputs, (list, tuple)):
            raise TypeError("stream() takes one prompt (a str or a dict); call the pipeline for a list")
        req = self._request(options)
        rows = [self._encode(_prompt_text(inputs))]
        budgets, cfg = self._budgets(rows, req)
        state = _RowText(self, rows[0], budgets[0], req.stops, cfg.stop_ids)
        emitted = ""
        for _ in self._steps(rows, [state], cfg):
            piece = self._stable_text(state)
            if piece.startswith(emitted) and len(piece) > len(emitted):
                yield piece[len(emitted) :]
                emitted = piece
        final = state.text()
        if not final.startswith(emitted):  # cannot happen with the hold-back rules; say so if it does
            raise RuntimeError(f"streamed text {emitted!r} is not a prefix of the final text {final!r}")
        if len(final) > len(emitted):
            yield final[len(emitted) :]

    # ---------------------------------------------------------------------------------- decoding
    def _generate(self, rows: list[list[int]], req: _Request) -> list[str]:
        budgets, cfg = self._budgets(rows, req)
        states = [_RowText(self, row, b, req.stops, cfg.stop_ids) for row, b in zip(rows, budgets)]
        if req.stops or req.max_length is not None:
            for _ in self._steps(rows, states, cfg):  # step by step: rows end at stop strings / budgets
                pass
        else:
            full = generation.generate(self.model, rows, cfg)
            for state, ids in zip(states, full):
                state.ids = ids[len(state.prompt) :]
        return [s.text() for s in states]

    def _steps(self, rows, states: list[_RowText], cfg: GenerationConfig) -> Iterator[None]:
        """Advance every row one token per step until each is finished; yield after each step."""
        with contextlib.closing(generation.stream(self.model, rows, cfg)) as steps:
            for toks in steps:
                for state, tok in zip(states, toks):
                    if tok is not None and not state.done:
                        state.add(tok)
                yield
                if all(s.done for s in states):
                    return

    def _stable_text(self, state: _RowText) -> str:
        """The part of the row's text that later tokens cannot change."""
        if state.done:
            return state.text()
        ids = state.prompt + state._kept()
        text = self.tokenizer.detokenize(ids)
        if self.tokenizer.kind == "bert":
            # BERT decoding is not prefix-stable: "##" pieces grow the last word (and can change
            # whether it counts as Chinese, i.e. the space before it), and transformers' clean-up
            # rewrites the space around punctuation when a next word arrives. Words before the
            # last two are final; keep only what the current whole text agrees with.
            older = self.tokenizer.detokenize(ids[: self._second_last_word(ids)])
            text = os.path.commonprefix([older, text]).rstrip()
        text = text.rstrip(_REPLACEMENT)  # an incomplete multi-token character
        cut = _continuation_start(text, state.prompt_text)
        return text[: cut + _safe_length(text[cut:], state.stops)]

    def _second_last_word(self, ids: list[int]) -> int:
        tok = self.tokenizer
        starts = [i for i, t in enumerate(ids)
                  if t not in tok.special_ids and not (tok.id_to_token(t) or "").startswith("##")]
        return starts[-2] if len(starts) >= 2 else 0


class _RowText:
    """One row's continuation ids and the text rules (stop ids, stop strings, token budget)."""

    def __init__(self, pipe: TextGenerationPipeline, prompt, budget: int, stops, stop_ids) -> None:
        self.pipe, self.prompt, self.budget, self.stops, self.stop_ids = pipe, prompt, budget, stops, stop_ids
        self.prompt_text = pipe.tokenizer.detokenize(prompt)
        self.ids: list[int] = []
        self.cut: int | None = None  # where a stop string starts in the continuation text
        self.done = budget == 0

    def add(self, tok: int) -> None:
        self.ids.append(tok)
        if tok in self.stop_ids or len(self.ids) >= self.budget:
            self.done = True
        if self.stops:
            text = self.pipe.tokenizer.detokenize(self.prompt + self._kept())
            cont = text[_continuation_start(text, self.prompt_text) :]
            found = [i for i in (cont.find(s) for s in self.stops) if i >= 0]
            if found:
                self.cut, self.done = min(found), True

    def _kept(self) -> list[int]:
        ids = self.ids[: self.budget]
        for i, t in enumerate(ids):
            if t in self.stop_ids:
                return ids[:i]  # the stop token ends the text and is not part of it
        return ids

    def text(self) -> str:
        text = self.pipe.tokenizer.detokenize(self.prompt + self._kept())
        if self.cut is not None:
            text = text[: _continuation_start(text, self.prompt_text) + self.cut]
        return text


def _continuation_start(text: str, prompt_text: str) -> int:
    # The decoded prompt is a prefix of the decoded whole except where decoding glues the two
    # (BERT spaces, a <sep> cut): then stop strings are searched in the whole text.
    return len(prompt_text) if text.startswith(prompt_text) else 0


def _safe_length(cont: str, stops: tuple[str, ...]) -> int:
    """Length of `cont` minus a tail that could be the start of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(cont)), hold, -1):
            if cont.endswith(s[:k]):
                hold = k
                break
    return len(cont) - hold


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(stops)


def _prompt_text(item, i: int = 0) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in INPUT_KEYS:
            if key in item:
                if not isinstance(item[key], str):
                    raise ValueError(f"input {i}: {key!r} must be a string, got {type(item[key]).__name__}")
                return item[key]
        raise ValueError(f"input {i}: a dict input needs one of the keys {', '.join(INPUT_KEYS)}; got {sorted(item)}")
    raise ValueError(f"input {i} must be a str or a dict with {' / '.join(INPUT_KEYS)}, got {type(item).__name__}")


__all__ = ["INPUT_KEYS", "TASKS", "TextGenerationPipeline", "pipeline"]
