"""A continuous-batching engine: one background thread runs the model over a static KV cache.

Shape letters: B engine rows (slots), b rows in use this step (a prefix of B), T prompt length,
S cache slots, V vocab.

Each row of the cache is one request. Rows keep their own position: the decode step feeds every
row its last token at its own slot (`cache_pos` (b, 1)), which the model supports natively. New
requests join at a step boundary: all those waiting (up to a token budget) are prefilled together,
right-padded, into a scratch cache whose keys/values are then copied into their free rows; each
samples its first token and then decodes with the others. A finished or cancelled row simply stops
being fed; its slots are overwritten by the next prefill, and the causal mask never lets a row see
slots past its own position, so stale keys (and the right-padding's keys) are harmless.

Only a prefix of rows (0 .. highest row in use) and of slots (rounded up to a bucket) goes through
the model each step: one request alone costs a batch-1 step, not a B-row step, so serving one at
a time is not penalised by the batch size it could have had.

The asyncio side talks to the engine through thread-safe hand-offs only: `submit` appends to a
bounded pending list under a lock, events come back through `loop.call_soon_threadsafe` into an
asyncio.Queue, and cancellation is a flag the engine reads at each step boundary. A step's events
for all rows go over in one hand-off, so the event loop wakes once per step, not once per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import fast
from ..generation import GenerationConfig
from ..model import GPT, KVCache

log = logging.getLogger("gpt3zh.serve")

_SLOT_BUCKET = 16  # the attended slot range grows in steps of this: few distinct shapes, little masked waste
_PREFILL_TOKENS = 4096  # at most this many (padded) prompt tokens are prefilled in one forward


class QueueFull(RuntimeError):
    """The pending queue is at its bound; the caller should retry later."""


# ------------------------------------------------------------------------------------------ requests
@dataclass
class EngineRequest:
    """One sequence to generate. Validated by the caller (the HTTP layer) against the engine limits."""

    prompt: list[int]
    config: GenerationConfig  # max_new_tokens, sampling options, seed, eos_token_id (stop ids)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    index: int = 0  # the choice index this request answers, echoed in its events


@dataclass
class TokenEvent:
    index: int
    text: str  # the new text (may be "" while a multi-byte character or a stop string is pending)
    token_id: int


@dataclass
class FinishEvent:
    index: int
    reason: str  # "stop" (stop id or stop string) | "length" (max_new_tokens or context full)
    text: str  # text released at the end (held back while it could still start a stop string)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    index: int
    message: str


class Handle:
    """The asyncio side of one or more submitted requests: their events arrive on `events`."""

    _ids = itertools.count()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.id = next(self._ids)
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # written by the asyncio thread, read by the engine thread
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


def _deliver(events: list[tuple[Handle, object]]) -> None:  # runs on the event loop
    for handle, event in events:
        handle.events.put_nowait(event)


# ------------------------------------------------------------------------------------------ sampling
@dataclass
class _RowParams:
    """Per-row sampling options as tensors (b,), built from the rows' GenerationConfigs."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # float, 1 on greedy rows
    top_k: torch.Tensor  # long, 0 = off
    top_p: torch.Tensor  # float, 1 = off
    penalty: torch.Tensor  # float, 1 = off

    @classmethod
    def of(cls, configs: Sequence[GenerationConfig], device) -> _RowParams:
        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            greedy=t([c.greedy for c in configs], torch.bool),
            temperature=t([1.0 if c.greedy else c.temperature for c in configs], torch.float32),
            top_k=t([c.top_k for c in configs], torch.long),
            top_p=t([c.top_p for c in configs], torch.float32),
            penalty=t([c.repetition_penalty for c in configs], torch.float32),
        )


def sample_rows(
    logits: torch.Tensor,
    params: _RowParams,
    seen: torch.Tensor | None,
    rngs: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token (b,) from logits (b, V), each row with its own options and generator.

    gpt3zh.generation.sample takes one GenerationConfig per batch; a serving batch mixes requests,
    so this is the same recipe (penalty -> temperature -> top-k -> top-p -> exponential race) with
    the options as (b,) tensors. Row r gives exactly what `sample(logits[r:r+1], cfg_r, seen[r:r+1],
    rngs[r])` gives (tested), so a seeded request samples the same tokens batched or alone.
    """
    logits = logits.float()
    if seen is not None and bool((params.penalty != 1.0).any()):
        pen = params.penalty[:, None]  # (b, 1); dividing/multiplying by 1.0 is exact, so rows with 1 are untouched
        logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
    greedy_tok = logits.argmax(-1)  # (b,)
    if bool(params.greedy.all()):
        return greedy_tok
    logits = logits / params.temperature[:, None]
    if bool((params.top_k > 0).any()) or bool((params.top_p < 1.0).any()):
        logits = _filter_top_k_top_p(logits, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)  # (b, V)
    race = torch.ones_like(probs)
    for r, rng in enumerate(rngs):
        if not params.greedy[r]:
            race[r : r + 1].exponential_(1.0, generator=rng)  # one (1, V) draw, as sample() does alone
    return torch.where(params.greedy, greedy_tok, (probs / race).argmax(-1))


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values  # (b, V)
    kth = sorted_logits.gather(1, (top_k.clamp(1, V) - 1)[:, None])  # (b, 1)
    kth = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
    logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th are kept
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (b, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    # The token crossing p is kept (ModelScope's shifted mask); rows with p == 1 skip the filter
    # entirely, as sample() does, so float round-off in the cumsum cannot drop their tail.
    drop = ((probs.cumsum(-1) - probs) > top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


# ------------------------------------------------------------------------------------------ text
class _TextTracker:
    """Turns a row's token ids into text deltas and applies stop strings.

    Text is the decode of (last few prompt tokens + generated ids) minus the decode of the prompt
    tail, so tokenizers that join or space tokens by context give the same text as decoding
    everything; a trailing U+FFFD (an incomplete multi-byte character) is held back until it
    resolves. Text that could still be the start of a stop string is held back too.
    """

    _CONTEXT = 4

    def __init__(self, decode: Callable[[list[int]], str], prompt: list[int], stop: tuple[str, ...]) -> None:
        self.decode = decode
        self.prefix = prompt[-self._CONTEXT :]
        self.prefix_text = decode(self.prefix)
        self.ids: list[int] = []
        self.sent = 0  # characters of the generated text released so far
        self.stop = stop

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (releasable text, whether a stop string ended the text)."""
        self.ids.append(token_id)
        text = self._text()
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                out = self._release(text[:at])
                self.sent = len(text) + 1  # nothing after a stop string is ever released
                return out, True
        end = len(text.rstrip("\ufffd"))
        end -= self._partial_stop(text[:end])
        return self._release(text[:end]), False

    def flush(self) -> str:
        return self._release(self._text().rstrip("\ufffd"))

    def _text(self) -> str:
        full = self.decode(self.prefix + self.ids)
        return full[len(self.prefix_text) :] if full.startswith(self.prefix_text) else self.decode(self.ids)

    def _partial_stop(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, text: str) -> str:
        if len(text) <= self.sent:
            return ""
        out, self.sent = text[self.sent :], len(text)
        return out


# ------------------------------------------------------------------------------------------ rows
@dataclass
class _Row:
    handle: Handle
    req: EngineRequest
    rng: torch.Generator | None
    text: _TextTracker
    pos: int  # the slot the next fed token is written to (= tokens in this row's cache)
    last: int  # the last sampled token, fed at the next step
    generated: int = 0
    stop_ids: frozenset = field(default_factory=frozenset)


class _CacheView(KVCache):
    """A slice of an engine-wide KVCache: rows [r0:r1) and slots [:s]. Writes land in the shared buffer."""

    def __init__(self, full: KVCache, rows: slice, slots: int) -> None:
        nn.Module.__init__(self)
        self.k = full.k[rows, :, :slots]  # (b, N, s, D) views, not buffers
        self.v = full.v[rows, :, :slots]


@dataclass(frozen=True)
class EngineLimits:
    max_batch: int = 8  # rows decoded together (KV cache rows)
    max_queue: int = 64  # requests waiting for a row before submit() refuses
    max_len: int | None = None  # cache slots per row; None = the model's context

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            raise ValueError(f"max_len must be None or an int >= 2, got {self.max_len!r}")


class Engine:
    """Serve many generation requests at once from one model, in one background thread."""

    def __init__(
        self,
        model: GPT,
        decode: Callable[[list[int]], str],
        limits: EngineLimits = EngineLimits(),
        on_tokens: Callable[[int, int], None] | None = None,
    ) -> None:
        self.model = fast.decode_model(model.eval())  # on CPU: chunked GEMV layers (fast.py)
        self.decode = decode
        self.limits = limits
        self.max_len = min(limits.max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.on_tokens = on_tokens  # (prompt tokens prefilled, tokens generated) as they happen, for metrics
        self.device = model.tok_emb.weight.device
        self._pending: deque[tuple[Handle, EngineRequest]] = deque()
        self._lock = threading.Condition()
        self._rows: list[_Row | None] = [None] * limits.max_batch
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._seed_rng = torch.Generator().manual_seed(int(time.time_ns()) & 0x7FFFFFFF)
        self._outbox: list[tuple[Handle, object]] = []  # events of the current step, sent together
        self.steps = 0

    # ---------------------------------------------------------------- asyncio side
    def submit(self, requests: list[EngineRequest]) -> Handle:
        """Queue requests (one handle for all; events carry each request's index). Raises QueueFull."""
        handle = Handle(asyncio.get_running_loop())
        with self._lock:
            if any(h.cancelled for h, _ in self._pending):  # gone clients give their places back
                self._pending = deque(item for item in self._pending if not item[0].cancelled)
            if len(self._pending) + len(requests) > self.limits.max_queue:
                raise QueueFull(f"the queue holds {len(self._pending)} of {self.limits.max_queue} requests")
            self._pending.extend((handle, r) for r in requests)
            self._lock.notify()
        return handle

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    def start(self) -> None:
        if self._thread is not None:
            return
        self.model.setup_kv_cache(self.limits.max_batch, self.max_len)
        self._caches = [block.attn.kv_cache for block in self.model.blocks]
        V = self.model.config.vocab_size
        self._seen = torch.zeros(self.limits.max_batch, V, dtype=torch.bool, device=self.device)
        self._slot_ids = torch.arange(self.max_len, device=self.device)  # (S,)
        self._views: dict[tuple[int, int], list[_CacheView]] = {}
        self._params_cache: tuple = (None, None, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gpt3zh-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for block, cache in zip(self.model.blocks, getattr(self, "_caches", [])):
            block.attn.kv_cache = cache
        self.model.clear_kv_cache()

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stopping and not self._pending and self.running == 0:
                        self._lock.wait()
                    if self._stopping:
                        break
                try:
                    self._admit()
                    self._send()  # first tokens go out before the decode step
                    self._drop_cancelled()
                    if self.running:
                        self._decode_step()
                except Exception as err:  # a bug must not kill the thread: fail the rows in flight
                    log.exception("engine step failed")
                    self._fail_all(f"engine error: {err}")
                self._send()
        self._fail_all("the server is shutting down")
        self._send()

    def _emit(self, handle: Handle, event) -> None:
        self._outbox.append((handle, event))

    def _send(self) -> None:
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, event in self._outbox:
            by_loop.setdefault(handle.loop, []).append((handle, event))
        self._outbox = []
        for loop, events in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its clients are gone
                loop.call_soon_threadsafe(_deliver, events)

    def _admit(self) -> None:
        """Move waiting requests into free rows, within the prefill token budget, and prefill them."""
        batch: list[tuple[int, Handle, EngineRequest]] = []
        with self._lock:
            free = [i for i, r in enumerate(self._rows) if r is None]
            longest = 0
            while free and self._pending:
                handle, req = self._pending[0]
                longest_if = max(longest, len(req.prompt))
                if batch and longest_if * (len(batch) + 1) > _PREFILL_TOKENS:
                    break  # the rest join at the next step boundary
                self._pending.popleft()
                if handle.cancelled:
                    continue  # its client is gone: nobody listens for events
                if not 0 < len(req.prompt) < self.max_len:
                    self._emit(handle, ErrorEvent(req.index, f"a prompt of {len(req.prompt)} tokens does not "
                                                  f"fit the context of {self.max_len} tokens"))
                    continue
                batch.append((free.pop(0), handle, req))
                longest = longest_if
        if not batch:
            return
        try:
            self._prefill(batch)
        except Exception as err:
            log.exception("prefill failed")
            for r, handle, req in batch:
                self._rows[r] = None
                self._emit(handle, ErrorEvent(req.index, f"prefill failed: {err}"))

    def _prefill(self, batch: list[tuple[int, Handle, EngineRequest]]) -> None:
        n = len(batch)
        lens = [len(req.prompt) for _, _, req in batch]
        T = max(lens)
        idx = torch.tensor([req.prompt + [0] * (T - len(req.prompt)) for _, _, req in batch],
                           device=self.device)  # (n, T), right-padded: pads come after every real token
        pos = torch.arange(T, device=self.device)  # (T,)
        s = _bucket(T, self.max_len)
        mask = (torch.arange(s, device=self.device) <= pos[:, None])[None, None]  # (1, 1, T, s)
        scratch = [KVCache(n, s, c.k.shape[1], c.k.shape[3], c.k.dtype, self.device) for c in self._caches]
        for block, cache in zip(self.model.blocks, scratch):
            block.attn.kv_cache = cache
        h = self.model.hidden(idx, pos, pos, mask)  # (n, T, H)
        h = h[torch.arange(n, device=self.device), torch.tensor(lens, device=self.device) - 1]  # (n, H)
        logits = self.model.head(h)  # (n, V)
        rows = torch.tensor([r for r, _, _ in batch], device=self.device)  # (n,)
        for full, part in zip(self._caches, scratch):
            full.k[rows, :, :s] = part.k
            full.v[rows, :, :s] = part.v
        seen = self._seen[rows]  # (n, V), a copy: written back below
        seen.zero_()
        seen.scatter_(1, idx, True)
        seen[:, 0] = torch.tensor([0 in req.prompt for _, _, req in batch], device=self.device)  # pads are id 0
        self._seen[rows] = seen
        configs = [req.config for _, _, req in batch]
        rngs = [self._rng(c) for c in configs]
        use_seen = any(c.repetition_penalty != 1.0 for c in configs)
        toks = sample_rows(logits, _RowParams.of(configs, self.device), seen if use_seen else None, rngs).tolist()
        for (r, handle, req), rng, tok in zip(batch, rngs, toks):
            row = _Row(handle, req, rng, _TextTracker(self.decode, req.prompt, req.stop), len(req.prompt), -1,
                       stop_ids=frozenset(req.config.stop_ids))
            self._rows[r] = row
            self._accept(r, row, tok)
        self._count(sum(lens), n)

    def _rng(self, cfg: GenerationConfig) -> torch.Generator | None:
        if cfg.greedy:
            return None
        seed = cfg.seed if cfg.seed is not None else int(torch.randint(2**62, (1,), generator=self._seed_rng))
        return torch.Generator(device=self.device).manual_seed(seed)

    def _count(self, prompt: int, generated: int) -> None:
        if self.on_tokens is not None:
            self.on_tokens(prompt, generated)

    def _decode_step(self) -> None:
        b = max(i for i, r in enumerate(self._rows) if r is not None) + 1
        rows = self._rows[:b]
        live = [r for r in rows if r is not None]
        fed = torch.tensor([[r.last if r else 0 for r in rows], [r.pos if r else 0 for r in rows]],
                           device=self.device)  # (2, b): one host-to-tensor copy per step
        idx, pos = fed[0, :, None], fed[1, :, None]  # (b, 1) each
        slots = _bucket(max(r.pos for r in live) + 1, self.max_len)
        mask = (self._slot_ids[:slots] <= pos[:, :, None])[:, None]  # (b, 1, 1, s)
        logits = self._forward(b, slots, idx, pos, mask)  # (b, V)
        params, rngs, penalised = self._batch_params(rows)
        if penalised:  # mark fed tokens seen before sampling, as generation does
            self._seen[penalised, [rows[r].last for r in penalised]] = True
        for row in live:
            row.pos += 1
        toks = sample_rows(logits, params, self._seen[:b] if penalised else None, rngs).tolist()
        self.steps += 1
        self._count(0, len(live))
        for r, row in enumerate(rows):
            if row is not None:
                self._accept(r, row, toks[r])

    def _batch_params(self, rows: list[_Row | None]):
        """Sampling tensors, generators and penalised row indices of this row set (rebuilt when it changes)."""
        key = tuple(map(id, rows))
        if self._params_cache[0] != key:
            configs = [row.req.config if row else _IDLE for row in rows]
            penalised = [r for r, c in enumerate(configs) if c.repetition_penalty != 1.0]
            rngs = [row.rng if row else None for row in rows]
            self._params_cache = (key, (_RowParams.of(configs, self.device), rngs, penalised), rows)
        return self._params_cache[1]

    def _forward(self, b: int, slots: int, idx, pos, mask) -> torch.Tensor:
        views = self._views.get((b, slots))
        if views is None:  # slices of the shared cache, made once per (rows, slots) shape
            views = self._views[b, slots] = [_CacheView(c, slice(0, b), slots) for c in self._caches]
        for block, view in zip(self.model.blocks, views):
            block.attn.kv_cache = view
        step = fast.decode_step(self.model)  # on CPU: the flat one-token step (fast.LeanStep)
        if step is not None:
            return step(self.model, idx, pos, pos, mask)  # (b, V)
        h = self.model.hidden(idx, pos, pos, mask)[:, -1]  # (b, H)
        return self.model.head(h)  # (b, V)

    def _accept(self, r: int, row: _Row, tok: int) -> None:
        """Record a sampled token: emit its text, and finish the row if it stops."""
        row.generated += 1
        row.last = tok
        if row.handle.first_token_at is None:
            row.handle.first_token_at = time.perf_counter()
        if tok in row.stop_ids:
            return self._finish(r, row, "stop")
        text, stopped = row.text.push(tok)
        if stopped:
            return self._finish(r, row, "stop", text)
        self._emit(row.handle, TokenEvent(row.req.index, text, tok))
        if row.generated >= row.req.config.max_new_tokens or row.pos >= self.max_len:
            self._finish(r, row, "length")

    def _finish(self, r: int, row: _Row, reason: str, text: str | None = None) -> None:
        self._rows[r] = None
        tail = row.text.flush() if text is None else text
        self._emit(row.handle, FinishEvent(row.req.index, reason, tail, len(row.req.prompt), row.generated))

    def _drop_cancelled(self) -> None:
        for r, row in enumerate(self._rows):
            if row is not None and row.handle.cancelled:
                self._rows[r] = None

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for handle, req in pending:
            self._emit(handle, ErrorEvent(req.index, message))
        for r, row in enumerate(self._rows):
            if row is not None:
                self._rows[r] = None
                self._emit(row.handle, ErrorEvent(row.req.index, message))


_IDLE = GenerationConfig()  # the options of an idle row inside the decoded prefix (greedy; its token is ignored)


def _bucket(n: int, limit: int) -> int:
    return min(limit, -(-n // _SLOT_BUCKET) * _SLOT_BUCKET)
