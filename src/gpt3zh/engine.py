"""The one engine: every way of generating (generate, stream, the pipeline, the CLI, the server,
a tensor-parallel rank) runs its requests through `Engine`.

Shape letters: B engine rows (KV cache rows), b rows decoded this step (a prefix of B), T prompt
length, S cache slots, V vocab.

Each request owns one cache row while it runs. `step()` is one step of continuous batching:
1. admit: waiting requests move into free rows (lowest first) within a prefill token budget and
   are prefilled together, right-padded, straight into their rows (`KVCache` addresses any rows);
   each samples its first token;
2. decode: every running row feeds its last token at its own slot and samples the next. When all
   running rows stand at the same slot (a batch of one, equal prompts) the step attends to the
   filled slots without a mask; otherwise each row has its slot and an additive mask. Only the
   rows up to the highest one in use and the slots up to the furthest one (rounded up to a bucket)
   go through the model, so one request alone costs a batch-1 step;
3. per row: stop ids, the detokenizer's text and stop strings, max_new_tokens, a full context, and
   cancellation end it; its row is free at once, for the next admission.
Events (TokenEvent per sampled token, FinishEvent, ErrorEvent) come back from `step()`.

Scoring. A request with `prompt_logprobs=k` also gets a PromptEvent at its prefill, before its
first token: the log-probability of each prompt token given the tokens before it, and the top k
alternatives, from the same prefill (the head runs on its hidden states, a chunk of positions at a
time). `max_new_tokens=0` scores only: the request is prefilled, samples nothing and finishes
("length") in the same step, its row never taken.

A finished row's slots are overwritten by the next prefill, and a row never attends past its own
position, so stale keys (and the right-padding's keys) are harmless. `add` and `cancel` may be
called from another thread than `step` (the server's event loop); the rest is single-threaded.
Seeds: a sampled request without a seed draws one from torch's global generator when it is added
(so `torch.manual_seed` makes a run repeat, and every rank of a tensor-parallel group agrees when
they share the global seed).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import GenerationConfig
from .detokenize import Detokenizer, TextDecoder
from .inference import InferenceModel, prepare
from .model import GPT
from .sampling import SamplingParams, sample

SLOT_BUCKET = 16  # the attended slot range grows in steps of this: few distinct shapes, little masked waste
STATIC_BUCKET = 64  # compiled (static-shape) engines size their cache to a multiple of this
PREFILL_TOKENS = 4096  # at most this many (padded) prompt tokens are prefilled in one forward
SCORE_CHUNK = 256  # prompt positions whose (c, V) logits exist at once while a prompt is scored


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass(eq=False)
class Request:
    """One sequence to generate. `tag` and `index` are the caller's, echoed through its events."""

    prompt: list[int]
    config: GenerationConfig
    tag: Any = None
    index: int = 0
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the top k alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (a PromptEvent at the prefill)
    cancelled: bool = False  # set by cancel(), possibly from another thread; read at step boundaries

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class TokenEvent:
    request: Request
    token_id: int
    text: str  # the text this token releases ("" while held back or for a stop id)
    # With request.logprobs: log p(token) under the model (its raw logits, before penalty,
    # temperature and filters) and the top-k alternatives [(id, log p), ...], most likely first.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class PromptEvent:
    """With request.prompt_logprobs: log p(prompt[i] | prompt[:i]) for every i (None for the first
    token, which nothing predicts) and the top-k alternatives at each position ([] for the first)."""

    request: Request
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]]]


@dataclass
class FinishEvent:
    request: Request
    reason: str  # "stop" (a stop id or stop string) | "length" (max_new_tokens or the context)
    text: str  # the rest of the text, released at the end
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    request: Request
    message: str


Event = TokenEvent | PromptEvent | FinishEvent | ErrorEvent


@dataclass(eq=False)
class _Row:
    req: Request
    rng: torch.Generator | None
    detok: Detokenizer | None
    stop_ids: frozenset
    pos: int  # slots filled (= where the next fed token is written)
    last: int = -1  # the last sampled token, fed at the next step
    generated: int = 0


class Engine:
    """Generate many requests at once from one prepared model (see the module docstring).

    model: a GPT (prepared with the default options for its device) or an InferenceModel.
    tokenizer: needed for text (events carry text deltas) and stop strings; None = ids only.
    max_batch: cache rows = requests decoded together. max_len: cache slots per row (default the
    model's context). max_queue: waiting requests before `add` raises QueueFull (None = no bound).
    """

    def __init__(self, model: GPT | InferenceModel, tokenizer: TextDecoder | None = None, *,
                 max_batch: int = 8, max_len: int | None = None, max_queue: int | None = None,
                 prefill_tokens: int = PREFILL_TOKENS) -> None:
        self.prepared = prepare(model).claim()  # our own module while we hold it (a fork if busy)
        self.module = self.prepared.module
        self.tokenizer = tokenizer
        cfg = self.module.config
        limit = cfg.max_seq_len
        max_len = min(max_len or limit, limit)
        if self.prepared.static_shapes:
            max_len = min(limit, -(-max_len // STATIC_BUCKET) * STATIC_BUCKET)
        if max_batch < 1 or max_len < 1:
            raise ValueError(f"max_batch and max_len must be >= 1, got {max_batch} and {max_len}")
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.prefill_tokens = prefill_tokens
        self.device = self.prepared.device
        self.vocab_size = cfg.vocab_size
        self._rows: list[_Row | None] = [None] * max_batch
        self._waiting: deque[Request] = deque()
        self._orphans: list[Request] = []  # taken for a prefill that failed
        self._lock = threading.Condition()  # guards the waiting queue
        self._stepping = threading.Lock()  # held while a step runs, so close() never frees a cache in use
        self._closed = False
        self._params: tuple = (None, None)
        self.steps = 0  # decode steps run
        self.prompt_tokens = 0  # tokens prefilled
        self.generated_tokens = 0
        self.module.setup_kv_cache(max_batch, max_len)
        self._seen = torch.zeros(max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
        self._slot_ids = torch.arange(max_len, device=self.device)  # (S,)

    # ---------------------------------------------------------------- any thread
    def add(self, requests: Sequence[Request]) -> None:
        """Queue requests (all or none). Raises ValueError for a request this engine cannot run and
        QueueFull when the queue would overflow."""
        for req in requests:
            self.check(req)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting = deque(r for r in self._waiting if not r.cancelled)  # gone callers leave
            if self.max_queue is not None and len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"the queue holds {len(self._waiting)} of {self.max_queue} requests")
            for req in requests:
                if not req.config.greedy and req.config.seed is None:
                    seed = int(torch.randint(2**62, (1,)))  # the global generator: see the module docstring
                    req.config = req.config.replace(seed=seed)
                self._waiting.append(req)
            self._lock.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until there is work (True) or the engine is closed / the timeout passes (False)."""
        with self._lock:
            self._lock.wait_for(lambda: self._closed or self.has_work, timeout)
            return not self._closed and self.has_work

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    def close(self) -> None:
        """Stop taking requests and free the KV cache (after a step in progress, from any thread).
        Requests still waiting or running can be ended with `fail_all`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        with self._stepping:
            self.prepared.release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- the engine's thread
    def step(self) -> list[Event]:
        """Admit and prefill waiting requests, then run one decode step; return the events."""
        return self.admit() + self.decode()

    @torch.inference_mode()
    def admit(self) -> list[Event]:
        """Move waiting requests into free rows and prefill them (first tokens sampled)."""
        events: list[Event] = []
        with self._stepping:
            if self._closed:
                return events
            self._drop_cancelled()
            batch = self._take_waiting()
            if batch:
                try:
                    self._prefill(batch, events)
                except Exception:
                    for r, req in batch:  # neither waiting nor running now: fail_all must still see them
                        self._rows[r] = None
                        self._orphans.append(req)
                    raise
        return events

    @torch.inference_mode()
    def decode(self) -> list[Event]:
        """One decode step for every running row."""
        events: list[Event] = []
        with self._stepping:
            if self._closed:
                return events
            self._drop_cancelled()
            if any(r is not None for r in self._rows):
                self._decode_step(events)
        return events

    def fail_all(self, message: str) -> list[Event]:
        """End every waiting and running request with an ErrorEvent (after a failed step)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        waiting, self._orphans = self._orphans + waiting, []
        events: list[Event] = [ErrorEvent(req, message) for req in waiting]
        for r, row in enumerate(self._rows):
            if row is not None:
                self._rows[r] = None
                events.append(ErrorEvent(row.req, message))
        return events

    # ---------------------------------------------------------------- internals
    def check(self, req: Request) -> None:
        """Raise ValueError if this engine cannot run `req` (what `add` checks first)."""
        n = len(req.prompt)
        if not 0 < n <= self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit: prompts need 1 to {self.max_len} "
                             f"tokens here (the cache has {self.max_len} slots per row)")
        bad = [t for t in req.prompt if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
        if req.config.stop and self.tokenizer is None:
            raise ValueError("stop strings need text: give the engine (or generate) a tokenizer")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(req, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.vocab_size):
                raise ValueError(f"{name} must be None or an int in [0, {self.vocab_size}], got {k!r}")
        big = [i for i in req.config.stop_ids if i >= self.vocab_size]
        if big:
            raise ValueError(f"eos_token_id {big[0]} is outside the vocabulary [0, {self.vocab_size})")

    def _take_waiting(self) -> list[tuple[int, Request]]:
        batch: list[tuple[int, Request]] = []
        with self._lock:
            free = [i for i, r in enumerate(self._rows) if r is None]
            longest = 0
            while free and self._waiting:
                req = self._waiting[0]
                longest_if = max(longest, len(req.prompt))
                if batch and longest_if * (len(batch) + 1) > self.prefill_tokens:
                    break  # the rest join at the next step
                self._waiting.popleft()
                if req.cancelled:
                    continue
                batch.append((free.pop(0), req))
                longest = longest_if
        return batch

    def _prefill(self, batch: list[tuple[int, Request]], events: list[Event]) -> None:
        n = len(batch)
        lens = [len(req.prompt) for _, req in batch]
        T = max(lens)
        idx = torch.tensor([req.prompt + [0] * (T - len(req.prompt)) for _, req in batch],
                           device=self.device)  # (n, T), right-padded: pads come after every real token
        rows_list = [r for r, _ in batch]
        rows = torch.tensor(rows_list, device=self.device)  # (n,)
        last = torch.tensor(lens, device=self.device) - 1  # (n,)
        h = self.prepared.prefill_hidden(idx, None if rows_list == list(range(n)) else rows)  # (n, T, H)
        self.prompt_tokens += sum(lens)
        for j, (_, req) in enumerate(batch):
            if req.prompt_logprobs is not None:
                events.append(self._score_prompt(req, h[j]))
        for _, req in batch:  # score only: prefilled (and scored), nothing sampled, the row left free
            if req.config.max_new_tokens == 0:
                events.append(FinishEvent(req, "length", "", len(req.prompt), 0))
        live = [j for j, (_, req) in enumerate(batch) if req.config.max_new_tokens > 0]
        if not live:
            return
        if len(live) < n:
            batch, idx, rows, last, h = [batch[j] for j in live], idx[live], rows[live], last[live], h[live]
            n = len(live)
        logits = self.module.head(h[torch.arange(n, device=self.device), last])  # (n, V)
        configs = [req.config for _, req in batch]
        seen = None
        if any(c.repetition_penalty != 1.0 for c in configs):
            is_pad = torch.arange(T, device=self.device) >= last[:, None] + 1  # (n, T)
            # Pads are routed to an extra column V that is then dropped, so they mark nothing.
            marks = torch.zeros(n, self.vocab_size + 1, dtype=torch.bool, device=self.device)
            marks.scatter_(1, idx.masked_fill(is_pad, self.vocab_size), True)
            seen = marks[:, : self.vocab_size]
            self._seen[rows] = seen
        new = [self._new_row(req) for _, req in batch]
        toks_t = sample(logits, SamplingParams.of(configs, self.device), seen, [row.rng for row in new])
        lps = _logprobs(logits, toks_t, [req for _, req in batch])
        for (r, _), row, tok, lp in zip(batch, new, toks_t.tolist(), lps):
            self._rows[r] = row
            self._accept(r, row, tok, lp, events)

    def _score_prompt(self, req: Request, h: torch.Tensor) -> PromptEvent:
        """log p of each prompt token from the prefill's hidden states h (T, H) of its row."""
        k, n = req.prompt_logprobs, len(req.prompt)
        targets = torch.tensor(req.prompt[1:], device=self.device)  # position i predicts token i + 1
        chosen: list[float | None] = [None]
        top: list[list[tuple[int, float]]] = [[]]
        for s in range(0, n - 1, SCORE_CHUNK):  # bounded (c, V) logits, whatever the prompt's length
            e = min(s + SCORE_CHUNK, n - 1)
            lp = torch.log_softmax(self.module.head(h[s:e]).float(), dim=-1)  # (c, V)
            chosen += lp.gather(1, targets[s:e, None])[:, 0].tolist()
            if k:
                best = lp.topk(k, dim=-1)
                top += [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
            else:
                top += [[] for _ in range(e - s)]
        return PromptEvent(req, chosen, top)

    def _new_row(self, req: Request) -> _Row:
        cfg = req.config
        rng = None if cfg.greedy else torch.Generator(device=self.device).manual_seed(cfg.seed)
        detok = None if self.tokenizer is None else Detokenizer(self.tokenizer, req.prompt, cfg.stop)
        return _Row(req, rng, detok, frozenset(cfg.stop_ids), pos=len(req.prompt))

    def _decode_step(self, events: list[Event]) -> None:
        static = self.prepared.static_shapes
        b = self.max_batch if static else max(i for i, r in enumerate(self._rows) if r is not None) + 1
        rows = self._rows[:b]
        live_pos = {r.pos for r in rows if r is not None}
        shared = len(live_pos) == 1 and not static
        p = next(iter(live_pos))
        fed = torch.tensor([[r.last if r else 0 for r in rows], [r.pos if r else (p if shared else 0) for r in rows]],
                           device=self.device)  # (2, b): one host-to-device copy per step
        idx, pos = fed[0, :, None], fed[1, :, None]  # (b, 1) each
        if shared:  # every row writes slot p: no mask, attend to slots 0..p
            logits = self.prepared.step(idx, pos, fed[1, :1], None, p + 1)
        else:
            s = self.max_len if static else min(self.max_len, -(-(max(live_pos) + 1) // SLOT_BUCKET) * SLOT_BUCKET)
            visible = self._slot_ids[:s] <= pos[:, :, None]  # (b, 1, s)
            mask = torch.zeros(visible.shape, dtype=self.prepared.dtype, device=self.device)
            mask = mask.masked_fill_(~visible, float("-inf"))[:, None]  # (b, 1, 1, s) additive, made once
            logits = self.prepared.step(idx, pos, pos, mask, s)  # (b, V)
        params, rngs, penalised = self._batch_params(rows)
        if penalised:  # the fed tokens count as seen before sampling
            self._seen[penalised, [rows[r].last for r in penalised]] = True
        for row in rows:
            if row is not None:
                row.pos += 1
        toks_t = sample(logits, params, self._seen[:b] if penalised else None, rngs)
        lps = _logprobs(logits, toks_t, [row.req if row else None for row in rows])
        self.steps += 1
        for r, (row, tok) in enumerate(zip(rows, toks_t.tolist())):
            if row is not None:
                self._accept(r, row, tok, lps[r], events)

    def _batch_params(self, rows: list[_Row | None]):
        """Sampling tensors, generators and penalised rows of this row set (rebuilt when it changes)."""
        key = tuple(map(id, rows))
        if self._params[0] != key:
            configs = [row.req.config if row else _IDLE for row in rows]
            penalised = [r for r, c in enumerate(configs) if c.repetition_penalty != 1.0]
            rngs = [row.rng if row else None for row in rows]
            self._params = (key, (SamplingParams.of(configs, self.device), rngs, penalised), rows)
        return self._params[1]

    def _accept(self, r: int, row: _Row, tok: int, lp: tuple | None, events: list[Event]) -> None:
        """Record a sampled token: its event, then the row's end if it stops."""
        row.generated += 1
        row.last = tok
        self.generated_tokens += 1
        lp = lp or (None, None)
        if tok in row.stop_ids:  # a stop id ends the text and is not part of it
            events.append(TokenEvent(row.req, tok, "", *lp))
            return self._finish(r, row, "stop", events)
        text = row.detok.push(tok) if row.detok is not None else ""
        events.append(TokenEvent(row.req, tok, text, *lp))
        if row.detok is not None and row.detok.stopped:
            self._finish(r, row, "stop", events)
        elif row.generated >= row.req.config.max_new_tokens or row.pos >= self.max_len:
            self._finish(r, row, "length", events)

    def _finish(self, r: int, row: _Row, reason: str, events: list[Event]) -> None:
        self._rows[r] = None
        tail = row.detok.finish() if row.detok is not None else ""
        events.append(FinishEvent(row.req, reason, tail, len(row.req.prompt), row.generated))

    def _drop_cancelled(self) -> None:
        for r, row in enumerate(self._rows):
            if row is not None and row.req.cancelled:
                self._rows[r] = None


def _logprobs(logits: torch.Tensor, toks: torch.Tensor, reqs: list[Request | None]) -> list[tuple | None]:
    """(log p(token), top-k [(id, log p)]) for the rows whose request asks for log-probabilities."""
    want = [r for r, req in enumerate(reqs) if req is not None and req.logprobs is not None]
    out: list[tuple | None] = [None] * len(reqs)
    if not want:
        return out
    lp = torch.log_softmax(logits[want].float(), dim=-1)  # (w, V)
    chosen = lp.gather(1, toks[want][:, None])[:, 0].tolist()
    k = max(reqs[r].logprobs for r in want)
    top = lp.topk(k, dim=-1) if k else None
    for i, r in enumerate(want):
        n = reqs[r].logprobs
        pairs = list(zip(top.indices[i, :n].tolist(), top.values[i, :n].tolist())) if n else []
        out[r] = (chosen[i], pairs)
    return out


_IDLE = GenerationConfig()  # the options of an idle row inside the decoded prefix (greedy; its token is ignored)


def rows_config(config: GenerationConfig, n: int) -> list[GenerationConfig]:
    """The configs of n sequences of one call: sequence i of a seeded call uses seed + i."""
    if config.seed is None:
        return [config] * n
    return [config.replace(seed=(config.seed + i) % 2**63) for i in range(n)]


__all__ = ["Engine", "ErrorEvent", "Event", "FinishEvent", "PromptEvent", "QueueFull", "Request", "TokenEvent",
           "rows_config"]
