"""Serving defects an outside test found, each kept as a test: field bounds that were 500s, a long
prompt tokenized on the event loop, a client dropping during upload counted as a 500, slow clients
holding connections open, the published schema, and schemathesis against the server's own
/openapi.json (no 5xx, every response as documented)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is in the [dev] extra")
try:  # the HTTP client the openai package ships with (httpx2 in openai >= 3, httpx before)
    import httpx2 as httpx
except ImportError:
    import httpx

from gpt3zh.config import GenerationDefaults, GPTConfig  # noqa: E402
from gpt3zh.model import GPT  # noqa: E402
from gpt3zh.serve import ServeConfig, create_app  # noqa: E402
from gpt3zh.tokenizer import train_char_tokenizer  # noqa: E402
from serving import BackgroundServer  # noqa: E402

CHARS = "".join(chr(i) for i in range(32, 127)) + "床前明月光，。"
TOK = train_char_tokenizer([CHARS])
CONFIG = GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=2, d_model=16, max_seq_len=256, dropout=0.0,
                   attn_dropout=0.0, init_std=0.3)
MODEL_ID = "rel"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return GPT(CONFIG).eval()


def start(model, **config):
    settings = {"max_batch": 4, "max_queue": 32, "max_tokens": 16, "max_body_bytes": 1_200_000, **config}
    app = create_app(model, TOK, ServeConfig(**settings), MODEL_ID, GenerationDefaults(tokens_to_generate=8))
    return BackgroundServer(app)


@pytest.fixture(scope="module")
def server(model):
    with start(model, read_timeout=1.0) as srv:
        yield srv


def metric(server, name: str, **labels) -> float:
    total = 0.0
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.split()[-1])
    return total


def test_a_bad_field_fails_its_request_alone(server):
    # top_k >= 2**63 overflowed an int64 while a batch was prefilled: a 500 for every request in it
    good = {"model": MODEL_ID, "prompt": "ab", "max_tokens": 8, "temperature": 0, "stream": True}

    async def run():
        async with httpx.AsyncClient(timeout=30) as c:
            bad = c.post(server.url + "/v1/completions", json={**good, "top_k": 2**63, "stream": True})
            ok = c.post(server.url + "/v1/completions", json=good)
            return await asyncio.gather(bad, ok)

    bad, ok = asyncio.run(run())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"  # not 200 + an error event
    assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]") and '"error"' not in ok.text


def test_a_megabyte_prompt_does_not_stall_other_streams(server):
    big = "a" * 1_000_000  # tokenized off the event loop: /health keeps answering meanwhile

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            task = asyncio.create_task(c.post(server.url + "/v1/completions",
                                              json={"model": MODEL_ID, "prompt": big, "max_tokens": 1}))
            await asyncio.sleep(0.05)
            worst = 0.0
            while not task.done():
                t0 = time.perf_counter()
                assert (await c.get(server.url + "/health")).status_code == 200
                worst = max(worst, time.perf_counter() - t0)
                await asyncio.sleep(0.02)
            return await task, worst

    r, worst = asyncio.run(run())
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert worst < 0.5, worst  # was ~0.9 s while the event loop tokenized


def raw(server, data: bytes, wait: float = 0.0, read: bool = True) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        if wait:
            time.sleep(wait)
        if not read:
            return b""
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_a_client_that_drops_during_upload_is_not_a_500(server):
    before = metric(server, "gpt3zh_requests_total", status="500")
    gone = metric(server, "gpt3zh_requests_total", status="499")
    raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{\"prompt\": ", read=False)  # then closes mid-body
    for _ in range(100):
        if metric(server, "gpt3zh_requests_total", status="499") > gone:
            break
        time.sleep(0.05)
    assert metric(server, "gpt3zh_requests_total", status="499") == gone + 1
    assert metric(server, "gpt3zh_requests_total", status="500") == before


def test_slow_headers_and_slow_bodies_are_cut_off(server):
    t0 = time.perf_counter()
    assert raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n") == b""  # headers never end: closed
    assert time.perf_counter() - t0 < 5
    t0 = time.perf_counter()
    reply = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{")  # the body never comes
    assert b" 408 " in reply.split(b"\r\n")[0] and b"request_timeout" in reply
    assert time.perf_counter() - t0 < 5
    # and many slow-loris connections at once are all closed after the timeout; the server serves on
    socks = [socket.create_connection(tuple(server.url.removeprefix("http://").split(":")[:1]) +
                                      (int(server.url.rsplit(":", 1)[1]),)) for _ in range(50)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\n")
    time.sleep(2.0)
    closed = 0
    for s in socks:
        s.settimeout(2)
        try:
            closed += s.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed += 1
        s.close()
    assert closed == 50
    assert httpx.get(server.url + "/health").status_code == 200


def test_non_json_bodies_and_strict_types(server):
    r = httpx.post(server.url + "/v1/completions", content=b"prompt=hi",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"]
    for field, value in (("max_tokens", "5"), ("stream", "yes"), ("temperature", True), ("prompt", [[False]])):
        body = {"model": MODEL_ID, "prompt": "a", field: value}
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)


def test_tiny_temperatures_sample_the_maximum(server):
    # temperature <= 1e-38 underflowed to NaN probabilities and empty text
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "ab", "max_tokens": 8,
                                                            "temperature": 1e-300, "seed": 1})
    greedy = httpx.post(server.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "ab", "max_tokens": 8,
                                                                 "temperature": 0})
    assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"] != ""


def test_the_published_schema_is_what_the_server_answers(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in completions and {"200", "400", "401", "404", "413", "415", "503"} <= set(completions)
    assert "text/event-stream" in completions["200"]["content"]
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert httpx.get(server.url + "/docs").status_code == 200
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["n"]["maximum"] == 128 and props["top_k"]["anyOf"][0]["maximum"] == 2**31 - 1


schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the [dev] extra")


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_undocumented_response(model):
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks
    from schemathesis.generation import GenerationMode

    with start(model, read_timeout=5.0, max_tokens=4) as srv:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        failures, seen = [], {}

        def run(operation, mode):
            @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def check(case):
                response = case.call(base_url=srv.url, timeout=30)
                seen.setdefault(operation.path, set()).add(response.status_code)
                try:
                    case.validate_response(response, checks=[checks.not_a_server_error,
                                                             checks.status_code_conformance,
                                                             checks.content_type_conformance,
                                                             checks.response_schema_conformance])
                except Exception as err:  # collect, so one run reports every operation's failures
                    failures.append(f"{operation.method.upper()} {operation.path}: {err}")

            check()

        for result in schema.get_all_operations():
            operation = result.ok()
            run(operation, GenerationMode.POSITIVE)
            if operation.method.upper() == "POST":  # and bodies that break the schema
                run(operation, GenerationMode.NEGATIVE)
        assert not failures, "\n\n".join(failures[:5])
        # it really exercised the server: successes and refusals on the generation routes
        assert {200, 400} <= seen["/v1/completions"] and {200, 400} <= seen["/v1/chat/completions"], seen
        assert httpx.get(srv.url + "/health").status_code == 200


def test_create_app_needs_only_a_model_and_a_tokenizer(model):
    # it used to raise AttributeError reading config.max_body_bytes of a missing config
    with BackgroundServer(create_app(model, TOK)) as srv:
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "model": "gpt3zh"}
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
