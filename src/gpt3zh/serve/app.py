"""The OpenAI-compatible HTTP API over the batching engine (FastAPI), plus /health, /metrics and /.

Every client mistake is a 4xx in OpenAI's error shape {"error": {"message", "type", "param",
"code"}}: FastAPI's own 422 validation errors (malformed JSON included) become 400s, an unknown
route 404, a wrong key 401, a too-large body 413, a full queue 503 with Retry-After. Only a bug is a
500, and it fails that request alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import GenerationConfig, GenerationDefaults
from ..engine import Engine, ErrorEvent, FinishEvent, PromptEvent, QueueFull, TokenEvent, rows_config
from ..engine import Request as EngineRequest
from ..inference import InferenceModel, InferenceOptions, prepare
from ..model import GPT
from . import protocol as P
from .metrics import Metrics
from .runner import EngineThread, Handle
from .settings import ServeConfig

log = logging.getLogger("gpt3zh.serve")


class Tokenizer(Protocol):
    sep_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def unstable_tail(self, ids: list[int]) -> int: ...


class APIError(Exception):
    """A request that cannot be served, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------------------ app
def create_app(model: GPT | InferenceModel, tokenizer: Tokenizer, config: ServeConfig | None = None,
               model_id: str = "gpt3zh", defaults: GenerationDefaults | None = None,
               inference: InferenceOptions | None = None, runner: Runner | None = None) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it on shutdown.

    defaults: the model directory's generation defaults (default GenerationDefaults());
    inference: how the model is prepared (gpt3zh.prepare; default: the fastest path for its device);
    runner: makes what runs the engine, `runner(engine, metrics)` (default: an EngineThread; under
    torchrun, gpt3zh.serve.runner.tensor_parallel_runner steps every rank in lockstep).
    """
    config = config or ServeConfig()
    server = _Server(model, tokenizer, config, model_id, defaults or GenerationDefaults(), inference, runner)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="gpt3zh", summary="OpenAI-compatible completions for ModelScope's Chinese GPT-3 models",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.openapi = functools.partial(_openapi, app)
    app.state.server = server
    _add_error_handlers(app)
    _add_routes(app, server)
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes, timeout=config.read_timeout)  # inner: after metrics
    app.add_middleware(_Observe, metrics=server.metrics)
    return app


Runner = Callable[[Engine, Metrics], EngineThread]  # EngineThread or anything with its methods


def _engine_thread(engine: Engine, metrics: Metrics) -> EngineThread:
    return EngineThread(engine, metrics.on_tokens)


class _Server:
    """What the routes share: the engine, the tokenizer, the limits and the metrics."""

    def __init__(self, model: GPT | InferenceModel, tokenizer: Tokenizer, config: ServeConfig, model_id: str,
                 defaults: GenerationDefaults, inference: InferenceOptions | None,
                 runner: Runner | None = None) -> None:
        self.prepared = prepare(model, inference)
        self.tokenizer, self.config, self.model_id, self.defaults = tokenizer, config, model_id, defaults
        self.vocab_size = self.prepared.config.vocab_size
        self.context = min(config.max_len or self.prepared.config.max_seq_len, self.prepared.config.max_seq_len)
        self.make_runner = runner or _engine_thread
        self.runner: EngineThread | None = None
        self.metrics = Metrics(lambda: self.runner.engine.waiting if self.runner else 0,
                               lambda: self.runner.engine.running if self.runner else 0)
        self.created = int(time.time())

    def start(self) -> None:
        engine = Engine(self.prepared, self.tokenizer, max_batch=self.config.max_batch, max_len=self.context,
                        max_queue=self.config.max_queue)
        self.runner = self.make_runner(engine, self.metrics)
        self.runner.start()
        log.info("serving %s: %s, %d rows x %d slots", self.model_id, engine.prepared.description,
                 engine.max_batch, engine.max_len)

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()

    @property
    def engine(self) -> Engine | None:
        return self.runner.engine if self.runner else None

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if (scheme.lower() != "bearer"
                or not secrets.compare_digest(token.strip().encode(), self.config.api_key.encode())):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_id!r}.",
                           param="model", code="model_not_found")

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as err:  # JSON can carry lone surrogates ("\ud800"); text cannot
                raise APIError(400, f"the text is not valid Unicode: {err.reason} at character {err.start}",
                               param=param) from None
            ids = list(self.tokenizer.encode(prompt))
        else:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param=param)
            ids = prompt
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens; generation needs at least one", param=param)
        return ids

    async def encode_all(self, prompts: list[str | list[int]], param: str) -> list[list[int]]:
        """Tokenize in a worker thread: a long prompt must not stall the event loop's other streams."""
        return await run_in_threadpool(lambda: [self.encode(p, param) for p in prompts])

    def generation_config(self, body: P._Sampling, prompt_len: int, param: str,
                          stop: tuple[str, ...]) -> GenerationConfig:
        """The request's GenerationConfig: the model's defaults (GenerationConfig.from_defaults, as the
        pipeline and the CLI), then the fields the request sets; its length checked against the
        cap and the context."""
        room = self.context - prompt_len
        if room < 0 or (room == 0 and body.max_tokens != 0):  # max_tokens 0 scores a prompt that fills the context
            raise APIError(400, f"This model's maximum context length is {self.context} tokens, and the "
                           f"prompt has {prompt_len} tokens, leaving no room to generate.",
                           param=param, code="context_length_exceeded")
        if body.max_tokens is not None and body.max_tokens > self.config.max_tokens:
            raise APIError(400, f"max_tokens={body.max_tokens} exceeds this server's cap of "
                           f"{self.config.max_tokens}", param="max_tokens")
        if body.max_tokens is not None and body.max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                           f"requested {prompt_len + body.max_tokens} tokens ({prompt_len} in the prompt, "
                           f"{body.max_tokens} for the completion).", param="max_tokens",
                           code="context_length_exceeded")
        base = GenerationConfig.from_defaults(self.defaults, self.vocab_size, self.tokenizer.sep_id)
        fields: dict[str, Any] = {
            "max_new_tokens": body.max_tokens if body.max_tokens is not None else min(
                base.max_new_tokens, self.config.max_tokens, room),
            "stop": stop,
            "seed": body.seed,
        }
        if body.temperature is not None:  # OpenAI: 0 is greedy, anything else samples
            fields.update(temperature=body.temperature, do_sample=body.temperature > 0)
        for name in ("top_k", "top_p", "repetition_penalty"):
            if getattr(body, name) is not None:
                fields[name] = getattr(body, name)
        try:
            return base.replace(**fields)
        except ValueError as err:  # a bound the protocol does not know (cannot happen with its limits)
            raise APIError(400, str(err)) from None

    @functools.cached_property
    def token_text(self) -> Callable[[int], tuple[str, int]]:
        """(what a token shows as, the length of the text it adds) for log-probabilities: its decoded
        text, or the name of a token that adds no text (a special token: "<sep>", length 0)."""
        name = getattr(self.tokenizer, "id_to_token", None)

        @functools.lru_cache(maxsize=1 << 16)
        def text(token: int) -> tuple[str, int]:
            piece = self.tokenizer.decode([token])
            return piece or (name(token) if name else None) or "", len(piece)

        return text

    def check_count(self, sequences: int) -> None:
        """Refuse, before any work, a request for more sequences than the queue could ever hold."""
        if sequences > self.config.max_queue:
            raise APIError(400, f"this request asks for {sequences} sequences (prompts x n); the server "
                           f"queues at most {self.config.max_queue}", param="n")

    def submit(self, requests: list[EngineRequest]) -> Handle:
        if self.runner is None or not self.runner.alive:
            raise APIError(503, "the engine is not running", type="server_error", headers={"Retry-After": "1"})
        try:
            return self.runner.submit(requests)
        except QueueFull as err:
            self.metrics.count(self.metrics.rejected)
            raise APIError(503, f"The server is busy ({err}); retry shortly.", type="server_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as err:
            raise APIError(400, str(err)) from None


def _requests(server: _Server, body: P._Sampling, prompts: list[list[int]], stop: tuple[str, ...],
              param: str, logprobs: int | None = None, prompt_logprobs: int | None = None) -> list[EngineRequest]:
    """One engine request per (prompt, choice); sequence k (= prompt i * n + choice j) of a seeded
    request samples with seed + k, the rule gpt3zh.generate follows for its rows. The prompt is
    scored (prompt_logprobs) once, by its first choice: the choices share it."""
    server.check_count(len(prompts) * body.n)
    out = []
    for i, ids in enumerate(prompts):
        cfg = server.generation_config(body, len(ids), param, stop)
        seeds = rows_config(cfg, (i + 1) * body.n)[i * body.n:]
        out += [EngineRequest(ids, c, index=i * body.n + j, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs if j == 0 else None) for j, c in enumerate(seeds)]
    return out


# ------------------------------------------------------------------------------------------ routes
def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses a route really gives, in OpenAI's error shape (for /openapi.json)."""
    return {code: {"model": P.ErrorResponse, "description": _ERROR_TEXT[code]} for code in codes}


_ERROR_TEXT = {400: "invalid request (OpenAI's invalid_request_error)", 401: "missing or wrong API key",
               404: "unknown model", 408: "the body did not arrive in time", 413: "body too large",
               415: "body is not JSON", 503: "busy (queue full; see Retry-After) or not running"}
_GENERATION_ERRORS = _errors(400, 401, 404, 408, 413, 415, 503)
# With stream: true, server-sent events, each `data: <a chunk as JSON>` (or an error object), then `data: [DONE]`.
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "description": "one server-sent event",
    "properties": {"data": {"type": "string", "description": "a chunk (JSON), an error (JSON) or [DONE]"},
                   "event": {"type": "string"}}}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with the responses the server really gives: client errors are 400s in OpenAI's
    shape (FastAPI's own 422 validation response never occurs)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=_version(), summary=app.summary, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _version() -> str:
    from .. import __version__

    return __version__


def _add_routes(app: FastAPI, server: _Server) -> None:
    auth = [Depends(server.check_key)]

    @app.get("/health", response_model=P.Health, responses=_errors(503))
    async def health():
        if server.runner is None or not server.runner.alive:
            raise APIError(503, "the engine thread is not running", type="server_error")
        return {"status": "ok", "model": server.model_id}

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
        **_errors(401)})
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files(__package__).joinpath("playground.html").read_text("utf-8"))

    @app.get("/v1/models", dependencies=auth, response_model=P.ModelList, responses=_errors(401))
    async def models():
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{name:path}", dependencies=auth, response_model=P.ModelCard, responses=_errors(401, 404))
    async def model(name: str):
        server.check_model(name)
        return _model_card(server)

    @app.post("/v1/completions", dependencies=auth, response_model=P.Completion,
              responses={200: {"content": _SSE}, **_GENERATION_ERRORS})
    async def completions(body: P.CompletionRequest, request: Request):
        server.check_model(body.model)
        server.check_count(len(body.prompts()) * body.n)
        prompts = await server.encode_all(body.prompts(), "prompt")
        echoes = [p if isinstance(p, str) else server.tokenizer.decode(p) for p in body.prompts()]
        scored = body.logprobs if body.echo else None
        handle = server.submit(_requests(server, body, prompts, body.stop_strings, "prompt", body.logprobs, scored))
        stream = _CompletionStream(server, body, handle, echoes, prompts)
        if body.stream:
            return _sse(stream.chunks(), handle, server)
        return await _respond(request, stream, handle, server)

    @app.post("/v1/chat/completions", dependencies=auth, response_model=P.ChatCompletion,
              responses={200: {"content": _SSE}, **_GENERATION_ERRORS})
    async def chat(body: P.ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        ids = (await server.encode_all([P.render_chat(body.messages)], "messages"))[0]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        handle = server.submit(_requests(server, body, [ids], P.CHAT_STOP + body.stop_strings, "messages", logprobs))
        stream = _ChatStream(server, body, handle)
        if body.stream:
            return _sse(stream.chunks(), handle, server)
        return await _respond(request, stream, handle, server)

    _add_tokenizer_routes(app, server, auth)


def _add_tokenizer_routes(app: FastAPI, server: _Server, auth: list) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info (lm-eval's remote tokenizer)."""

    @app.post("/tokenize", dependencies=auth, response_model=P.TokenizeResponse, responses=_errors(400, 401, 404))
    async def tokenize(body: P.TokenizeRequest):
        server.check_model(body.model)
        ids = await run_in_threadpool(_tokenize, server, body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": server.context, "tokens": ids}

    @app.post("/detokenize", dependencies=auth, response_model=P.DetokenizeResponse, responses=_errors(400, 401, 404))
    async def detokenize(body: P.DetokenizeRequest):
        server.check_model(body.model)
        bad = [t for t in body.tokens if t >= server.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {server.vocab_size})", param="tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info", dependencies=auth, response_model=P.TokenizerInfo, responses=_errors(401))
    async def tokenizer_info():
        specials = getattr(server.tokenizer, "specials", {})
        # The stop token gpt3zh's models end a text with (<sep>, ModelScope's eod_id) is their "eos".
        return {"tokenizer_class": type(server.tokenizer).__name__, "eos_token": specials.get("sep_token"),
                "bos_token": None, "pad_token": specials.get("pad_token"), "unk_token": specials.get("unk_token"),
                "model_max_length": server.context, "vocab_size": server.vocab_size}


def _tokenize(server: _Server, text: str, special: bool) -> list[int]:
    """What a string prompt of /v1/completions encodes to. A text that is exactly one special token
    ("<sep>") is that token, as Hugging Face tokenizers read their special tokens (lm-eval asks for
    the eos id this way). Without special tokens: less the ones the tokenizer adds around any text."""
    specials = {t: i for t in getattr(server.tokenizer, "specials", {}).values()
                if t and (i := _special_id(server.tokenizer, t)) is not None}
    if text in specials:
        return [specials[text]]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"the text is not valid Unicode: {err.reason} at character {err.start}",
                       param="prompt") from None
    ids = list(server.tokenizer.encode(text))
    if special:
        return ids
    around = list(server.tokenizer.encode(""))  # BERT: [CLS] [SEP]; most tokenizers: nothing
    head = next(k for k in range(len(around), -1, -1) if ids[:k] == around[:k])
    tail = around[head:]
    return ids[head:len(ids) - len(tail)] if tail and ids[len(ids) - len(tail):] == tail else ids[head:]


def _special_id(tokenizer, text: str) -> int | None:
    to_id = getattr(tokenizer, "token_to_id", None)
    return to_id(text) if to_id else None


def _model_card(server: _Server) -> dict[str, Any]:
    return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "gpt3zh",
            "max_model_len": server.context}


# ------------------------------------------------------------------------------------------ responses
class _Stream:
    """Reads a handle's events for all of a request's choices; subclasses shape them as OpenAI does."""

    def __init__(self, server: _Server, body: P._Sampling, handle: Handle, n_choices: int) -> None:
        self.server, self.body, self.handle, self.n_choices = server, body, handle, n_choices
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.texts = [""] * n_choices
        self.reasons: list[str | None] = [None] * n_choices
        self.usage = P.Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        self.done = False

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | PromptEvent | FinishEvent]]:
        finished, first = 0, True
        while finished < self.n_choices:
            ev = await self.handle.events.get()
            if ev is None:  # the disconnect watcher's sentinel
                return
            if first:
                first = False
                self.server.metrics.observe(self.server.metrics.ttft, time.perf_counter() - self.handle.submitted_at)
            if isinstance(ev, ErrorEvent):
                raise APIError(500, ev.message, type="server_error")
            index = ev.request.index
            if not isinstance(ev, PromptEvent):
                self.texts[index] += ev.text
            if isinstance(ev, FinishEvent):
                finished += 1
                self.reasons[index] = ev.reason
                self._count(index, ev)
            yield index, ev
        self.done = True

    def _count(self, index: int, ev: FinishEvent) -> None:
        u = self.usage
        # n choices of one prompt share that prompt: count it once, as OpenAI does.
        prompt = ev.prompt_tokens if index % self.body.n == 0 else 0
        self.usage = P.Usage(prompt_tokens=u.prompt_tokens + prompt,
                             completion_tokens=u.completion_tokens + ev.completion_tokens,
                             total_tokens=u.total_tokens + prompt + ev.completion_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)


class _TokenLogprobs:
    """One choice's log-probabilities in the completions shape (tokens, token_logprobs, top_logprobs,
    text_offset); text_offset = the summed text lengths of the tokens before, from the choice's start."""

    def __init__(self, text: Callable[[int], tuple[str, int]]) -> None:
        self.text = text
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.end = 0

    def add(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        piece, length = self.text(token)
        self.tokens.append(piece)
        self.text_offset.append(self.end)
        self.end += length
        if logprob is None:  # the first prompt token: nothing predicts it
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        alternatives = {self.text(i)[0]: _finite(lp) for i, lp in top or ()}
        alternatives.setdefault(piece, _finite(logprob))  # OpenAI: the chosen token is always listed
        self.token_logprobs.append(_finite(logprob))
        self.top_logprobs.append(alternatives)

    def take(self) -> P.CompletionLogprobs:
        """What was added since the last take (a streamed chunk's share), offsets kept running."""
        out = P.CompletionLogprobs(tokens=self.tokens, token_logprobs=self.token_logprobs,
                                   top_logprobs=self.top_logprobs, text_offset=self.text_offset)
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # OpenAI's value for "very unlikely": JSON has no -Infinity


class _CompletionStream(_Stream):
    prefix = "cmpl"

    def __init__(self, server, body: P.CompletionRequest, handle, echoes: list[str], prompts: list[list[int]]) -> None:
        super().__init__(server, body, handle, len(echoes) * body.n)
        self.echoes = [e for e in echoes for _ in range(body.n)] if body.echo else [""] * self.n_choices
        self.prompts = [p for p in prompts for _ in range(body.n)]
        self.scores = [_TokenLogprobs(server.token_text) for _ in range(self.n_choices)]

    @property
    def logprobs(self) -> bool:
        return self.body.logprobs is not None

    def _chunk(self, choices: list[P.CompletionChoice], usage=None) -> str:
        return P.Completion(id=self.id, model=self.server.model_id, choices=choices, usage=usage).model_dump_json()

    def _scored(self, index: int) -> P.CompletionLogprobs | None:
        return self.scores[index].take() if self.logprobs else None

    def _echo_prompt(self, ev: PromptEvent) -> list[int]:
        """The PromptEvent of a prompt's first choice scores every choice of that prompt."""
        first = ev.request.index
        for i in range(first, first + self.body.n):
            for tok, lp, top in zip(self.prompts[i], ev.logprobs, ev.top_logprobs):
                self.scores[i].add(tok, lp, top)
        return list(range(first, first + self.body.n))

    def _on(self, index: int, ev) -> list[int]:
        """Record an event's log-probabilities; return the choices with something new to send."""
        if isinstance(ev, PromptEvent):
            return self._echo_prompt(ev)
        if isinstance(ev, TokenEvent) and self.logprobs:
            self.scores[index].add(ev.token_id, ev.logprob, ev.top_logprobs)
        return [index]

    async def chunks(self) -> AsyncIterator[str]:
        scored_echo = self.body.echo and self.logprobs  # the echo chunk waits for the prompt's scores
        for i, echo in enumerate(self.echoes):
            if echo and not scored_echo:
                yield self._chunk([P.CompletionChoice(index=i, text=echo, finish_reason=None)])
        async for index, ev in self.events():
            for i in self._on(index, ev):
                if isinstance(ev, PromptEvent):
                    yield self._chunk([P.CompletionChoice(index=i, text=self.echoes[i], logprobs=self._scored(i),
                                                          finish_reason=None)])
                    continue
                reason = ev.reason if isinstance(ev, FinishEvent) else None
                if ev.text or reason or (self.logprobs and isinstance(ev, TokenEvent)):
                    yield self._chunk([P.CompletionChoice(index=i, text=ev.text, logprobs=self._scored(i),
                                                          finish_reason=reason)])
        if self.include_usage:
            yield self._chunk([], self.usage)

    async def collect(self) -> None:
        async for index, ev in self.events():
            self._on(index, ev)

    def body_json(self) -> dict:
        choices = []
        for i, (e, t, r) in enumerate(zip(self.echoes, self.texts, self.reasons)):
            scores = self.scores[i].take() if self.logprobs else None
            choices.append(P.CompletionChoice(index=i, text=e + t, logprobs=scores, finish_reason=r))
        return P.Completion(id=self.id, model=self.server.model_id, choices=choices, usage=self.usage).model_dump()


class _ChatStream(_Stream):
    prefix = "chatcmpl"

    def __init__(self, server, body: P.ChatCompletionRequest, handle) -> None:
        super().__init__(server, body, handle, body.n)
        self.content: list[list[P.TokenLogprob]] = [[] for _ in range(body.n)]

    def _chunk(self, choices: list[P.ChatChunkChoice], usage=None) -> str:
        return P.ChatCompletionChunk(id=self.id, model=self.server.model_id, choices=choices,
                                     usage=usage).model_dump_json()

    def _entry(self, token: int, logprob: float) -> P.TopLogprob:
        text = self.server.token_text(token)[0]
        return P.TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8")))

    def _on(self, index: int, ev) -> P.ChatLogprobs | None:
        if not (self.body.logprobs and isinstance(ev, TokenEvent)):
            return None
        top = [self._entry(i, lp) for i, lp in ev.top_logprobs or ()]
        entry = P.TokenLogprob(**self._entry(ev.token_id, ev.logprob).model_dump(), top_logprobs=top)
        self.content[index].append(entry)
        return P.ChatLogprobs(content=[entry])

    async def chunks(self) -> AsyncIterator[str]:
        roles = [P.ChatChunkChoice(index=i, delta=P.ChatDelta(role="assistant", content=""))
                 for i in range(self.n_choices)]
        yield self._chunk(roles)
        async for index, ev in self.events():
            reason = ev.reason if isinstance(ev, FinishEvent) else None
            scored = self._on(index, ev)
            if ev.text or scored is not None:
                yield self._chunk([P.ChatChunkChoice(index=index, delta=P.ChatDelta(content=ev.text), logprobs=scored)])
            if reason:
                yield self._chunk([P.ChatChunkChoice(index=index, delta=P.ChatDelta(), finish_reason=reason)])
        if self.include_usage:
            yield self._chunk([], self.usage)

    async def collect(self) -> None:
        async for index, ev in self.events():
            self._on(index, ev)

    def body_json(self) -> dict:
        choices = [P.ChatChoice(index=i, message={"role": "assistant", "content": t}, finish_reason=r,
                                logprobs=P.ChatLogprobs(content=self.content[i]) if self.body.logprobs else None)
                   for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
        return P.ChatCompletion(id=self.id, model=self.server.model_id, choices=choices, usage=self.usage).model_dump()


def _sse(chunks: AsyncIterator[str], handle: Handle, server: _Server) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        complete = False
        try:
            async for chunk in chunks:
                yield f"data: {chunk}\n\n"
            complete = True
        except APIError as err:  # the status line is sent: report in the stream, as OpenAI does
            complete = True
            yield f"data: {json.dumps({'error': _error_dict(err)}, ensure_ascii=False)}\n\n"
        finally:
            if not complete:  # the client went away (this generator was cancelled or closed)
                handle.cancel()
                server.metrics.count(server.metrics.cancelled)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _respond(request: Request, stream: _Stream, handle: Handle, server: _Server) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(request, handle))
    try:
        await stream.collect()
    finally:
        watcher.cancel()
    if not stream.done:
        handle.cancel()
        server.metrics.count(server.metrics.cancelled)
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return JSONResponse(stream.body_json())


async def _watch_disconnect(request: Request, handle: Handle, every: float = 0.2) -> None:
    """Cancel the request once its client disconnects (non-streaming responses only)."""
    while True:
        await asyncio.sleep(every)
        if await request.is_disconnected():
            handle.cancel()
            handle.events.put_nowait(None)
            return


# ------------------------------------------------------------------------------------------ errors
def _error_dict(err: APIError) -> dict[str, Any]:
    return {"message": err.message, "type": err.type, "param": err.param, "code": err.code}


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"We could not parse the JSON body of your request ({detail}).", code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "The request needs a JSON object body.", code="invalid_body")
    param = loc[0] if loc else None
    where = ".".join(loc)
    msg = first.get("msg", "invalid value")
    message = f"Invalid value for '{where}': {msg}" if where else msg
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {where}"
    return APIError(400, message, param=param, code=first.get("type"))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = {404: f"Unknown route {request.url.path}", 405: f"Method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message, type=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()


# ------------------------------------------------------------------------------------------ middleware
class _BodyLimit:
    """Read a POST body before any handler does (pure ASGI): refuse a non-JSON content type (415),
    a body over `limit` bytes (413), and a body that does not arrive within `timeout` seconds (408:
    a slow client cannot hold a connection open by trickling bytes)."""

    def __init__(self, app, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if kind != b"application/json":
            return await APIError(415, f"The request body must be JSON (Content-Type: application/json), got "
                                  f"{kind.decode('latin-1')!r}.", code="unsupported_media_type").response()(
                scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + self.timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                err = APIError(408, f"The request body did not arrive within {self.timeout:g} s.",
                               code="request_timeout", headers={"Connection": "close"})
                return await err.response()(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._too_large(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects are still seen

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        err = APIError(413, f"The request body is larger than this server's limit of {self.limit} bytes.",
                       code="request_too_large")
        await err.response()(scope, receive, send)


_ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/openapi.json",
           "/docs", "/tokenize", "/detokenize", "/tokenizer_info"}


class _Observe:
    """Count requests by route and status and time them until the response ends (pure ASGI)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, gone = time.perf_counter(), [None], [False]
        route = scope["path"] if scope["path"] in _ROUTES else "other"

        async def observed_receive():
            message = await receive()
            gone[0] = gone[0] or message["type"] == "http.disconnect"
            return message

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, observed_receive, observed_send)
        finally:
            # No response: the client went away first (499, nginx's "client closed request"), or a bug.
            code = status[0] if status[0] is not None else 499 if gone[0] else 500
            self.metrics.count(self.metrics.requests, 1, route, str(code))
            self.metrics.observe(self.metrics.latency, time.perf_counter() - start, route)


# ------------------------------------------------------------------------------------------ running
def serve(model: GPT | InferenceModel, tokenizer: Tokenizer, config: ServeConfig, model_id: str,
          defaults: GenerationDefaults | None = None, inference: InferenceOptions | None = None,
          runner: Runner | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    app = create_app(model, tokenizer, config, model_id, defaults, inference, runner)
    logger = logging.getLogger("gpt3zh")
    if not logger.handlers:  # the startup line (model, path, layout) beside uvicorn's own
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    uvicorn.Server(uvicorn_config(app, host=config.host, port=config.port, log_level="info")).run()


def uvicorn_config(app: FastAPI, **options: Any):
    """uvicorn's Config for the app: its HTTP protocol cuts off a client that has not sent a
    request's headers within the server's read_timeout (uvicorn itself waits for ever)."""
    import uvicorn

    from .http import timed_protocol

    timeout = app.state.server.config.read_timeout
    options = {"timeout_graceful_shutdown": 5, "lifespan": "on", **options}
    return uvicorn.Config(app, http=timed_protocol(timeout), **options)
