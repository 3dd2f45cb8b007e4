"""The one sampler: next tokens for a batch of rows, each with its own options and generator.

Order, per row: repetition penalty -> temperature -> top-k -> top-p -> an exact draw (the
exponential race). What the options mean (the same in the Python API, the CLI, the pipeline and
the server; docs/generation.md):
- greedy (argmax) when do_sample is False, temperature == 0, top_k == 1 or top_p == 0 (the last
  three as OpenAI and transformers take them: the smallest possible candidate set);
- top_k == 0 or top_k >= vocab: no top-k filter; top_p == 1: no nucleus filter;
- the token whose probability crosses top_p is kept (ModelScope's shifted mask), so the most likely
  token always survives; tokens tied with the k-th are kept;
- repetition_penalty (HF / CTRL): a seen token's positive logit is divided by it, a negative one
  multiplied; 1 = off.
The draw argmax(p / E), E ~ Exp(1) per token from the row's own generator, is an exact sample of p
that never syncs with the host; a seeded row therefore gives the same tokens alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

_K_LIMIT = 1 << 62  # any top_k beyond the vocabulary is "off"; this keeps it inside an int64


class SamplingOptions(Protocol):
    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float


@dataclass
class SamplingParams:
    """Per-row options as (b,) tensors, plus which steps any row needs (decided on the host)."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # float32, 1 on greedy rows
    top_k: torch.Tensor  # long, 0 = off
    top_p: torch.Tensor  # float32, 1 = off
    penalty: torch.Tensor  # float32, 1 = off
    all_greedy: bool
    max_top_k: int  # 0 = no row filters by top-k
    any_top_p: bool
    any_penalty: bool

    @classmethod
    def of(cls, options: Sequence[SamplingOptions], device) -> SamplingParams:
        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [o.greedy for o in options]
        return cls(
            greedy=t(greedy, torch.bool),
            # A temperature below float32's range would divide by 0; 1e-30 already leaves only the maximum.
            temperature=t([1.0 if g else max(o.temperature, 1e-30) for g, o in zip(greedy, options)], torch.float32),
            top_k=t([0 if g else min(o.top_k, _K_LIMIT) for g, o in zip(greedy, options)], torch.long),
            top_p=t([1.0 if g else o.top_p for g, o in zip(greedy, options)], torch.float32),
            penalty=t([o.repetition_penalty for o in options], torch.float32),
            all_greedy=all(greedy),
            max_top_k=max(0 if g else min(o.top_k, _K_LIMIT) for g, o in zip(greedy, options)),
            any_top_p=any(not g and o.top_p < 1.0 for g, o in zip(greedy, options)),
            any_penalty=any(o.repetition_penalty != 1.0 for o in options),
        )


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None,
    rngs: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token (b,) from logits (b, V); `seen` (b, V) bool marks each row's tokens so far (prompt
    included) for the repetition penalty; rngs[r] draws row r (None: the global generator)."""
    logits = logits.float()
    if params.any_penalty and seen is not None:
        pen = params.penalty[:, None]  # (b, 1); dividing/multiplying by 1.0 is exact: other rows untouched
        logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
    greedy_tok = logits.argmax(-1)  # (b,)
    if params.all_greedy:
        return greedy_tok
    # Shift each row's maximum to 0 before dividing: a tiny temperature then sends every other
    # logit to -inf instead of overflowing the maximum to inf (inf - inf = NaN in the softmax).
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature[:, None]
    if params.max_top_k:
        logits = _top_k(logits, params.top_k, params.max_top_k)
    if params.any_top_p:
        logits = _top_p(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)  # (b, V)
    race = torch.ones_like(probs)
    for r, rng in enumerate(rngs):
        if not params.greedy[r]:
            race[r].exponential_(1.0, generator=rng)  # one (V,) draw per row: the same alone or batched
    return torch.where(params.greedy, greedy_tok, (probs / race).argmax(-1))


def _top_k(logits: torch.Tensor, top_k: torch.Tensor, kmax: int) -> torch.Tensor:
    V = logits.shape[-1]
    k = torch.where(top_k >= V, 0, top_k)  # (b,); 0 or >= V: off
    kmax = min(kmax, V)
    kth = torch.topk(logits, kmax, dim=-1).values.gather(1, (k.clamp(min=1) - 1)[:, None])  # (b, 1)
    kth = torch.where((k > 0)[:, None], kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th are kept


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (b, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the mass strictly before it already exceeds p: the token that crosses p is
    # kept and the most likely token always survives (ModelScope's shifted mask). Rows with p == 1
    # skip the filter entirely, so float round-off in the cumsum cannot drop their tail.
    drop = ((probs.cumsum(-1) - probs) > top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
