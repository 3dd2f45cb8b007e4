"""Dynamic int8 (W8A8) on CPU: `quantize.Int8DynamicLinear` (fbgemm), what `prepare(quantize=...)`
chooses, and generation through it (every sampling option, ragged batches, the server), against
float32 within stated tolerances; the perplexity change on the embedded poetry model.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from conftest import DATA, ROOT
from gpt3zh import fast, generation
from gpt3zh.config import GPTConfig, InferenceOptions
from gpt3zh.inference import prepare
from gpt3zh.model import GPT
from gpt3zh.quantize import Int8DynamicLinear, QuantLinear, _has_vnni, quantize_int8_dynamic, scheme
from serving import BackgroundServer
from test_fast import NEW, PROMPTS, assert_same, option_sets, trace

POETRY_SMALL = ROOT / "src" / "gpt3zh" / "assets" / "poetry-small"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=128, n_layer=2, n_head=4, d_model=32, max_seq_len=64, dropout=0.0, attn_dropout=0.0)
    return GPT(cfg).eval()


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def dequantized(layer: Int8DynamicLinear) -> torch.Tensor:
    packed = torch.ops.quantized.linear_unpack(layer.packed)[0].dequantize().double()  # what fbgemm runs
    w = layer.weight.double() * layer.scale.double()[:, None]  # (N, K) = q * scale, exactly
    torch.testing.assert_close(packed, w, rtol=1e-7, atol=0)  # equal up to dequantize()'s float32 product
    return w


# ------------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_int8_dynamic_linear_error_is_the_activation_rounding_only(rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40)
    layer = Int8DynamicLinear.from_linear(lin)
    x = torch.randn(rows, 64) * torch.linspace(0.1, 8, rows)[:, None]  # rows of very different ranges
    w = dequantized(layer)
    ref = x.double() @ w.T + lin.bias.double()
    with torch.inference_mode():
        got = layer(x).double()
    # Each activation is rounded to its row's grid: one row: 255 steps over [min(x, 0), max(x, 0)]
    # (7 bits without VNNI: reduce_range); several rows: symmetric, absmax / 127 per row. The error
    # is at most half a step times sum |w| (int32 sums are exact; 1e-4 slack for the float epilogue).
    levels = 127 if _has_vnni() else 63
    lo, hi = x.double().clamp(max=0).amin(1), x.double().clamp(min=0).amax(1)
    step = (hi - lo) / (2 * levels + 1) if rows == 1 else x.double().abs().amax(1) / levels
    bound = step[:, None] / 2 * w.abs().sum(1) + 1e-4 * ref.abs().amax()
    assert torch.all((got - ref).abs() <= bound)
    assert (got - ref).abs().max() > 0  # the activations really are quantized


def test_int8_dynamic_rows_do_not_depend_on_their_batch():
    # Several rows: each row's grid comes from the row alone, so its output is bit-identical
    # whatever else shares the batch (int32 sums are exact).
    torch.manual_seed(1)
    layer = Int8DynamicLinear(torch.randn(48, 32), torch.randn(48))
    a, b, c = torch.randn(1, 32), torch.randn(4, 32) * 100, torch.randn(2, 32) * 1e-3
    with torch.inference_mode():
        ab, ca = layer(torch.cat([a, b])), layer(torch.cat([c, a, a]))
    assert torch.equal(ab[0], ca[2]) and torch.equal(ca[2], ca[3])  # c holds two rows


def test_int8_dynamic_linear_shapes_dtypes_and_device():
    layer = Int8DynamicLinear(torch.randn(24, 16), None)
    with torch.inference_mode():
        assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 24)
        y = layer(torch.randn(1, 1, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, 24)
    assert layer.weight.shape == (24, 16) and "int8 activations per row" in repr(layer)
    meta = torch.nn.Linear(16, 8, device="meta")
    with pytest.raises(ValueError, match="dynamic int8 runs on CPU"):
        Int8DynamicLinear.from_linear(meta)


# ----------------------------------------------------------------------------- what prepare picks
def test_prepare_picks_dynamic_int8_for_eager_cpu_and_weight_only_elsewhere(model, two_threads):
    dyn = prepare(model, quantize="int8")
    assert scheme(dyn.module) == "int8-dynamic" and "int8 weights and activations (fbgemm)" in dyn.description
    assert not any(type(m) is torch.nn.Linear for m in dyn.module.modules()) and isinstance(dyn._lean, fast.LeanStep)
    assert scheme(model) is None  # the model itself is untouched
    assert scheme(prepare(model, quantize="int8-weight").module) == "int8-weight"
    assert scheme(prepare(model, quantize="int8", dtype="bfloat16").module) == "int8-weight"
    assert isinstance(prepare(model, quantize="int8", dtype="bfloat16").module.head, QuantLinear)
    for bad in ({"dtype": "bfloat16"}, {"compile": True}):
        with pytest.raises(ValueError, match="quantize='int8-dynamic' runs eager float32 on CPU"):
            prepare(model, quantize="int8-dynamic", **bad)
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        InferenceOptions(quantize="int4")


def test_quantize_int8_dynamic_swaps_every_linear_and_the_head(model):
    q = quantize_int8_dynamic(GPT(model.config).eval())
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert scheme(q) == "int8-dynamic" and q.head.weight.shape == (128, 32)
    assert scheme(prepare(q).module) == "int8-dynamic"  # an int8 model is run as it is


def test_forks_share_the_packed_weights(model):
    q = prepare(model, quantize="int8-dynamic")
    # no float copy of the model is made: the int8 view shares the embeddings and norms
    assert q.module.tok_emb.weight is model.tok_emb.weight and q.module.ln_f.weight is model.ln_f.weight
    fork = q.fork()
    assert fork.module is not q.module and fork.module.head.packed is q.module.head.packed


# ----------------------------------------------------------------------------- generation
def test_int8_dynamic_logits_close_and_greedy_tokens_equal_fp32(model):
    idx = torch.tensor([PROMPTS[0] * 4])
    q = prepare(model, quantize="int8-dynamic")
    with torch.inference_mode():
        ref, got = model(idx), q.module(idx)
    # Stated tolerance: int8 weights and activations move the logits by < 2% of their spread
    # (0.4% measured here); greedy tokens of the test model equal fp32's.
    assert (got - ref).abs().max() < 0.02 * (ref.max() - ref.min())
    want = generation.generate(model, PROMPTS, max_new_tokens=NEW)
    assert generation.generate(q, PROMPTS, max_new_tokens=NEW) == want


def test_int8_dynamic_flat_step_equals_its_modules_for_every_option(model, two_threads):
    # The flat step calls the same layers as the modules (one-row and multi-row paths), so tokens
    # and log-probabilities agree to float rounding, for ragged batches and every sampling option.
    lean, plain = prepare(model, quantize="int8-dynamic"), prepare(model, quantize="int8-dynamic", cpu_kernels=False)
    assert isinstance(lean._lean, fast.LeanStep) and plain._lean is None
    for rows in ([PROMPTS[0]], PROMPTS, [PROMPTS[1][:1], PROMPTS[0], PROMPTS[1]]):
        assert_same(trace(lean, rows), trace(plain, rows))
    for options in option_sets(model):
        eager = generation.generate(plain, PROMPTS, max_new_tokens=NEW, **options)
        assert generation.generate(lean, PROMPTS, max_new_tokens=NEW, **options) == eager, options
        streamed = list(generation.stream(lean, PROMPTS, max_new_tokens=NEW, **options))
        for row, full, prompt in zip(zip(*streamed), eager, PROMPTS):
            assert [t for t in row if t is not None] == full[len(prompt):]


def test_int8_dynamic_ragged_batch_rows_equal_fp32_and_each_other(model, two_threads):
    # A ragged batch decodes through the multi-row path; each row's tokens equal fp32's (the
    # stated tolerance: greedy tokens of the test model), and a row's tokens do not depend on the
    # other rows of its batch (per-row grids), so two batches sharing a row agree on it.
    q = prepare(model, quantize="int8")
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[0][2:]]
    assert generation.generate(q, rows, max_new_tokens=NEW) == generation.generate(model, rows, max_new_tokens=NEW)
    other = [PROMPTS[1], PROMPTS[0][1:], PROMPTS[0][2:][::-1]]
    assert generation.generate(q, rows, max_new_tokens=NEW)[1] == generation.generate(q, other, max_new_tokens=NEW)[0]


def test_server_serves_dynamic_int8(model):
    from gpt3zh.serve import ServeConfig, create_app
    from gpt3zh.tokenizer import train_char_tokenizer

    tok = train_char_tokenizer(["abcdefghijklmnopqrstuvwxyz ,."])
    torch.manual_seed(3)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=64, dropout=0.0,
                    attn_dropout=0.0, init_std=0.3)
    tiny = GPT(cfg).eval()
    app = create_app(tiny, tok, ServeConfig(max_batch=4, max_tokens=32), "int8",
                     inference=InferenceOptions(quantize="int8"))
    prompts = ["hello", "a b c", "zz"]
    with BackgroundServer(app) as srv:
        assert "int8 weights and activations (fbgemm)" in app.state.server.engine.prepared.description
        body = {"model": "int8", "prompt": prompts, "max_tokens": 12, "temperature": 0}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    ids = [tok.encode(p) for p in prompts]
    q = prepare(tiny, quantize="int8")  # the same batch (one request, three prompts) through generate

    def texts_of(m):  # the server stops at the default eod id (<sep>, 1), which decodes to ""
        return [tok.decode(out[len(p):]) for p, out in zip(ids, generation.generate(m, ids, max_new_tokens=12,
                                                                                    eos_token_id=1))]
    assert texts == texts_of(q)


# ----------------------------------------------------------------------------- quality
@pytest.mark.skipif(not (POETRY_SMALL / "model.safetensors").is_file(), reason="poetry-small is not installed")
def test_int8_dynamic_perplexity_on_poetry_small_within_one_percent():
    import gpt3zh

    test = DATA / "poetry" / "test.jsonl"
    if not test.is_file():
        pytest.skip(f"{test} not found")
    model, tok = gpt3zh.load_model(POETRY_SMALL).eval(), gpt3zh.load_tokenizer(POETRY_SMALL)
    texts = [json.loads(line)["src_txt"] for line in test.read_text(encoding="utf-8").splitlines()[:48]]
    rows = [torch.tensor([(tok.encode(t) + [tok.eod_id])[: model.config.max_seq_len]]) for t in texts]
    q = prepare(model, quantize="int8-dynamic").module
    nll = {}
    with torch.inference_mode():
        for name, m in (("fp32", model), ("int8", q)):
            total, n = 0.0, 0
            for idx in rows:
                logits = m(idx[:, :-1])[0]
                total += torch.nn.functional.cross_entropy(logits, idx[0, 1:], reduction="sum").item()
                n += idx.shape[1] - 1
            nll[name] = total / n
    change = math.exp(nll["int8"] - nll["fp32"]) - 1
    assert abs(change) <= 0.01, f"int8 perplexity change {change:+.3%}"


def test_cli_generate_quantize_int8_says_which_path(tmp_path, capsys):
    from gpt3zh.checkpoint import save_model
    from gpt3zh.cli import main
    from gpt3zh.tokenizer import train_char_tokenizer

    tok = train_char_tokenizer(["abcdefgh"])
    torch.manual_seed(4)
    tiny = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=16, max_seq_len=32, dropout=0.0,
                         attn_dropout=0.0))
    save_model(tiny, tmp_path / "m", tokenizer=tok)
    args = ["generate", "--model", str(tmp_path / "m"), "--verbose", "--no-do-sample", "--max-new-tokens", "4"]
    assert main([*args, "--quantize", "int8", "abc"]) == 0
    out, err = capsys.readouterr()
    assert "int8 weights and activations (fbgemm)" in err and out.startswith("abc")
    assert main([*args, "--quantize", "int8-weight", "abc"]) == 0
    err = capsys.readouterr().err
    assert "int8 weights" in err and "activations" not in err
    with pytest.raises(SystemExit):
        main([*args, "--quantize", "int4", "abc"])
