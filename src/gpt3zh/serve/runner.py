"""The server's side of the engine: one background thread runs `gpt3zh.engine.Engine` step by step.

The asyncio side talks to it through thread-safe hand-offs only: `submit` adds requests to the
engine's queue (bounded: QueueFull), events come back through `loop.call_soon_threadsafe` into
each handle's asyncio.Queue, and cancellation is a flag the engine reads at each step boundary.
A phase's events for all rows go over in one hand-off, so the event loop wakes once per step, not
once per token; first tokens (the prefill) go out before the next decode step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable

from ..config import GenerationConfig
from ..engine import Engine, ErrorEvent, Event, QueueFull, Request, TokenEvent

log = logging.getLogger("gpt3zh.serve")


class Handle:
    """The asyncio side of one HTTP request's sequences: their events arrive on `events`."""

    _ids = itertools.count()

    def __init__(self, loop: asyncio.AbstractEventLoop, requests: list[Request]) -> None:
        self.id = next(self._ids)
        self.loop = loop
        self.requests = requests
        self.events: asyncio.Queue = asyncio.Queue()
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        for req in self.requests:
            req.cancel()


def _deliver(events: list[tuple[Handle, Event]]) -> None:  # runs on the event loop
    for handle, event in events:
        handle.events.put_nowait(event)


class EngineThread:
    """Runs `engine` in a daemon thread until `stop()`."""

    def __init__(self, engine: Engine, on_tokens: Callable[[int, int], None] | None = None) -> None:
        self.engine = engine
        self.on_tokens = on_tokens  # (prompt tokens prefilled, tokens generated) per phase, for metrics
        self._thread: threading.Thread | None = None
        self._go = threading.Event()  # cleared by pause(): the thread waits before its next step
        self._go.set()

    # ---------------------------------------------------------------- asyncio side
    def submit(self, requests: list[Request]) -> Handle:
        """Queue the requests of one HTTP request; raises QueueFull (and ValueError for a bad one)."""
        handle = Handle(asyncio.get_running_loop(), requests)
        for req in requests:
            req.tag = handle
        self.engine.add(requests)
        return handle

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpt3zh-engine", daemon=True)
            self._thread.start()

    def pause(self) -> None:
        """Hold the engine before its next step (requests still queue); `resume()` goes on."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self.engine.close()  # wakes the thread, which fails what is left and exits
        self._go.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        engine = self.engine
        while engine.wait():
            self._go.wait()
            for phase in (engine.admit, engine.decode):
                before = engine.prompt_tokens
                try:
                    events = phase()
                except Exception as err:  # a bug must not kill the thread: fail the rows in flight
                    log.exception("engine step failed")
                    events = engine.fail_all(f"engine error: {type(err).__name__}: {err}")
                self._send(events)
                if self.on_tokens is not None:
                    generated = sum(isinstance(ev, TokenEvent) for ev in events)
                    self.on_tokens(engine.prompt_tokens - before, generated)
        self._send(engine.fail_all("the server is shutting down"))

    def _send(self, events: list[Event]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for ev in events:
            handle = ev.request.tag
            if isinstance(handle, Handle) and not (ev.request.cancelled and not isinstance(ev, ErrorEvent)):
                by_loop.setdefault(handle.loop, []).append((handle, ev))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its clients are gone
                loop.call_soon_threadsafe(_deliver, batch)


# ------------------------------------------------------------------------------------------------------
# Tensor parallelism: one HTTP front (rank 0), the engine stepped in lockstep on every rank.
#
# Every rank holds a slice of the model and its own Engine; a decode step is a collective (the
# row-parallel layers all-reduce), so all ranks must make exactly the same engine calls with the
# same requests. Rank 0 alone talks to clients. Before each step it sends an *order* to the other
# ranks over a gloo group (JSON, not pickle: only data crosses the wire): the requests that arrived
# since the last step (ids, prompt, options with the seed rank 0's engine drew at `add`), the ids
# cancelled since, whether to step, and a digest of rank 0's engine after the previous step. Every
# rank then applies the order and steps. The digest (counters and a hash of the sampled tokens)
# makes a rank that diverged (a different token, a row ending elsewhere) stop with an error
# instead of serving garbage.
#
# Rank 0's engine never sees the caller's Request objects: the event loop may cancel one at any
# moment, and a cancellation rank 0 saw mid-step but the others did not would split the ranks.
# Each request has a twin inside the engine whose flag is only set while an order is built.

HEARTBEAT_S = 2.0  # an idle rank 0 sends an empty order this often, so the others' receive never times out


class Channel:
    """Rank 0's orders to every other rank over `group` (gloo, with the timeout after which a silent
    rank 0 counts as gone).

    An order is {"digest": 5 ints, "step": bool, "stop": bool, "new": [...], "cancel": [...]}. The
    fixed part travels as one int64 header; "new" and "cancel", when there are any, as JSON in a
    second broadcast. So a decode step with nothing new costs one 64-byte broadcast.
    `hello` is the first message, over the default group (long timeout): rank 0 starts its HTTP
    server after the weights are loaded, which may take the others longer than `group` allows.
    """

    def __init__(self, group, rank: int) -> None:
        self.group, self.rank = group, rank

    def hello(self) -> None:
        import torch
        import torch.distributed as dist

        dist.broadcast(torch.zeros(1, dtype=torch.int64), src=0)

    def send(self, order: dict) -> None:
        import torch
        import torch.distributed as dist

        news = {"new": order["new"], "cancel": order["cancel"]}
        data = json.dumps(news, separators=(",", ":")).encode() if news["new"] or news["cancel"] else b""
        header = [len(data), int(order["step"]), int(order["stop"]), *order["digest"]]
        dist.broadcast(torch.tensor(header, dtype=torch.int64), src=0, group=self.group)
        if data:
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=self.group)

    def recv(self) -> dict:
        import torch
        import torch.distributed as dist

        header = torch.zeros(3 + _DIGEST, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.group)
        size, step, stop, *digest = header.tolist()
        news = {"new": [], "cancel": []}
        if size:
            data = torch.empty(size, dtype=torch.uint8)
            dist.broadcast(data, src=0, group=self.group)
            news = json.loads(data.numpy().tobytes())
        return {"digest": digest, "step": bool(step), "stop": bool(stop), **news}


class DivergedError(RuntimeError):
    """This rank's engine no longer matches rank 0's: it must stop, never serve on."""


_MOD = (1 << 61) - 1  # the token hash stays below this, so it fits the int64 header
_DIGEST = 5  # steps, prompt tokens, generated tokens, rows running, token hash


class _Lockstep:
    """What every rank does with an order: the same engine calls in the same order.

    `digest` is the engine after the last step: counters and a hash of every event, in order.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.live: dict[int, Request] = {}  # request id -> the engine's request
        self.digest: list[int] = [0] * _DIGEST

    def add(self, rid: int, req: Request) -> None:
        req.tag = rid
        self.live[rid] = req

    def cancel(self, rids: list[int]) -> None:
        for rid in rids:
            req = self.live.pop(rid, None)
            if req is not None:
                req.cancel()

    def step(self, deliver: Callable[[list[Event], int], None]) -> None:
        """admit then decode (first tokens go out before the decode step); any exception ends the
        lockstep, so it propagates."""
        h = self.digest[-1]
        for phase in (self.engine.admit, self.engine.decode):
            before = self.engine.prompt_tokens
            events = phase()
            for ev in events:
                code = ev.token_id if isinstance(ev, TokenEvent) else -1 if isinstance(ev, ErrorEvent) else -2
                h = (h * 1_000_003 + ev.request.tag * 65_599 + code + 3) % _MOD
                if not isinstance(ev, TokenEvent):
                    self.live.pop(ev.request.tag, None)
            deliver(events, self.engine.prompt_tokens - before)
        e = self.engine
        self.digest = [e.steps, e.prompt_tokens, e.generated_tokens, e.running, h]


def _request_order(rid: int, req: Request) -> list:
    return [rid, req.prompt, dataclasses.asdict(req.config), req.index, req.logprobs]


def _request_from_order(item: list) -> tuple[int, Request]:
    rid, prompt, config, index, logprobs = item
    return rid, Request(prompt, GenerationConfig.from_dict(config), index=index, logprobs=logprobs)


class TPLeader:
    """Rank 0's runner: EngineThread's interface (submit, start, stop, pause, resume, alive, engine)
    over an engine that every rank steps in lockstep (see above).

    Failure of any rank (a collective that raises, or a step that has not finished within `timeout`
    seconds: the watchdog) is fatal: every request in flight gets an ErrorEvent, new ones are
    refused, and `on_fatal(message)` is called (the CLI ends the server with it).
    """

    def __init__(self, engine: Engine, channel: Channel, layout: str, timeout: float,
                 on_tokens: Callable[[int, int], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.engine, self.channel, self.layout, self.timeout = engine, channel, layout, timeout
        self.on_tokens, self.on_fatal = on_tokens, on_fatal
        self.failed: str | None = None
        self._lockstep = _Lockstep(engine)
        self._callers: dict[int, Request] = {}  # request id -> the caller's Request (its twin is in the engine)
        self._inbox: list[list[Request]] = []  # submitted, not yet ordered: one list per submit
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._go = threading.Event()
        self._go.set()
        self._stopping = False
        self._busy_since: float | None = None  # set while this rank is inside a collective step
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None

    # ---------------------------------------------------------------- asyncio side
    def submit(self, requests: list[Request]) -> Handle:
        """Queue one HTTP request's sequences; raises QueueFull and ValueError as Engine.add does."""
        handle = Handle(asyncio.get_running_loop(), requests)
        for req in requests:
            req.tag = handle
            self.engine.check(req)  # the engine's own checks, now: its add runs later, on the engine thread
        with self._cv:
            if self.failed or self._stopping:
                raise RuntimeError(f"the engine is not running ({self.failed or 'shutting down'})")
            queued = self.engine.waiting + sum(map(len, self._inbox))
            if self.engine.max_queue is not None and queued + len(requests) > self.engine.max_queue:
                raise QueueFull(f"the queue holds {queued} of {self.engine.max_queue} requests")
            self._inbox.append(list(requests))
            self._cv.notify_all()
        return handle

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failed is None

    def start(self) -> None:
        if self._thread is None:
            log.info("tensor parallel: %s; rank 0 serves HTTP, every rank steps its engine in lockstep", self.layout)
            self._thread = threading.Thread(target=self._run, name="gpt3zh-engine-tp", daemon=True)
            self._watchdog = threading.Thread(target=self._watch, name="gpt3zh-tp-watchdog", daemon=True)
            self._thread.start()
            self._watchdog.start()

    def pause(self) -> None:
        """Hold the engine before its next step (requests still queue; the other ranks get heartbeats)."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()
        with self._cv:
            self._cv.notify_all()

    def stop(self) -> None:
        """Tell every rank to stop, then end what is left. A rank that hangs cannot hold this up
        for longer than the timeout: the thread is a daemon and goes with the process."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._go.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0 if self.failed else self.timeout)
            if self._thread.is_alive():
                self._fatal("the engine did not stop: a tensor-parallel step is hung")
            else:
                self.engine.close()
        self._done.set()

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            self.channel.hello()
            while self._serve_one():
                pass
        except Exception as err:  # a dead or hung peer, or a bug: the ranks are no longer in step
            log.exception("tensor-parallel engine step failed")
            self._fatal(f"a tensor-parallel rank failed or is gone ({type(err).__name__}: {err})")
            return
        self._hand_over(self.engine.fail_all("the server is shutting down"), 0)

    def _serve_one(self) -> bool:
        """Build one order, send it to every rank and step with them; False once told to stop."""
        with self._cv:
            self._cv.wait_for(self._has_news, timeout=HEARTBEAT_S)
            stopping = self._stopping or self.failed is not None
            go = self._go.is_set() and not stopping
            inbox, self._inbox = (self._inbox, []) if go else ([], self._inbox)
        digest = list(self._lockstep.digest)  # the engine after the previous step, before this order
        new = [item for group in inbox for item in self._add(group)]
        order = {"digest": digest, "new": new, "cancel": self._cancelled(), "stop": stopping,
                 "step": go and self.engine.has_work}
        self._busy_since = time.monotonic()
        self.channel.send(order)
        if order["step"]:
            self._lockstep.step(self._hand_over)
        self._busy_since = None
        return not stopping

    def _has_news(self) -> bool:
        go = self._go.is_set()
        return self._stopping or self.failed is not None or (go and (bool(self._inbox) or self.engine.has_work))

    def _add(self, group: list[Request]) -> list[list]:
        """Give one submit's requests (as twins) to this rank's engine; its add draws the seeds that
        then travel in the order. A group whose caller is gone is dropped here."""
        if all(req.cancelled for req in group):
            return []
        twins = [Request(req.prompt, req.config, index=req.index, logprobs=req.logprobs) for req in group]
        try:
            self.engine.add(twins)
        except (QueueFull, ValueError, RuntimeError) as err:  # a closed engine, say: these fail, nothing is ordered
            self._send([(req.tag, ErrorEvent(req, str(err))) for req in group])
            return []
        items = []
        for req, twin in zip(group, twins):
            rid = next(self._ids)
            self._lockstep.add(rid, twin)
            with self._cv:
                self._callers[rid] = req
            items.append(_request_order(rid, twin))
        return items

    def _cancelled(self) -> list[int]:
        with self._cv:
            gone = [rid for rid, req in self._callers.items() if req.cancelled]
            for rid in gone:
                del self._callers[rid]
        self._lockstep.cancel(gone)
        return gone

    def _hand_over(self, events: list[Event], prefilled: int) -> None:
        """Hand the engine's events (on twins) to the callers' handles."""
        out = []
        with self._cv:
            for ev in events:
                rid = ev.request.tag
                req = self._callers.get(rid)
                if not isinstance(ev, TokenEvent):
                    self._callers.pop(rid, None)
                if req is not None and (isinstance(ev, ErrorEvent) or not req.cancelled):
                    out.append((req.tag, dataclasses.replace(ev, request=req)))
        self._send(out)
        if self.on_tokens is not None:
            self.on_tokens(prefilled, sum(isinstance(ev, TokenEvent) for ev in events))

    def _send(self, pairs: list[tuple[Handle, Event]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, ev in pairs:
            by_loop.setdefault(handle.loop, []).append((handle, ev))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its clients are gone
                loop.call_soon_threadsafe(_deliver, batch)

    # ---------------------------------------------------------------- failure
    def _watch(self) -> None:
        while not self._done.wait(0.5):
            since = self._busy_since
            if since is not None and time.monotonic() - since > self.timeout:
                self._fatal(f"a tensor-parallel step has not finished in {self.timeout:g} s: a rank is hung or dead")
                return

    def _fatal(self, message: str) -> None:
        """Fail every request in flight or queued, refuse new ones, and tell on_fatal (once)."""
        with self._cv:
            if self.failed is not None:
                return
            self.failed = message
            callers = list(self._callers.values()) + [req for group in self._inbox for req in group]
            self._callers, self._inbox = {}, []
            self._cv.notify_all()
        log.error("gpt3zh serve: %s; ending the server", message)
        self._send([(req.tag, ErrorEvent(req, message)) for req in callers])
        self._done.set()
        if self.on_fatal is not None:
            self.on_fatal(message)


class TPFollower:
    """Every other rank: receive rank 0's orders and make the same engine calls, until told to stop.

    Raises DivergedError when this engine no longer matches rank 0's, and whatever the process
    group raises when rank 0 is gone (a closed connection, or no order within the group's timeout).
    """

    def __init__(self, engine: Engine, channel: Channel) -> None:
        self.engine, self.channel = engine, channel
        self._lockstep = _Lockstep(engine)

    def run(self) -> None:
        try:
            self.channel.hello()
            while True:
                order = self.channel.recv()
                if order["digest"] != self._lockstep.digest:
                    raise DivergedError(
                        f"rank {self.channel.rank}'s engine diverged from rank 0's after step {order['digest'][0]} "
                        f"(rank 0 {order['digest']}, here {self._lockstep.digest}: steps, prompt tokens, generated "
                        "tokens, rows running, token hash); check that every rank runs the same inference path")
                if order["stop"]:
                    return
                for item in order["new"]:
                    rid, req = _request_from_order(item)
                    self._lockstep.add(rid, req)
                    self.engine.add([req])
                self._lockstep.cancel(order["cancel"])
                if order["step"]:
                    self._lockstep.step(lambda events, prefilled: None)
        finally:
            self.engine.close()


class TensorParallelRunner:
    """The `runner` for create_app / serve on rank 0: makes the TPLeader (kept as `.leader`) and
    puts the layout on /metrics."""

    def __init__(self, channel: Channel, tp: int, layout: str, timeout: float,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.channel, self.tp, self.layout, self.timeout, self.on_fatal = channel, tp, layout, timeout, on_fatal
        self.leader: TPLeader | None = None

    def __call__(self, engine: Engine, metrics) -> TPLeader:
        from .metrics import Gauge

        tp = self.tp
        metrics.gauges += [Gauge("gpt3zh_tensor_parallel_size", "ranks holding a slice of the model", lambda: tp),
                           Gauge("gpt3zh_ranks", "processes stepping the engine in lockstep", lambda: tp)]
        self.leader = TPLeader(engine, self.channel, self.layout, self.timeout, metrics.on_tokens, self.on_fatal)
        return self.leader
