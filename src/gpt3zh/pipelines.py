"""`pipeline("text-generation", model=...)`: text in, `{"text": prompt + continuation}` out.

What ModelScope's TextGenerationPipeline does, and so this does:
- inputs: a str, a dict with `src_txt` (Megatron models), `sentence` (single-process models) or
  `text`, or a list of them (`batch_size=` rows at a time); one output per input;
- defaults: the model directory's config.json through `GenerationConfig.from_defaults` (the one
  mapping the CLI and the server use too): sampling with its top_k / top_p / temperature,
  `tokens_to_generate` new tokens, stopping at eod_id, extra stop ids and the tokenizer's <sep>;
- `max_length` is the TOTAL length, prompt included (capped at the context).
The continuation comes from the one engine and detokenizer (gpt3zh.engine): it ends before the
first stop id or stop string, and never splits a character. The returned text is the prompt as
the caller typed it followed by the continuation (transformers' `return_full_text=True`; pass
`return_full_text=False` for the continuation alone). ModelScope itself returns
`tokenizer.detokenize(prompt ids + continuation ids)`, which re-decodes the prompt (BERT
lower-cases it, JiebaBPE normalises punctuation); `gpt3zh.compat.modelscope` keeps that.

Additions: every GenerationConfig option, `num_return_sequences`, `return_full_text`, and
`stream()`, which yields the new text piece by piece (joined: the continuation).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from . import generation
from .config import GenerationConfig, GenerationDefaults
from .engine import FinishEvent, Request, TokenEvent, rows_config
from .inference import InferenceModel, InferenceOptions, prepare
from .model import GPT
from .tokenizer import Tokenizer, load_tokenizer

TASKS = ("text-generation",)
INPUT_KEYS = ("src_txt", "sentence", "text")  # ModelScope's Megatron, single-process, and plain names
PIPELINE_OPTIONS = ("max_length", "num_return_sequences", "return_full_text")


def pipeline(
    task: str = "text-generation",
    model: str | os.PathLike | GPT | None = None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    defaults: GenerationDefaults | None = None,
    quantize: str | None = None,
    compile: bool = False,
    cpu_kernels: bool | None = None,
    pack_weights: bool | None = None,
) -> TextGenerationPipeline:
    """A text-generation pipeline over a model directory (or a GPT and its tokenizer).

    model=None uses the embedded default model (gpt3zh.assets.default_model_path()). A GPT object
    needs `tokenizer=` (a Tokenizer or a path) and takes its generation `defaults=` (default:
    GenerationDefaults()); a directory brings its own tokenizer and defaults unless given.
    device/dtype: where and in what dtype a directory is loaded (a GPT object is not moved; a dtype
    for it is an inference transform, a cast copy). quantize / compile / cpu_kernels / pack_weights:
    see gpt3zh.prepare.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; gpt3zh pipelines do: {', '.join(TASKS)}")
    if model is None:
        from .assets import default_model_path

        model = default_model_path()
    inference = {"quantize": quantize, "compile": compile, "cpu_kernels": cpu_kernels, "pack_weights": pack_weights}
    if isinstance(model, GPT):
        if tokenizer is None:
            raise ValueError("pipeline(model=<GPT object>) needs tokenizer= (a Tokenizer or a tokenizer path)")
        if device is not None and torch.device(device) != model.tok_emb.weight.device:
            raise ValueError(f"pipeline(model=<GPT object>, device={device!r}): move the model yourself "
                             f"(model.to({str(device)!r})); the pipeline does not move a caller's model")
        inference["dtype"] = None if dtype is None else str(dtype).removeprefix("torch.")
    elif isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_pretrained

        loaded = load_pretrained(model, device=device or "cpu", dtype=dtype)
        model, defaults = loaded.model, defaults or loaded.generation
        tokenizer = loaded.path if tokenizer is None else tokenizer
    else:
        raise TypeError(f"model must be a model directory path, a gpt3zh GPT, or None; got {type(model).__name__}")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    return TextGenerationPipeline(model, tokenizer, defaults, InferenceOptions(**inference))


class TextGenerationPipeline:
    """Call with a prompt (or a list of prompts) and generation options; see `pipeline`."""

    def __init__(self, model: GPT | InferenceModel, tokenizer: Tokenizer,
                 defaults: GenerationDefaults | None = None, inference: InferenceOptions | None = None) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{model.config.vocab_size}: they do not belong together"
            )
        self.prepared = prepare(model, inference)
        self.model = model
        self.tokenizer = tokenizer
        self.defaults = defaults or GenerationDefaults()

    def __repr__(self) -> str:
        return f"TextGenerationPipeline({self.prepared.description}, tokenizer={self.tokenizer.kind})"

    # ---------------------------------------------------------------------------------- options
    def default_config(self) -> GenerationConfig:
        """The model directory's defaults (see GenerationConfig.from_defaults)."""
        return GenerationConfig.from_defaults(self.defaults, self.model.config.vocab_size, self.tokenizer.sep_id)

    def _options(self, options: dict[str, Any]) -> tuple[GenerationConfig, int | None, int, bool]:
        options = dict(options)
        max_length = options.pop("max_length", None)
        n = options.pop("num_return_sequences", 1)
        full_text = options.pop("return_full_text", True)
        if max_length is not None:
            if "max_new_tokens" in options:
                raise ValueError("give max_length (total tokens, prompt included) or max_new_tokens, not both")
            if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
                raise ValueError(f"max_length must be an int >= 1 (total tokens, prompt included), got {max_length!r}")
            max_length = min(max_length, self.model.config.max_seq_len)  # ModelScope caps it silently
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_return_sequences must be an int >= 1, got {n!r}")
        if not isinstance(full_text, bool):
            raise ValueError(f"return_full_text must be True or False, got {full_text!r}")
        try:
            config = self.default_config().replace(**options)
        except ValueError as err:
            raise ValueError(f"{err} (pipeline options also take: {', '.join(PIPELINE_OPTIONS)})") from None
        return config, max_length, n, full_text

    def _requests(self, texts: list[str], config: GenerationConfig, max_length: int | None, n: int,
                  first: int = 0) -> list[Request]:
        """n requests per prompt; sequence k of the call (counted from `first`) samples with seed + k."""
        configs = rows_config(config, first + len(texts) * n)[first:]
        out = []
        for i, text in enumerate(texts):
            ids = self._encode(text, i)
            cfg = configs[i * n]
            if max_length is not None:
                if len(ids) >= max_length:
                    raise ValueError(f"prompt {i} is {len(ids)} tokens, which leaves nothing to generate within "
                                     f"max_length={max_length} (the total length, prompt included)")
                cfg = cfg.replace(max_new_tokens=max_length - len(ids))
            cfg = generation.fit_context(cfg, [ids], self.model.config.max_seq_len)
            out += [Request(ids, cfg.replace(seed=configs[i * n + j].seed), tag=text, index=i * n + j)
                    for j in range(n)]
        return out

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
        """{"text": ...} for one input, a list of them for a list of inputs (with
        num_return_sequences=n > 1: a list of n dicts per input)."""
        single = not isinstance(inputs, (list, tuple))
        texts = [_prompt_text(inputs)] if single else [_prompt_text(x, i) for i, x in enumerate(inputs)]
        if not texts:
            raise ValueError("inputs is an empty list: give a prompt or a list of prompts")
        size = len(texts) if batch_size is None else batch_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        config, max_length, n, full_text = self._options(options)
        out: list = []
        for start in range(0, len(texts), size):
            chunk = texts[start : start + size]
            requests = self._requests(chunk, config, max_length, n, first=start * n)
            conts = self._continuations(requests)
            for i, text in enumerate(chunk):
                group = [{"text": (text if full_text else "") + c} for c in conts[i * n : (i + 1) * n]]
                out.append(group[0] if n == 1 else group)
        return out[0] if single else out

    def stream(self, inputs, **options: Any) -> Iterator[str]:
        """Yield the new text of one prompt piece by piece; joined, the pieces are the continuation
        (`self(inputs, **same)["text"]` without the prompt). No piece ends inside a character.
        Bad options or a prompt that does not fit raise here, before the first piece."""
        if isinstance(inputs, (list, tuple)):
            raise TypeError("stream() takes one prompt (a str or a dict); call the pipeline for a list")
        config, max_length, n, _ = self._options(options)
        if n != 1:
            raise ValueError("stream() yields one sequence: num_return_sequences must be 1")
        return self._pieces(self._requests([_prompt_text(inputs)], config, max_length, 1))

    def _pieces(self, requests: list[Request]) -> Iterator[str]:
        with contextlib.closing(generation.run(self.prepared, requests, self.tokenizer)) as steps:
            for events in steps:
                for ev in events:
                    if isinstance(ev, (TokenEvent, FinishEvent)) and ev.text:
                        yield ev.text

    def _continuations(self, requests: list[Request]) -> list[str]:
        texts = [""] * len(requests)
        with contextlib.closing(generation.run(self.prepared, requests, self.tokenizer)) as steps:
            for events in steps:
                for ev in events:
                    if isinstance(ev, (TokenEvent, FinishEvent)):
                        texts[ev.request.index - requests[0].index] += ev.text
        return texts


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
