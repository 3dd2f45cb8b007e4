"""Every way in gives the same tokens and text: `generate`, `stream`, the pipeline and a real server
over HTTP (the `openai` client), for random combinations of every option (hypothesis).

The model is a tiny random GPT over a character tokenizer (one id per character), so the text of a
continuation is the characters of its ids: an independent reference for the detokenizer's output.
Sequence k of a call (prompt i, choice j: k = i * n + j) samples with seed + k on every path, so a
seeded or greedy sequence equals itself generated alone, also when it joins a running batch.
"""

from __future__ import annotations

import threading

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is in the [dev] extra")
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the [dev] extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpt3zh.config import GenerationConfig, GenerationDefaults, GPTConfig  # noqa: E402
from gpt3zh.generation import generate, stream  # noqa: E402
from gpt3zh.model import GPT  # noqa: E402
from gpt3zh.pipelines import TextGenerationPipeline  # noqa: E402
from gpt3zh.serve import ServeConfig, create_app  # noqa: E402
from gpt3zh.tokenizer import train_char_tokenizer  # noqa: E402
from serving import BackgroundServer  # noqa: E402

CHARS = "abcdefghij，。"
TOK = train_char_tokenizer([CHARS])  # <pad> <sep> <|endoftext|> <unk> \n, then the characters
V = TOK.vocab_size
CONFIG = GPTConfig(vocab_size=V, n_layer=2, n_head=2, d_model=16, max_seq_len=96, dropout=0.0,
                   attn_dropout=0.0, init_std=0.5)
# ModelScope-style defaults: eod = <sep> (also the tokenizer's sep), one extra stop id, top_p 0 = off
DEFAULTS = GenerationDefaults(eod_id=TOK.sep_id, extra_stop_ids=(TOK.token_to_id("。"),), top_p=0.0,
                              tokens_to_generate=8)
MODEL_ID = "paths"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    return GPT(CONFIG).eval()


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, TOK, ServeConfig(max_batch=4, max_queue=64, max_tokens=64), MODEL_ID, DEFAULTS)
    with BackgroundServer(app) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield srv


@pytest.fixture(scope="module")
def pipe(model):
    return TextGenerationPipeline(model, TOK, DEFAULTS)


OPTIONS = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.0, 0.4, 1.0, 1.8]),
    "top_k": st.sampled_from([0, 1, 3, V, V + 50]),
    "top_p": st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    "repetition_penalty": st.sampled_from([1.0, 1.4, 0.7]),
    "seed": st.integers(0, 2**40),
    "max_tokens": st.integers(1, 20),
    "n": st.integers(1, 2),
    "stop": st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=2), max_size=2),
    "prompts": st.lists(st.text(alphabet=CHARS, min_size=1, max_size=8), min_size=1, max_size=3),
})


def config_of(o: dict) -> GenerationConfig:
    """What the server makes of the request: the model's defaults, then the request's fields."""
    return GenerationConfig.from_defaults(DEFAULTS, V, TOK.sep_id).replace(
        max_new_tokens=o["max_tokens"], temperature=o["temperature"], do_sample=o["temperature"] > 0,
        top_k=o["top_k"], top_p=o["top_p"], repetition_penalty=o["repetition_penalty"], stop=tuple(o["stop"]),
        seed=o["seed"])


def expected_text(new_ids: list[int], cfg: GenerationConfig) -> tuple[str, str]:
    """(text, finish reason) of a continuation, from its ids alone (one character per id; special
    tokens have no text)."""
    ids = new_ids[:-1] if new_ids and new_ids[-1] in cfg.stop_ids else new_ids
    text = "".join(TOK.id_to_token(i) for i in ids if i not in TOK.special_ids)
    cuts = [text.find(s) for s in cfg.stop if s in text]
    if cuts:
        return text[: min(cuts)], "stop"
    return text, "stop" if len(ids) < len(new_ids) else "length"


def served(server, o: dict) -> dict[int, tuple[str, str]]:
    r = server.client.completions.create(
        model=MODEL_ID, prompt=o["prompts"], n=o["n"], max_tokens=o["max_tokens"], temperature=o["temperature"],
        top_p=o["top_p"], seed=o["seed"], stop=o["stop"] or None,
        extra_body={"top_k": o["top_k"], "repetition_penalty": o["repetition_penalty"]})
    return {c.index: (c.text, c.finish_reason) for c in r.choices}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(o=OPTIONS)
def test_generate_stream_pipeline_and_server_agree(model, server, pipe, o):
    cfg = config_of(o)
    n = o["n"]
    rows = [TOK.encode(p) for p in o["prompts"] for _ in range(n)]
    ids = generate(model, rows, cfg, tokenizer=TOK)
    new = [r[len(p):] for r, p in zip(ids, rows)]
    # stream: the same ids, step by step
    streamed = [[] for _ in rows]
    for step in stream(model, rows, cfg, tokenizer=TOK):
        for b, tok in enumerate(step):
            if tok is not None:
                streamed[b].append(tok)
    assert streamed == new
    # each sequence alone, with its own seed (seed + k), gives its row of the batch
    for k, row in enumerate(rows):
        assert generate(model, [row], cfg.replace(seed=cfg.seed + k), tokenizer=TOK)[0] == ids[k]
    # the server's text and finish reasons, and the pipeline's text, from the same ids
    want = [expected_text(c, cfg) for c in new]
    assert served(server, o) == dict(enumerate(want))
    options = {k: getattr(cfg, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                                             "repetition_penalty", "stop", "seed")}
    out = pipe(o["prompts"], num_return_sequences=n, return_full_text=False, **options)
    texts = [d["text"] for group in out for d in (group if n > 1 else [group])]
    assert texts == [t for t, _ in want]
    assert "".join(pipe.stream(o["prompts"][0], **options)) == want[0][0]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(o=OPTIONS)
def test_a_request_joining_a_running_batch_equals_itself_alone(model, server, o):
    alone = served(server, o)
    started = threading.Event()

    def long_stream():  # occupies a row and keeps the engine decoding while the request joins
        s = server.client.completions.create(model=MODEL_ID, prompt="abc", max_tokens=60, temperature=1.0,
                                             extra_body={"repetition_penalty": 1.0}, stream=True)
        for _ in s:
            started.set()

    t = threading.Thread(target=long_stream)
    t.start()
    started.wait(30)
    try:
        assert served(server, o) == alone
    finally:
        t.join(60)
