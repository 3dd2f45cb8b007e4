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
import itertools
import logging
import threading
import time
from collections.abc import Callable

from ..engine import Engine, ErrorEvent, Event, Request, TokenEvent

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
