"""Autoregressive generation: a typed GenerationConfig, prefill + one-token decode steps over a static
KV cache, sampling, and the `generate` / `stream` entry points.

Shape letters: B batch, P longest prompt, S cache slots (P + new tokens), H d_model, V vocab.

Ragged prompts are LEFT-padded so that every row writes the same cache slot at each step: the slot
index is one shared (T,) tensor (`index_copy_`, cheaper than a per-row scatter), and row b's
positions are `slot - pad_b`, so each row sees exactly what it would see alone. A bool mask hides
the pad slots; a pad query attends to itself only, so no mask row is empty (an all-False row makes
SDPA return NaN).

The decode step does no host sync (no `.item()`, no shape that depends on data): finished rows keep
decoding into static buffers and are trimmed at the end, and `generate` checks for "all rows done"
every few steps only on accelerators, so the step can later be captured by torch.compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import fast
from .model import GPT

# How often `generate` asks the device whether every row has stopped. On CPU the check is free, on
# an accelerator each check is a host sync, so it is amortised over a few steps.
_ACCEL_CHECK_EVERY = 16


@dataclass(frozen=True)
class GenerationConfig:
    """Runtime generation options, validated once. The CLI derives its flags from these fields."""

    max_new_tokens: int = field(default=100, metadata={"help": "tokens to generate after the prompt (>= 0)"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy argmax"})
    temperature: float = field(
        default=1.0, metadata={"help": "divide logits by this before sampling (> 0; 0 means greedy)"}
    )
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = off)"})
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus sampling mass in (0, 1]; the token crossing p is kept"}
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "> 0; divides positive / multiplies negative logits of seen tokens"}
    )
    eos_token_id: int | tuple[int, ...] | None = field(
        default=None, metadata={"help": "stop a row at this token id (or ids); none = run to max_new_tokens"}
    )
    seed: int | None = field(default=None, metadata={"help": "seed a private RNG so sampling repeats"})
    # The fast path (gpt3zh.fast): same tokens as eager in fp32 with compile; int8 / bf16 change numerics.
    compile: bool = field(default=False, metadata={"help": "torch.compile the one-token decode step"})
    quantize: str | None = field(
        default=None, metadata={"help": "'int8': decode with weight-only int8 weights (a cached quantized copy)"}
    )
    dtype: str | None = field(
        default=None, metadata={"help": "float32 | bfloat16 | float16: decode in this dtype (none = the model's)"}
    )

    def __post_init__(self) -> None:
        _require_int("max_new_tokens", self.max_new_tokens, 0, "an int >= 0")
        _require_int("top_k", self.top_k, 0, "an int >= 0 (0 = off)")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        _require_float("temperature", self.temperature, lambda t: t >= 0, ">= 0 (0 means greedy)")
        _require_float("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        _require_float("repetition_penalty", self.repetition_penalty, lambda r: r > 0, "> 0 (1 = off)")
        if self.seed is not None:
            _require_int("seed", self.seed, 0, "None or an int >= 0")
        object.__setattr__(self, "eos_token_id", _normalise_eos(self.eos_token_id))
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if self.quantize not in (None, *fast.QUANTIZE):
            raise ValueError(f"quantize must be None or one of {fast.QUANTIZE}, got {self.quantize!r}")
        fast.as_dtype(self.dtype)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def stop_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else eos

    def replace(self, **changes: Any) -> GenerationConfig:
        _check_option_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        _check_option_names(data)
        return cls(**data)


def _require_int(name: str, value: Any, minimum: int, expected: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _require_float(name: str, value: Any, ok, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _normalise_eos(eos: Any) -> int | tuple[int, ...] | None:
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise ValueError(f"eos_token_id must be None, a token id >= 0 or a list of them, got {eos!r}")
    if isinstance(eos, int):
        return eos
    return tuple(ids) if ids else None


def _check_option_names(options: dict[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(GenerationConfig)]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown generation option {key!r}{hint} (options: {', '.join(names)})")


def resolve_config(config: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
    """`config` (default GenerationConfig()) with `options` overriding its fields."""
    config = config or GenerationConfig()
    return config.replace(**options) if options else config


# ------------------------------------------------------------------------------------------ prompts
def as_rows(prompts: Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> list[list[int]]:
    """Prompts as a list of token-id lists; each non-empty and inside the vocabulary."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompts tensor must be an integer (B, T) tensor, got {prompts.dtype} {tuple(prompts.shape)}")
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
            stacklevel=3,
        )
        cfg = dataclasses.replace(cfg, max_new_tokens=room)
    return cfg


# ------------------------------------------------------------------------------------------ sampling
def sample(
    logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None, rng: torch.Generator | None
) -> torch.Tensor:
    """Next token (B,) from logits (B, V), in the order penalty -> temperature -> top-k -> top-p."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        # HF / CTRL convention: a seen token's positive logit is divided, a negative one multiplied.
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.greedy:
        return logits.argmax(-1)
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th are kept
    if cfg.top_p < 1.0:
        logits = _top_p(logits, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    # argmax(p / E) with E ~ Exp(1) is an exact draw from p (the exponential race); unlike
    # torch.multinomial it never syncs with the host, so the step stays capturable.
    race = torch.empty_like(probs).exponential_(1.0, generator=rng)
    return (probs / race).argmax(-1)


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the mass strictly before it already exceeds p: the token that crosses p is
    # kept and the most likely token always survives (ModelScope's shifted mask, spec §7.3).
    drop = (probs.cumsum(-1) - probs) > p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


# ------------------------------------------------------------------------------------------ decoding
def _last_logits(model: GPT, idx, positions, cache_pos, mask) -> torch.Tensor:
    h = model.hidden(idx, positions, cache_pos, mask)[:, -1]  # (B, H): only the last slot is sampled
    return model.head(h)  # (B, V)


def _left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    idx = torch.tensor([[0] * (longest - len(r)) + r for r in rows], device=device)  # (B, P)
    pad = torch.tensor([longest - len(r) for r in rows], device=device)  # (B,)
    return idx, pad


def _prefill_inputs(pad: torch.Tensor, P: int, S: int):
    """Positions (B, P) and mask (B, 1, P, S) for the left-padded prompt at slots 0..P-1."""
    slots = torch.arange(S, device=pad.device)  # (S,)
    q = torch.arange(P, device=pad.device)[:, None]  # (P, 1)
    pad = pad[:, None, None]  # (B, 1, 1)
    mask = ((slots >= pad) & (slots <= q)) | (slots == q)  # (B, P, S): pad queries see only themselves
    positions = (q.squeeze(1) - pad[:, 0]).clamp(min=0)  # (B, P)
    return positions, mask[:, None]


class _DecodeBuffers:
    """Static per-step inputs, rewritten in place so a step allocates nothing shape-dependent.

    The mask goes to attention as an additive float mask (0 attend, -inf hide), made once per step:
    SDPA would otherwise convert a bool mask to that in every layer. With `masked=False` (no row is
    padded and the step function attends to the filled slots by itself, fast.LeanStep) there is no
    mask: `mask` is None.
    """

    def __init__(self, pad: torch.Tensor, S: int, dtype: torch.dtype, masked: bool = True) -> None:
        B, dev = pad.shape[0], pad.device
        self.pad = pad[:, None]  # (B, 1)
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=dev)  # (1,) the slot being written
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)  # (B, 1)
        self.mask = None
        if masked:
            self.slots = torch.arange(S, device=dev)  # (S,)
            self.after_pad = (self.slots >= pad[:, None])[:, None, None, :]  # (B, 1, 1, S)
            self.visible = torch.zeros(S, dtype=torch.bool, device=dev)  # (S,)
            self.attend = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=dev)  # (B, 1, 1, S)
            self.mask = torch.zeros(B, 1, 1, S, dtype=dtype, device=dev)  # (B, 1, 1, S) additive
            self._zero = torch.zeros((), dtype=dtype, device=dev)
            self._hide = torch.full((), float("-inf"), dtype=dtype, device=dev)

    def set_slot(self, slot: torch.Tensor) -> None:
        self.cache_pos.copy_(slot)
        torch.sub(self.cache_pos, self.pad, out=self.positions)
        if self.mask is not None:
            torch.le(self.slots, self.cache_pos, out=self.visible)
            torch.logical_and(self.after_pad, self.visible, out=self.attend)
            torch.where(self.attend, self._zero, self._hide, out=self.mask)


def decode_steps(
    model: GPT, rows: list[list[int]], cfg: GenerationConfig, cache_len: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next tokens (B,), the logits (B, V) they were drawn from) for cfg.max_new_tokens steps.

    `rows` must already be validated (as_rows) and fit the context (fit_context). Tokens stay on the
    model's device; nothing here syncs with the host. The model's KV cache is set up for the call
    and cleared afterwards, and the model is in eval mode meanwhile.

    cache_len: KV slots to allocate (default: just enough, longest prompt + max_new_tokens - 1).
    Every step attends over all slots (masked), so on CPU a cache sized to the request is much
    cheaper than one sized to the full context (docs/benchmarks.md).
    """
    steps = cfg.max_new_tokens
    if steps == 0:
        return
    model = fast.decode_model(fast.prepared(model, cfg.quantize, cfg.dtype))
    device = model.tok_emb.weight.device
    idx, pad = _left_pad(rows, device)  # (B, P), (B,)
    B, P = idx.shape
    need = P + steps - 1  # the last sampled token is never fed back, so it needs no slot
    if cache_len is not None and not need <= cache_len <= model.config.max_seq_len:
        raise ValueError(f"cache_len={cache_len} must be in [{need}, {model.config.max_seq_len}] for this request")
    S = cache_len or (fast.bucketed_cache_len(need, model.config.max_seq_len) if cfg.compile else need)
    was_training = model.training
    model.eval()
    model.setup_kv_cache(B, S)
    try:
        yield from _decode_loop(model, idx, pad, S, cfg)
    finally:
        model.clear_kv_cache()
        model.train(was_training)


# As a decorator on a generator, inference mode is entered around each resume only, so the caller's
# code between steps runs in its own grad mode.
@torch.inference_mode()
def _decode_loop(model: GPT, idx: torch.Tensor, pad: torch.Tensor, S: int, cfg: GenerationConfig):
    P = idx.shape[1]
    device = idx.device
    rng = None
    if cfg.seed is not None and not cfg.greedy:
        rng = torch.Generator(device=device).manual_seed(cfg.seed)
    seen = _seen_tokens(idx, pad, model.config.vocab_size) if cfg.repetition_penalty != 1.0 else None
    positions, mask = _prefill_inputs(pad, P, S)
    logits = _last_logits(model, idx, positions, torch.arange(P, device=device), mask)  # (B, V)
    lean = None if cfg.compile else fast.decode_step(model)
    step_logits = fast.compiled(_last_logits) if cfg.compile else (lean or _last_logits)
    # Without padding (every batch of one) the lean step needs no mask: it attends to the filled slots.
    bufs = _DecodeBuffers(pad, S, model.tok_emb.weight.dtype, masked=lean is None or bool(pad.any()))
    slot = torch.full((1,), P, dtype=torch.long, device=device)
    for step in range(cfg.max_new_tokens):
        tok = sample(logits, cfg, seen, rng)  # (B,)
        yield tok, logits
        if step == cfg.max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        bufs.set_slot(slot)
        logits = step_logits(model, tok[:, None], bufs.positions, bufs.cache_pos, bufs.mask)
        slot += 1


def _seen_tokens(idx: torch.Tensor, pad: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which ids occur in each row's prompt (pad slots excluded)."""
    B, P = idx.shape
    is_pad = torch.arange(P, device=idx.device) < pad[:, None]  # (B, P)
    # Pads are routed to an extra column V that is then dropped, so they mark nothing.
    seen = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=idx.device)
    seen.scatter_(1, idx.masked_fill(is_pad, vocab_size), True)
    return seen[:, :vocab_size]


# ------------------------------------------------------------------------------------------ entry points
def prepare(model: GPT, prompts, config: GenerationConfig | None, options: dict[str, Any]):
    """Validated rows and config (max_new_tokens clamped to the context)."""
    cfg = resolve_config(config, **options)
    rows = as_rows(prompts, model.config.vocab_size)
    bad = [i for i in cfg.stop_ids if i >= model.config.vocab_size]
    if bad:
        raise ValueError(f"eos_token_id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
    return rows, fit_context(cfg, rows, model.config.max_seq_len)


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    **options: Any,
) -> list[list[int]]:
    """Each prompt followed by its continuation, as token-id lists.

    `options` are GenerationConfig fields (max_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, eos_token_id, seed; the fast path: compile, quantize, dtype, see
    gpt3zh.fast) and override `config`. A row ends with its first stop id (included) or after
    max_new_tokens; every row equals what generating it alone gives.
    """
    rows, cfg = prepare(model, prompts, config, options)
    stop = torch.tensor(cfg.stop_ids, device=model.tok_emb.weight.device) if cfg.stop_ids else None
    check_every = 1 if model.tok_emb.weight.device.type == "cpu" else _ACCEL_CHECK_EVERY
    done = torch.zeros(len(rows), dtype=torch.bool, device=model.tok_emb.weight.device)
    new = []
    with contextlib.closing(decode_steps(model, rows, cfg)) as steps:
        for step, (tok, _) in enumerate(steps):
            new.append(tok)
            if stop is not None:
                done |= torch.isin(tok, stop)
                if (step + 1) % check_every == 0 and bool(done.all()):
                    break
    cont = torch.stack(new, 1).tolist() if new else [[] for _ in rows]  # (B, steps)
    return [row + _cut_after_stop(c, cfg.stop_ids) for row, c in zip(rows, cont)]


def _cut_after_stop(ids: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1]
    return ids


def stream(
    model: GPT,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    **options: Any,
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token id (None once the row has stopped).

    The concatenated ids of a row equal its continuation from `generate` with the same options
    (the stop id included). Stops once every row has stopped; closing the iterator early frees
    the KV cache.
    """
    rows, cfg = prepare(model, prompts, config, options)
    finished = [False] * len(rows)
    with contextlib.closing(decode_steps(model, rows, cfg)) as steps:
        for tok, _ in steps:
            ids = tok.tolist()
            out = [None if f else t for f, t in zip(finished, ids)]
            finished = [f or t in cfg.stop_ids for f, t in zip(finished, ids)]
            yield out
            if all(finished):
                return
