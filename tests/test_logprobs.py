"""Log-probabilities: the engine's prompt scoring, gpt3zh.scoring, the server's `logprobs` / `echo` /
`max_tokens: 0` (completions) and `logprobs` / `top_logprobs` (chat), and multiple-choice `gpt3zh eval`.

Every number is checked against log_softmax of the model's own logits over the whole sequence
(one plain forward, no KV cache), to 1e-5 in fp32, for prompt and completion tokens, alone and
in a batch of prompts of different lengths.
"""

from __future__ import annotations

import json

import pytest
import torch

from gpt3zh.config import GenerationConfig, GPTConfig
from gpt3zh.engine import Engine, FinishEvent, PromptEvent, Request, TokenEvent
from gpt3zh.model import GPT
from gpt3zh.scoring import encode_pair, loglikelihood, score
from gpt3zh.tokenizer import train_char_tokenizer

CHARS = "".join(chr(i) for i in range(32, 127)) + "床前明月光，疑是地上霜。举头望低思故乡"
TOK = train_char_tokenizer([CHARS])
CONFIG = GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=96, dropout=0.0,
                   attn_dropout=0.0, init_std=0.3)
TOL = 1e-5  # fp32 on CPU: the prefill / decode step against one full forward differ by float sum order only


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(7)
    return GPT(CONFIG).eval()


def reference(model: GPT, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) at every position i >= 1 from one full forward, (T - 1,)."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]  # (T, V)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def full_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]  # (T, V)


PROMPTS = ["床前明月光，疑是地上霜。", "ab", "举头望明月，低头思故乡。" * 3, "x"]


# ------------------------------------------------------------------------------------------ engine
@pytest.mark.parametrize("batched", [False, True])
def test_score_equals_log_softmax_of_the_models_logits(model, batched):
    rows = [TOK.encode(p) for p in PROMPTS]
    out = score(model, rows, top_logprobs=3) if batched else [score(model, [r], top_logprobs=3)[0] for r in rows]
    for ids, s in zip(rows, out):
        assert s.tokens == ids and s.logprobs[0] is None and s.top_logprobs[0] == []
        if len(ids) == 1:
            continue
        got = torch.tensor(s.logprobs[1:])
        torch.testing.assert_close(got, reference(model, ids), atol=TOL, rtol=0)
        lp = full_logprobs(model, ids)
        for i, top in enumerate(s.top_logprobs[1:]):
            want = lp[i].topk(3)
            assert [t for t, _ in top] == want.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in top]), want.values, atol=TOL, rtol=0)


def test_scoring_a_prompt_longer_than_a_chunk(model, monkeypatch):
    from gpt3zh import engine

    monkeypatch.setattr(engine, "SCORE_CHUNK", 7)  # many chunks over one prompt
    ids = TOK.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 3)
    got = torch.tensor(score(model, [ids])[0].logprobs[1:])
    torch.testing.assert_close(got, reference(model, ids), atol=TOL, rtol=0)


def test_engine_prompt_event_comes_before_the_first_token_and_score_only_samples_nothing(model):
    ids = TOK.encode("床前明月光，")
    gen = Request(ids, GenerationConfig(max_new_tokens=3), index=0, prompt_logprobs=0, logprobs=2)
    only = Request(ids, GenerationConfig(max_new_tokens=0), index=1, prompt_logprobs=1)
    with Engine(model, TOK, max_batch=2) as engine:
        engine.add([gen, only])
        events = []
        while engine.has_work:
            events += engine.step()
    mine = [e for e in events if e.request is gen]
    assert isinstance(mine[0], PromptEvent) and isinstance(mine[1], TokenEvent) and isinstance(mine[-1], FinishEvent)
    scored = [e for e in events if e.request is only]
    assert [type(e) for e in scored] == [PromptEvent, FinishEvent]
    assert scored[1].reason == "length" and scored[1].completion_tokens == 0 and scored[1].text == ""
    # the completion tokens' log-probabilities too (the decode steps, through the KV cache)
    tokens = [e for e in mine if isinstance(e, TokenEvent)]
    full = ids + [e.token_id for e in tokens]
    want = reference(model, full)[len(ids) - 1:]
    torch.testing.assert_close(torch.tensor([e.logprob for e in tokens]), want, atol=TOL, rtol=0)
    assert all(len(e.top_logprobs) == 2 for e in tokens)


def test_score_refuses_bad_input(model):
    with pytest.raises(ValueError, match="tokenizer"):
        score(model, ["text without a tokenizer"])
    with pytest.raises(ValueError, match="context is 96"):
        score(model, [[5] * 97])
    with pytest.raises(ValueError, match="prompt_logprobs"):
        Engine(model, max_batch=1).add([Request([5], GenerationConfig(max_new_tokens=0), prompt_logprobs=-1)])


def test_loglikelihood_splits_pairs_as_lm_eval_and_sums_the_continuation(model):
    ctx, cont = encode_pair(TOK, "床前明月光，", "疑是地上霜。")
    assert ctx == TOK.encode("床前明月光，") and ctx + cont == TOK.encode("床前明月光，疑是地上霜。")
    assert encode_pair(TOK, "a: ", "b") == (TOK.encode("a:"), TOK.encode("a: b")[2:])  # trailing space moves
    [ll] = loglikelihood(model, TOK, [("床前明月光，", "疑是地上霜。")])
    want = reference(model, ctx + cont)[len(ctx) - 1:]
    assert ll.tokens == len(cont) and abs(ll.logprob - float(want.sum())) < 1e-4
    lp = full_logprobs(model, ctx + cont)
    greedy = all(int(lp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
    assert ll.is_greedy == greedy
    with pytest.raises(ValueError, match="context must not be empty"):
        loglikelihood(model, TOK, [("", "x")])


# ------------------------------------------------------------------------------------------ server
openai = pytest.importorskip("openai", reason="the openai client is in the [dev] extra")
try:  # the HTTP client the openai package ships with (httpx2 in openai >= 3, httpx before)
    import httpx2 as httpx
except ImportError:
    import httpx

from gpt3zh.serve import ServeConfig, create_app
from serving import BackgroundServer


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, TOK, ServeConfig(max_batch=4, max_queue=32, max_tokens=32), model_id="lp")
    with BackgroundServer(app) as srv:
        yield srv


def post(server, body, path="/v1/completions"):
    return httpx.post(server.url + path, json=body, timeout=60)


def sse(server, body, path="/v1/completions") -> list[dict]:
    r = httpx.post(server.url + path, json={**body, "stream": True}, timeout=60)
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def shown(token: int) -> str:
    """How the server shows a token: its text, or the name of a special token (which adds no text)."""
    return TOK.decode([token]) or TOK.id_to_token(token)


def check_choice(model, ids: list[int], lp: dict, k: int, echo: bool) -> None:
    """A completion choice's logprobs against the model's own log_softmax over prompt + completion."""
    generated = [TOK.token_to_id(t) for t in lp["tokens"][len(ids) if echo else 0:]]
    full = ids + generated
    want = full_logprobs(model, full)  # (T, V)
    start = 0 if echo else len(ids)
    for j, (token, value, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
        i = start + j  # position in the full sequence
        assert TOK.token_to_id(token) == full[i]
        if i == 0:
            assert value is None and top is None
            continue
        assert abs(value - float(want[i - 1, full[i]])) < TOL
        best = want[i - 1].topk(k)
        expected = {shown(t): float(v) for t, v in zip(best.indices.tolist(), best.values)}
        expected.setdefault(token, float(want[i - 1, full[i]]))
        assert top.keys() == expected.keys() and all(abs(top[t] - expected[t]) < TOL for t in top)
    lengths = [len(TOK.decode([t])) for t in full[0 if echo else len(ids):]]
    assert lp["text_offset"] == [sum(lengths[:j]) for j in range(len(lengths))]


@pytest.mark.parametrize("k", [0, 1, 5])
def test_echo_logprobs_equal_log_softmax_alone_and_batched(server, model, k):
    body = {"max_tokens": 3, "logprobs": k, "echo": True, "temperature": 0}
    alone = [post(server, {**body, "prompt": p}).json()["choices"][0] for p in PROMPTS]
    batched = post(server, {**body, "prompt": PROMPTS}).json()["choices"]
    for p, a, b in zip(PROMPTS, alone, batched):
        assert a["text"] == b["text"] and a["text"].startswith(p)
        for choice in (a, b):
            check_choice(model, TOK.encode(p), choice["logprobs"], k, echo=True)


def test_completion_logprobs_without_echo_and_token_id_prompts(server, model):
    ids = TOK.encode("床前明月光，")
    choice = post(server, {"prompt": ids, "max_tokens": 4, "logprobs": 2, "temperature": 0}).json()["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == 4 and choice["logprobs"]["text_offset"][0] == 0
    check_choice(model, ids, choice["logprobs"], 2, echo=False)


def test_max_tokens_zero_scores_the_prompt_only(server, model):
    prompt = "床前明月光，疑是地上霜。"
    r = post(server, {"prompt": prompt, "max_tokens": 0, "logprobs": 1, "echo": True}).json()
    choice = r["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}
    check_choice(model, TOK.encode(prompt), choice["logprobs"], 1, echo=True)
    bare = post(server, {"prompt": prompt, "max_tokens": 0}).json()["choices"][0]
    assert bare["text"] == "" and bare["logprobs"] is None and bare["finish_reason"] == "length"
    # a prompt that fills the whole context can be scored (nothing is generated)
    full = post(server, {"prompt": "a" * CONFIG.max_seq_len, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert full.status_code == 200 and len(full.json()["choices"][0]["logprobs"]["tokens"]) == CONFIG.max_seq_len


def test_lm_eval_request_shape(server, model):
    """lm-eval's loglikelihood request: {max_tokens: 1, logprobs: 1, echo: true, temperature: 0} over
    token-id prompts; it sums token_logprobs[ctxlen:-1] (the last entry is the generated token)."""
    ctx, cont = encode_pair(TOK, "床前明月光，", "疑是地上霜。")
    body = {"prompt": [ctx + cont, ctx + TOK.encode("x")], "max_tokens": 1, "logprobs": 1, "echo": True,
            "temperature": 0, "seed": 1234}
    choices = post(server, body).json()["choices"]
    got = sum(choices[0]["logprobs"]["token_logprobs"][len(ctx):-1])
    [ll] = loglikelihood(model, TOK, [("床前明月光，", "疑是地上霜。")])
    assert abs(got - ll.logprob) < 1e-4
    assert len(choices[1]["logprobs"]["tokens"]) == len(ctx) + 2


def test_streamed_chunks_carry_the_same_logprobs(server):
    body = {"prompt": ["床前明月光，", "ab"], "max_tokens": 5, "logprobs": 2, "echo": True, "temperature": 0, "n": 2}
    whole = post(server, body).json()["choices"]
    chunks = sse(server, body)
    for choice in whole:
        parts = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert "".join(p["text"] for p in parts) == choice["text"]
        merged = {key: [x for p in parts if p["logprobs"] for x in p["logprobs"][key]] for key in choice["logprobs"]}
        assert merged["tokens"] == choice["logprobs"]["tokens"]
        assert merged["text_offset"] == choice["logprobs"]["text_offset"]
        assert all(abs(a - b) < TOL
                   for a, b in zip(merged["token_logprobs"][1:], choice["logprobs"]["token_logprobs"][1:]))


def test_chat_logprobs_and_top_logprobs(server, model):
    from gpt3zh.serve.protocol import ChatMessage, render_chat

    messages = [{"role": "user", "content": "床前明月光"}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    choice = post(server, body, "/v1/chat/completions").json()["choices"][0]
    content = choice["logprobs"]["content"]
    ids = TOK.encode(render_chat([ChatMessage(**m) for m in messages]))
    generated = [TOK.token_to_id(c["token"]) for c in content]
    want = full_logprobs(model, ids + generated)
    for j, c in enumerate(content):
        row = want[len(ids) - 1 + j]
        assert abs(c["logprob"] - float(row[generated[j]])) < TOL and c["bytes"] == list(c["token"].encode())
        assert [t["token"] for t in c["top_logprobs"]] == [shown(t) for t in row.topk(3).indices.tolist()]
    streamed = [x["choices"][0] for x in sse(server, body, "/v1/chat/completions") if x["choices"]]
    assert [c for s in streamed if s.get("logprobs") for c in s["logprobs"]["content"]] == content
    plain = post(server, {"messages": messages, "max_tokens": 2}, "/v1/chat/completions").json()["choices"][0]
    assert plain["logprobs"] is None
    via_client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="lp", messages=messages, max_tokens=2, logprobs=True, top_logprobs=1, temperature=0)
    assert len(via_client.choices[0].logprobs.content) == 2


@pytest.mark.parametrize(("body", "path", "param", "match"), [
    ({"prompt": "a", "logprobs": 6}, "/v1/completions", "logprobs", "0 to 5"),
    ({"prompt": "a", "logprobs": -1}, "/v1/completions", "logprobs", "0 to 5"),
    ({"prompt": "a", "logprobs": True}, "/v1/completions", "logprobs", None),
    ({"prompt": "a", "max_tokens": -1}, "/v1/completions", "max_tokens", None),
    ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "/v1/chat/completions", None,
     "needs logprobs: true"),
    ({"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21}, "/v1/chat/completions",
     "top_logprobs", "0 to 20"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, "/v1/chat/completions", "max_tokens", None),
])
def test_bad_logprob_requests_are_400s(server, body, path, param, match):
    r = post(server, body, path)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param is None or err["param"] == param
    assert match is None or match in err["message"]


def test_tokenizer_routes_for_lm_eval(server):
    text = "床前明月光，"
    ids = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert ids == {"count": len(text), "max_model_len": CONFIG.max_seq_len, "tokens": TOK.encode(text)}
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": text}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<sep>" and info["model_max_length"] == CONFIG.max_seq_len
    eos = httpx.post(server.url + "/tokenize", json={"prompt": "<sep>"}).json()["tokens"]
    assert eos == [TOK.sep_id]
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ------------------------------------------------------------------------------------------ eval
CHOICE_ROWS = [
    {"context": "床前明月光，", "choices": ["疑是地上霜。", "低头思故乡。", "举头望明月。"], "gold": 0},
    {"context": "举头望明月，", "choices": ["疑是地上霜。", "低头思故乡。"], "gold": 1},
    {"context": "ab", "choices": ["c", "cd", "x"], "gold": 2},
]


def test_multiple_choice_accuracy_is_the_models_argmax(model):
    from gpt3zh.evaluation import evaluate_choices

    out = evaluate_choices(model, TOK, CHOICE_ROWS)
    hits = hits_norm = 0
    for row in CHOICE_ROWS:
        lls = []
        for choice in row["choices"]:
            ctx, cont = encode_pair(TOK, row["context"], choice)
            lls.append(float(reference(model, ctx + cont)[len(ctx) - 1:].sum()))
        hits += max(range(len(lls)), key=lls.__getitem__) == row["gold"]
        norm = [ll / len(c) for ll, c in zip(lls, row["choices"])]
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == row["gold"]
    assert out["rows"] == 3 and out["acc"] == hits / 3 and out["acc_norm"] == hits_norm / 3
    assert out["examples"][0]["gold"] == "疑是地上霜。"


def test_eval_cli_on_multiple_choice_data(model, tmp_path, capsys):
    from gpt3zh.checkpoint import save_model
    from gpt3zh.cli import main

    save_model(model, tmp_path / "m", tokenizer=TOK)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in CHOICE_ROWS), encoding="utf-8")
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "choice" and result["rows"] == 3 and 0 <= result["acc"] <= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "gold": 2}) + "\n", encoding="utf-8")
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(bad)]) == 2
    assert "row 1 gold must be an index into its 2 choices, got 2" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--metric", "ppl"]) == 2
    assert "scored by --metric acc" in capsys.readouterr().err
