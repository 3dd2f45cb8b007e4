"""The OpenAI-compatible server, driven over real HTTP on 127.0.0.1 with the real `openai` client.

The model is a tiny random GPT whose vocabulary is exactly a character tokenizer's (every id decodes
to one character, except 0 = unknown and 1 = the end-of-document id), so text compares token for
token. Weights are drawn wider than the default init so that greedy argmaxes have clear margins.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is in the [dev] extra")
try:  # the HTTP client the openai package ships with (httpx2 in openai >= 3, httpx before)
    import httpx2 as httpx
except ImportError:
    import httpx

from gpt3zh.assets import default_model_path
from gpt3zh.checkpoint import save_model
from gpt3zh.config import GenerationConfig, GenerationDefaults, GPTConfig
from gpt3zh.engine import Engine, QueueFull, Request
from gpt3zh.generation import generate
from gpt3zh.model import GPT
from gpt3zh.serve import ServeConfig, create_app
from gpt3zh.serve.protocol import CHAT_STOP, ChatMessage, render_chat
from gpt3zh.tokenizer import train_char_tokenizer
from serving import BackgroundServer

MODEL_ID = "tiny-char"
# Every character the tests type; the model's vocabulary is exactly the tokenizer's.
CHARS = "".join(chr(i) for i in range(32, 127)) + "系统用户助手：中国的首都是"
KEY = "sk-test-key"
TOK = train_char_tokenizer([CHARS])  # ids 0-3 are specials that decode to "", 4 is "\n", then one per character
EOD = 1  # <sep>: GenerationDefaults().eod_id (ModelScope's default) and the tokenizer's sep_id
CONFIG = GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=512,
                   dropout=0.0, attn_dropout=0.0, init_std=0.3)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(1234)
    return GPT(CONFIG).eval()


@pytest.fixture(scope="module")
def reference(model) -> GPT:
    """The same model for gpt3zh.generate (the engine works on its own prepared view of it)."""
    return model


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, TOK, ServeConfig(max_batch=8, max_queue=64, max_tokens=400, max_body_bytes=20_000),
                     model_id=MODEL_ID)
    with BackgroundServer(app) as srv:
        srv.engine = app.state.server.engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def generate_text(reference: GPT, prompt: str, n: int, **options) -> tuple[str, str]:
    """(continuation text, finish reason) from gpt3zh.generate, stopping at the eod id."""
    ids = TOK.encode(prompt)
    out = generate(reference, [ids], max_new_tokens=n, eos_token_id=EOD, **options)[0][len(ids):]
    return TOK.decode(out), "stop" if out and out[-1] == EOD else "length"


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


# ------------------------------------------------------------------------------------------ engine units
def test_engine_queue_is_bounded():
    engine = Engine(GPT(CONFIG), TOK, max_batch=1, max_queue=3)  # never stepped: nothing drains
    try:
        req = GenerationConfig(max_new_tokens=2)
        engine.add([Request([2, 3], req), Request([2, 3], req)])
        engine.add([Request([2, 3], req)])
        with pytest.raises(QueueFull):
            engine.add([Request([2, 3], req)])
        assert engine.waiting == 3
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.add([Request([CONFIG.vocab_size], req)])
    finally:
        engine.close()


def test_server_defaults_are_the_pipelines():
    # One mapping from a model directory's defaults to a GenerationConfig: <sep> stops under serve
    # as under generate and the pipeline (it used to be missing from the server's stop ids).
    from gpt3zh.pipelines import TextGenerationPipeline
    from gpt3zh.serve.app import _Server
    from gpt3zh.serve.protocol import CompletionRequest

    defaults = GenerationDefaults(eod_id=2, extra_stop_ids=(7,), top_k=1, top_p=0.0, tokens_to_generate=9)
    server = _Server(GPT(CONFIG), TOK, ServeConfig(), "m", defaults, None)
    got = server.generation_config(CompletionRequest(prompt="x"), 1, "prompt", ())
    pipe = TextGenerationPipeline(GPT(CONFIG), TOK, defaults)
    assert got == pipe.default_config()
    assert set(got.stop_ids) == {2, 7, TOK.sep_id} and got.greedy and got.top_p == 1.0


# ------------------------------------------------------------------------------------------ API
def test_health_models_and_playground(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": MODEL_ID}
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # No CDN or remote asset: every script and style is inline.
    assert "<script src" not in page.text and "https://" not in page.text and "/v1/completions" in page.text


@pytest.mark.parametrize("prompt", ["Hello", "中国的首都是", "x"])
def test_greedy_completion_equals_generate(server, client, reference, prompt):
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=40, temperature=0)
    text, reason = generate_text(reference, prompt, 40)
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(prompt)


def test_streaming_equals_non_streaming(client):
    kwargs = {"model": MODEL_ID, "prompt": "stream me", "max_tokens": 30, "temperature": 0}
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 5  # really streamed, token by token
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len("stream me")


def test_seeded_sampling_repeats_and_equals_generate(client, reference):
    opts = {"temperature": 0.9, "top_p": 0.8, "seed": 7}
    ext = {"top_k": 20}  # an extension: the openai client sends it through extra_body

    def served(**change):
        return client.completions.create(model=MODEL_ID, prompt="seed", max_tokens=25, extra_body=ext,
                                         **{**opts, **change}).choices[0].text

    text, _ = generate_text(reference, "seed", 25, do_sample=True, **opts, **ext)
    assert served() == served() == text
    assert served(seed=8) != text


def test_choices_of_a_seeded_request_follow_generate_rows(client, reference):
    # Sequence k (= prompt i * n + choice j) samples with seed + k, as row k of gpt3zh.generate.
    opts = {"temperature": 1.0, "top_p": 0.95, "seed": 40}
    r = client.completions.create(model=MODEL_ID, prompt=["ab", "cd"], n=2, max_tokens=12, **opts)
    got = {c.index: c.text for c in r.choices}
    ids = [TOK.encode(p) for p in ("ab", "ab", "cd", "cd")]
    rows = generate(reference, ids, max_new_tokens=12, eos_token_id=EOD, do_sample=True, **opts)
    assert [got[k] for k in range(4)] == [TOK.decode([t for t in r[len(i):] if t != EOD]) for i, r in zip(ids, rows)]


def test_top_p_zero_is_greedy_as_in_openai(client, reference):
    r = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=20, top_p=0, seed=3)
    assert r.choices[0].text == generate_text(reference, "Hello", 20)[0]


def test_list_prompts_n_and_echo(client, reference):
    r = client.completions.create(model=MODEL_ID, prompt=["ab", "cd"], n=2, max_tokens=10, temperature=0, echo=True)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    for i, prompt in enumerate(["ab", "cd"]):
        want = prompt + generate_text(reference, prompt, 10)[0]
        assert by_index[2 * i] == by_index[2 * i + 1] == want
    tokens = client.completions.create(model=MODEL_ID, prompt=TOK.encode("ab"), max_tokens=10, temperature=0)
    assert tokens.choices[0].text == by_index[0][2:]


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=40, temperature=0).choices[0].text
    stop = full[10:12]
    want = full[: full.index(stop)]
    cut = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=40, temperature=0, stop=[stop, "@@@"])
    assert cut.choices[0].text == want and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_chat_renders_the_template_and_streams(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=30, temperature=0)
    prompt = render_chat([ChatMessage(**m) for m in messages])
    assert prompt == "系统：be brief\n用户：hi\n助手："
    same = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=30, temperature=0, stop=list(CHAT_STOP))
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == same.choices[0].text
    assert r.choices[0].finish_reason == same.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_32_concurrent_streaming_clients_equal_their_solo_runs(server, client, reference):
    prompts = [f"{i}: {'abcdefghij'[i % 10] * (1 + i % 4)}" for i in range(32)]
    lengths = [20 + (i * 7) % 41 for i in range(32)]  # ragged: rows finish and new ones join mid-batch
    solo = [client.completions.create(model=MODEL_ID, prompt=p, max_tokens=n, temperature=0).choices[0].text
            for p, n in zip(prompts, lengths)]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt: str, n: int) -> str:
        stream = await aclient.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=n, temperature=0,
                                                  stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_clients():
        try:
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))
        finally:
            await aclient.close()

    steps_before = server.engine.steps
    together = asyncio.run(all_clients())
    assert together == solo
    assert solo == [generate_text(reference, p, n)[0] for p, n in zip(prompts, lengths)]
    # Batched for real: far fewer decode steps than tokens generated.
    assert server.engine.steps - steps_before < sum(len(t) for t in together) / 3


def test_concurrent_sampled_requests_each_equal_their_seeded_generate(server, reference):
    """Rows with different sampling options share every decode step; each still samples as alone."""
    options = [{"temperature": 0.7 + 0.1 * (i % 5), "top_p": (0.6, 0.9, 1.0)[i % 3], "seed": 100 + i,
                "top_k": (0, 5, 30)[i % 3], "repetition_penalty": (1.0, 1.3)[i % 2]} for i in range(12)]
    prompts = [f"s{i}" * (1 + i % 3) for i in range(12)]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt, opts):
        ext = {k: opts[k] for k in ("top_k", "repetition_penalty")}
        r = await aclient.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=30,
                                             temperature=opts["temperature"], top_p=opts["top_p"], seed=opts["seed"],
                                             extra_body=ext)
        return r.choices[0].text

    async def all_clients():
        try:
            return await asyncio.gather(*(one(p, o) for p, o in zip(prompts, options)))
        finally:
            await aclient.close()

    served = asyncio.run(all_clients())
    assert served == [generate_text(reference, p, 30, do_sample=True, **o)[0] for p, o in zip(prompts, options)]


def test_non_streaming_client_disconnect_cancels_the_request(model):
    app = create_app(model, TOK, ServeConfig(max_batch=1), model_id=MODEL_ID)
    with BackgroundServer(app) as srv:
        runner = app.state.server.runner
        engine = runner.engine
        runner.pause()  # the request waits in the queue until the engine runs again: no race with its end
        body = {"model": MODEL_ID, "prompt": "wait", "max_tokens": 5, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(srv.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
        for _ in range(100):  # the server polls for the disconnect
            if metric(srv, "gpt3zh_cancelled_total") == 1:
                break
            time.sleep(0.05)
        assert metric(srv, "gpt3zh_cancelled_total") == 1 and engine.waiting == 1
        runner.resume()
        for _ in range(100):
            if engine.waiting == 0:
                break
            time.sleep(0.05)
        assert engine.waiting == 0 and engine.running == 0 and engine.steps == 0  # dropped, never decoded
        assert post(srv, body).json()["choices"][0]["finish_reason"]  # and the server serves on


def test_client_disconnect_cancels_the_request(server):
    cancelled = metric(server, "gpt3zh_cancelled_total")
    body = {"model": MODEL_ID, "prompt": "long", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(100):  # bounded wait for the server to notice
        if metric(server, "gpt3zh_cancelled_total") > cancelled and server.engine.running == 0:
            break
        time.sleep(0.05)
    assert metric(server, "gpt3zh_cancelled_total") == cancelled + 1
    assert server.engine.running == 0


def test_metrics_exposition(server, client):
    client.completions.create(model=MODEL_ID, prompt="m", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("gpt3zh_requests_total", "gpt3zh_prompt_tokens_total", "gpt3zh_completion_tokens_total",
                 "gpt3zh_queue_depth", "gpt3zh_running_sequences", "gpt3zh_request_duration_seconds_bucket",
                 "gpt3zh_time_to_first_token_seconds_count"):
        assert name in text
    assert 'gpt3zh_requests_total{route="/v1/completions",status="200"}' in text
    assert metric(server, "gpt3zh_completion_tokens_total") >= 3


# ------------------------------------------------------------------------------------------ errors
def assert_openai_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def post(server, body, path="/v1/completions", **kw):
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, **kw)
    return httpx.post(server.url + path, json=body, **kw)


BAD_REQUESTS = [
    (b"{not json", 400, None, "invalid_json"),
    (b"", 400, None, None),
    (b"[1, 2]", 400, None, None),
    ({"model": MODEL_ID}, 400, "prompt", None),
    ({"prompt": "a", "temperature": 5}, 400, "temperature", None),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", None),
    ({"prompt": "a", "top_p": -0.1}, 400, "top_p", None),
    ({"prompt": "a", "top_k": 2**63}, 400, "top_k", None),  # was a 500 for the whole batch (int64 overflow)
    ({"prompt": "a", "top_k": 10**30}, 400, "top_k", None),
    ({"prompt": "a", "repetition_penalty": 1e-300}, 400, "repetition_penalty", None),  # underflowed to empty text
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens", None),  # strict types: a string is not an int
    ({"prompt": "a", "stream": "yes"}, 400, "stream", None),
    ({"prompt": [[False]]}, 400, "prompt", None),
    ({"prompt": [-1]}, 400, "prompt", None),
    ({"prompt": "a", "n": 0}, 400, "n", None),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens", None),
    ({"prompt": "a", "max_tokens": 401}, 400, "max_tokens", None),  # over the server's cap
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"prompt": "a", "frobnicate": 1}, 400, "frobnicate", "extra_forbidden"),
    ({"prompt": "a", "logprobs": 6}, 400, "logprobs", None),  # OpenAI's bound is 5
    ({"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty", None),
    ({"prompt": []}, 400, "prompt", None),
    ({"prompt": ""}, 400, "prompt", None),
    ({"prompt": [3, 99999]}, 400, "prompt", None),
    ({"prompt": "a" * 512}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": "a" * 200, "max_tokens": 350}, 400, "max_tokens", "context_length_exceeded"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"prompt": "a", "n": 65}, 400, "n", None),  # more sequences than the queue can ever hold
    ({"prompt": ["a"] * 40, "n": 2}, 400, "n", None),
    ({"prompt": "a", "n": 10**9}, 400, "n", None),  # refused before any work
    ({"prompt": "a", "seed": 2**63, "temperature": 1}, 400, "seed", None),
    ({"prompt": "a", "temperature": None, "top_p": 1.5}, 400, "top_p", None),
    (b'{"prompt": "\\ud800abc"}', 400, "prompt", None),  # a lone surrogate: valid JSON, not valid text
    (b'{"prompt": "a", "temperature": NaN}', 400, "temperature", None),
    (b"[" * 9_000 + b"]" * 9_000, 400, None, None),  # nested too deep for the parser
    (b'{"prompt": "\xff\xfe"}', 400, None, None),  # not UTF-8
]


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_REQUESTS)
def test_bad_completion_requests_get_openai_errors(server, body, status, param, code):
    assert_openai_error(post(server, body), status, param, code)


def test_bad_chat_requests_and_routes(server):
    chat = "/v1/chat/completions"
    assert_openai_error(post(server, {"messages": []}, chat), 400, "messages")
    assert_openai_error(post(server, {"messages": [{"role": "robot", "content": "x"}]}, chat), 400, "messages")
    assert_openai_error(post(server, {"messages": [{"role": "user", "content": "x" * 600}]}, chat), 400,
                        "messages", "context_length_exceeded")
    assert_openai_error(post(server, {"messages": [{"role": "user", "content": "x"}], "tools": []}, chat), 400,
                        "tools")
    assert_openai_error(post(server, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', chat), 400,
                        "messages")
    assert_openai_error(post(server, {"messages": [{"role": "user", "content": None}]}, chat), 400, "messages")
    assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(server.url + "/v1/completions"), 405)
    assert_openai_error(post(server, {"prompt": "a" * 30_000}), 413, code="request_too_large")


def test_openai_client_raises_on_errors_and_server_survives(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt="x" * 600, max_tokens=5)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=5)
    assert client.completions.create(model=MODEL_ID, prompt="ok", max_tokens=3).choices[0].text is not None


def test_api_key_is_required_when_set(model):
    app = create_app(model, TOK, ServeConfig(api_key=KEY, max_batch=2), model_id=MODEL_ID)
    with BackgroundServer(app) as srv:
        body = {"prompt": "a", "max_tokens": 2}
        assert_openai_error(post(srv, body), 401, code="invalid_api_key")
        assert_openai_error(post(srv, body, headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        assert_openai_error(httpx.get(srv.url + "/metrics"), 401)
        assert httpx.get(srv.url + "/health").status_code == 200  # liveness stays open
        wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        assert right.completions.create(model=MODEL_ID, prompt="a", max_tokens=2).choices[0].finish_reason


def test_full_queue_answers_503_with_retry_after(model):
    app = create_app(model, TOK, ServeConfig(max_batch=1, max_queue=1), model_id=MODEL_ID)
    with BackgroundServer(app) as srv:
        app.state.server.runner.pause()  # nothing drains the queue from here on: the test is deterministic
        body = {"prompt": "a", "max_tokens": 2, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=10):
            r = post(srv, {"prompt": "b", "max_tokens": 2})
            assert_openai_error(r, 503, code="queue_full")
            assert r.headers["retry-after"] == "1"
        assert metric(srv, "gpt3zh_rejected_total") == 1


# ------------------------------------------------------------------------------------------ the CLI
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli_server(*args: str) -> tuple[subprocess.Popen, str]:
    """`gpt3zh serve ARGS` in a real subprocess on a free port, once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "gpt3zh.cli", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited: {proc.stdout.read()}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start within 120 s")


def stop_cli_server(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to exit as killed by it.
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out
    return out


def test_serve_cli_serves_a_saved_model_directory(model, reference, tmp_path):
    save_model(model, tmp_path / "tiny", tokenizer=TOK)
    proc, url = start_cli_server("--model", str(tmp_path / "tiny"), "--api-key", KEY, "--max-batch", "4",
                                 "--max-queue", "8", "--host", "127.0.0.1")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny"]  # the directory name
        r = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0)
        assert r.choices[0].text == generate_text(reference, "Hello", 20)[0]
        assert_openai_error(httpx.get(url + "/v1/models"), 401, code="invalid_api_key")
    finally:
        out = stop_cli_server(proc)
    assert f"Uvicorn running on {url}" in out
    # OMP_NUM_THREADS=1: packed weights (the default where the copy fits), no chunked GEMVs; few rows
    # on the C kernel where it builds
    assert re.search(r"serving tiny: cpu float32, oneDNN-packed weights \(a \d+ KiB copy(; 1-3 rows: gpt3zh's C "
                     r"kernel over 1 thread)?\)(, C kernel unavailable: .*?)?, flat decode step, "
                     r"4 rows x 512 slots", out), out
    assert "(gpt3zh format, hf tokenizer)" in out


def test_serve_cli_without_model_uses_the_embedded_default(capsys):
    from gpt3zh.cli import main

    try:
        default_model_path()
    except FileNotFoundError:
        assert main(["serve", "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert "embedded default model is not installed" in err and "--model PATH" in err
        return
    proc, url = start_cli_server()
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["poetry-small"]
        r = client.completions.create(model="poetry-small", prompt="春", max_tokens=8, temperature=0)
        assert r.choices[0].text and r.usage.completion_tokens >= 1
    finally:
        stop_cli_server(proc)


def test_serve_cli_refuses_bad_options(capsys, tmp_path):
    from gpt3zh.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--max-batch", "zero"])
    assert main(["serve", "--model", str(tmp_path), "--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err


def test_stream_json_is_valid_sse(server):
    body = {"model": MODEL_ID, "prompt": "sse", "max_tokens": 5, "temperature": 0, "stream": True}
    r = post(server, body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])
