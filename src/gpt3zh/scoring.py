"""Scoring text with a model: per-token log-probabilities and the log-likelihood of continuations.

- `score(model, prompts, tokenizer=..., top_logprobs=k)`: for each prompt (token ids, or text with
  a tokenizer) the log-probability of every token given the ones before it (None for the first),
  and the k most likely alternatives at each position;
- `loglikelihood(model, tokenizer, pairs)`: for (context, continuation) pairs, log p(continuation |
  context) summed over the continuation's tokens, and whether greedy decoding would produce it,
  the two numbers lm-evaluation-harness asks a model for (its `loglikelihood` requests). The pair is
  tokenized as lm-eval does for a causal model (`_encode_pair`), so gpt3zh and lm-eval talking to
  `gpt3zh serve` compute the same numbers: context ids = encode(context), continuation ids =
  encode(context + continuation)[len(context ids):], trailing spaces of the context moved to the
  continuation.

Both run on the one engine (gpt3zh.engine) as score-only requests (`max_new_tokens=0` with
`prompt_logprobs`): one prefill per prompt, batched, nothing sampled; the server's `echo` +
`logprobs` answers come from the same requests. The log-probabilities are those of the model's
raw distribution (log_softmax of its logits, in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import GenerationConfig
from .engine import Engine, ErrorEvent, PromptEvent, Request
from .generation import ModelLike, as_rows

SCORE_ONLY = GenerationConfig(max_new_tokens=0)


@dataclass(frozen=True)
class Scored:
    """One prompt's tokens and, per token, log p(token | tokens before it) and the top alternatives."""

    tokens: list[int]
    logprobs: list[float | None]  # None for the first token: nothing predicts it
    top_logprobs: list[list[tuple[int, float]]]  # [(id, log p), ...] most likely first; [] for the first

    @property
    def total(self) -> float:
        return sum(lp for lp in self.logprobs if lp is not None)


def score(model: ModelLike, prompts: Sequence[Sequence[int] | str], *, tokenizer=None, top_logprobs: int = 0,
          batch_size: int = 16) -> list[Scored]:
    """Per-token log-probabilities of each prompt (see the module docstring).

    prompts: token-id lists, or strings (encoded with `tokenizer`). Each must fit the model's
    context. batch_size: prompts prefilled together at most.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = as_rows([_ids(p, tokenizer, i) for i, p in enumerate(prompts)] if prompts else prompts,
                   model.config.vocab_size)
    context = model.config.max_seq_len
    long = next((i for i, r in enumerate(rows) if len(r) > context), None)
    if long is not None:
        raise ValueError(f"prompt {long} has {len(rows[long])} tokens; the model's context is {context}")
    requests = [Request(r, SCORE_ONLY, index=i, prompt_logprobs=top_logprobs) for i, r in enumerate(rows)]
    out: list[Scored | None] = [None] * len(rows)
    longest = max(len(r) for r in rows)
    with Engine(model, None, max_batch=min(batch_size, len(rows)), max_len=longest,
                prefill_tokens=max(longest, 4096)) as engine:
        engine.add(requests)
        while engine.has_work:
            for ev in engine.step():
                if isinstance(ev, ErrorEvent):
                    raise RuntimeError(ev.message)
                if isinstance(ev, PromptEvent):
                    i = ev.request.index
                    out[i] = Scored(rows[i], ev.logprobs, ev.top_logprobs)
    return out  # type: ignore[return-value]


def _ids(prompt, tokenizer, i: int) -> list[int]:
    if not isinstance(prompt, str):
        return prompt
    if tokenizer is None:
        raise ValueError(f"prompt {i} is text: give score() a tokenizer (or token ids)")
    return tokenizer.encode(prompt)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits a pair for a causal model."""
    if not context:
        raise ValueError("the context must not be empty (nothing would predict the continuation's first token)")
    spaces = len(context) - len(context.rstrip())
    if spaces:  # lm-eval moves them: "A: " + "x" is scored as "A:" + " x"
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@dataclass(frozen=True)
class Likelihood:
    logprob: float  # sum of log p over the continuation's tokens
    is_greedy: bool  # every continuation token is the most likely one at its position
    tokens: int  # continuation tokens scored
    truncated: bool  # the context was cut on the left to fit the model's context


def loglikelihood(model: ModelLike, tokenizer, pairs: Sequence[tuple[str, str]],
                  batch_size: int = 16) -> list[Likelihood]:
    """log p(continuation | context) for each (context, continuation) pair (see the module docstring).

    A pair longer than the model's context keeps its last max_seq_len tokens (the context is cut
    on the left, as lm-eval does); a continuation that alone fills the context is an error."""
    context = model.config.max_seq_len
    inputs, spans = [], []
    for i, (ctx_text, cont_text) in enumerate(pairs):
        ctx, cont = encode_pair(tokenizer, ctx_text, cont_text)
        if not cont:
            raise ValueError(f"pair {i}: the continuation {cont_text!r} encodes to no tokens")
        if len(cont) >= context:
            raise ValueError(f"pair {i}: the continuation has {len(cont)} tokens; the model's context is {context}")
        ids = (ctx + cont)[-context:]
        inputs.append(ids)
        spans.append((len(ids) - len(cont), len(ctx) + len(cont) > context))
    scored = score(model, inputs, top_logprobs=1, batch_size=batch_size)
    out = []
    for s, (start, truncated) in zip(scored, spans):
        lps = s.logprobs[start:]
        greedy = all(lp >= top[0][1] for lp, top in zip(lps, s.top_logprobs[start:]))
        out.append(Likelihood(sum(lps), greedy, len(lps), truncated))
    return out


__all__ = ["Likelihood", "Scored", "encode_pair", "loglikelihood", "score"]
