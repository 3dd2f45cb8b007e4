"""The fast generation path (gpt3zh.fast, gpt3zh.quantize): compiled decode step, int8 weights, dtype.

Inductor compiles are slow on a small shared CPU, so every compiled call here uses one shape (batch
2, one cache bucket) per model: two compiles in all (fp32, int8).
"""

import gc
import subprocess
import sys
import weakref

import pytest
import torch

from conftest import ROOT
from gpt3zh import fast, generation
from gpt3zh.config import GPTConfig
from gpt3zh.model import GPT
from gpt3zh.quantize import QuantLinear, is_quantized, quantize_int8, quantize_per_channel

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]  # ragged: the short row is left-padded
NEW = 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=128, n_layer=2, n_head=4, d_model=32, max_seq_len=64, dropout=0.0, attn_dropout=0.0)
    return GPT(cfg).eval()


def option_sets(model):
    """Every sampling option the eager path has, plus a stop id that really fires in row 0."""
    eos = generation.generate(model, PROMPTS, max_new_tokens=NEW)[0][len(PROMPTS[0]) + 2]
    return [
        {},
        {"do_sample": True, "seed": 1},
        {"do_sample": True, "seed": 2, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3},
        {"repetition_penalty": 1.5, "eos_token_id": [eos, 3]},
    ]


def all_logits(model, **options):
    cfg = generation.GenerationConfig(max_new_tokens=NEW, **options)
    return torch.stack([logits for _, logits in generation.decode_steps(model, PROMPTS, cfg)])  # (steps, B, V)


def test_compiled_decoding_equals_eager(model):
    # fp32 on CPU: the compiled step may reorder float ops, so logits agree to 1e-5, tokens exactly.
    torch.testing.assert_close(all_logits(model, compile=True), all_logits(model), rtol=0, atol=1e-5)
    for options in option_sets(model):
        eager = generation.generate(model, PROMPTS, max_new_tokens=NEW, **options)
        assert generation.generate(model, PROMPTS, max_new_tokens=NEW, compile=True, **options) == eager, options
        streamed = list(generation.stream(model, PROMPTS, max_new_tokens=NEW, compile=True, **options))
        for row, full, prompt in zip(zip(*streamed), eager, PROMPTS):
            assert [t for t in row if t is not None] == full[len(prompt):]


def test_quantize_per_channel_rounds_to_nearest():
    w = torch.randn(24, 40) * torch.linspace(0.01, 3, 24)[:, None]  # rows of very different ranges
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(q.abs().amax(1), torch.full((24,), 127, dtype=torch.int8))  # absmax maps to 127


def test_quant_linear_error_is_the_bf16_activation_rounding_only():
    lin = torch.nn.Linear(48, 40)
    ql = QuantLinear.from_linear(lin)
    x = torch.randn(3, 5, 48)
    w = ql.weight.double() * ql.scale.double()[:, None]  # the dequantized weights, exactly
    ref = x.double() @ w.T + lin.bias.double()
    # CPU feeds bf16 activations to the int8 kernel: each |x| is rounded by at most 2^-8 relative, and
    # the sum is accumulated in fp32 (1e-5 slack).
    bound = (x.double().abs() @ w.abs().T) * 2.0**-8 + 1e-5
    assert torch.all((ql(x).double() - ref).abs() <= bound)


def test_quantize_int8_replaces_every_linear_and_the_head(model):
    q = quantize_int8(GPT(model.config).eval())
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert is_quantized(q) and q.head is q.lm_head and q.lm_head.weight.shape == (128, 32)
    assert fast.decode_model(q) is q  # the int8 layers are left alone, not wrapped as ChunkedLinear


def test_int8_logits_close_and_greedy_tokens_equal(model):
    idx = torch.tensor([PROMPTS[0] * 4])
    q = fast.prepared(model, "int8")
    with torch.inference_mode():
        ref, got = model(idx), q(idx)
    # Stated tolerance: int8 weights move the logits by < 2% of their spread (0.3% measured here).
    assert (got - ref).abs().max() < 0.02 * (ref.max() - ref.min())
    assert generation.generate(model, PROMPTS, max_new_tokens=NEW, quantize="int8") == generation.generate(
        model, PROMPTS, max_new_tokens=NEW)


def test_int8_compiled_equals_int8_eager_for_every_option(model):
    for options in option_sets(model):
        eager = generation.generate(model, PROMPTS, max_new_tokens=NEW, quantize="int8", **options)
        fast_ = generation.generate(model, PROMPTS, max_new_tokens=NEW, quantize="int8", compile=True, **options)
        assert fast_ == eager, options


def test_prepared_copies_once_and_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = fast.prepared(model, "int8")
    assert fast.prepared(model, "int8") is q and fast.prepared(model) is model
    assert not is_quantized(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bf = fast.prepared(model, dtype="bfloat16")
    assert bf.tok_emb.weight.dtype == torch.bfloat16 and model.tok_emb.weight.dtype == torch.float32
    out = generation.generate(model, PROMPTS, max_new_tokens=4, dtype="bfloat16")
    assert [len(r) for r in out] == [len(p) + 4 for p in PROMPTS]
    other = GPT(model.config).eval()
    q2 = fast.prepared(other, "int8")
    with torch.no_grad():
        other.blocks[0].mlp.fc.weight.mul_(2)  # an in-place weight change makes the cached copy stale
    assert fast.prepared(other, "int8") is not q2


@pytest.mark.parametrize(
    ("options", "message"),
    [({"compile": "yes"}, "compile must be True or False"), ({"quantize": "int4"}, "quantize must be None or one of"),
     ({"dtype": "fp8"}, "dtype must be one of float32, bfloat16, float16")],
)
def test_invalid_fast_options(options, message):
    with pytest.raises(ValueError, match=message):
        generation.GenerationConfig(**options)


@pytest.mark.slow
def test_gpu_suite_smoke_runs_end_to_end_on_cpu(tmp_path):
    docs = tmp_path / "bench.md"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--device", "cpu", "--docs", str(docs)],
        check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = docs.read_text()
    for impl in ("gpt3zh bfloat16 eager", "gpt3zh bfloat16 compiled", "transformers bfloat16",
                 "gpt3zh int8 compiled", "prefill 32 tokens", "gpt3zh compiled batch 2"):
        assert f"| smoke | {impl}" in table, impl


# ------------------------------------------------------------------- CPU decode: chunked GEMV
@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("rows", [1, 3, 8, 513])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_linear_equals_f_linear(rows, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 96, bias=bias)
    x = torch.randn(rows, 5, 48)[:, 0]  # a non-contiguous input
    for k in (1, 2, 4):
        chunked = fast.ChunkedLinear(lin.weight, lin.bias, k)
        with torch.no_grad():
            ref, got = torch.nn.functional.linear(x, lin.weight, lin.bias), chunked(x)
        assert got.shape == ref.shape == (rows, 96)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # leading dims kept: (B, T, in) -> (B, T, out)
        x3 = torch.randn(2, 1, 48)
        torch.testing.assert_close(fast.ChunkedLinear(lin.weight, lin.bias, 2)(x3), lin(x3), rtol=1e-6, atol=1e-6)


def test_chunked_linear_bf16_and_gradients():
    lin = torch.nn.Linear(32, 64).to(torch.bfloat16)
    x = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(fast.ChunkedLinear(lin.weight, lin.bias, 2)(x), lin(x), rtol=1e-2, atol=1e-2)
    x = torch.randn(2, 32, dtype=torch.bfloat16, requires_grad=True)
    y = fast.ChunkedLinear(lin.weight, lin.bias, 2)(x)  # needs gradients: F.linear itself
    y.sum().backward()
    assert lin.weight.grad is not None and x.grad is not None
    with pytest.raises(ValueError, match="63 output features do not split into 2"):
        fast.ChunkedLinear(torch.zeros(63, 4), None, 2)


def test_decode_model_shares_the_weights_and_follows_them(model, two_threads):
    view = fast.decode_model(model)
    assert view is not model and fast.decode_model(model) is view  # cached
    chunked = [m for m in view.modules() if isinstance(m, fast.ChunkedLinear)]
    assert len(chunked) == 4 * model.config.n_layer + 1  # every nn.Linear and the tied head
    assert not any(isinstance(m, fast.ChunkedLinear) for m in model.modules())  # the model is untouched
    assert "head" not in vars(model)
    for (name, p), (vname, vp) in zip(model.named_parameters(), view.named_parameters()):
        assert name == vname and vp is p  # nothing copied
    idx = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        torch.testing.assert_close(view(idx), model(idx), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an in-place update shows in the view at once
        model.blocks[0].mlp.fc.weight.mul_(1.5)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(fast.decode_model(model)(idx), model(idx), rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            model.blocks[0].mlp.fc.weight.div_(1.5)
    other = GPT(model.config)
    other.load_state_dict(model.state_dict(), assign=True)
    fresh = fast.decode_model(other)
    assert fresh is not view and next(fresh.parameters()) is next(other.parameters())
    torch.set_num_threads(1)
    assert fast.decode_model(model) is model  # one thread: nothing to split


def test_lean_step_equals_the_modules(model, two_threads, monkeypatch):
    view = fast.decode_model(model)
    step = fast.decode_step(view)
    assert isinstance(step, fast.LeanStep) and fast.decode_step(view) is step  # made once per view
    assert fast.decode_step(model) is None  # plain modules: the caller runs them
    view.train()
    assert fast.decode_step(view) is None  # dropout would be skipped: training mode runs the modules
    view.eval()
    # generation (shared cache slot, ragged rows, sampling): the same tokens and logits either way
    rows = [PROMPTS[0], PROMPTS[1][:1], PROMPTS[1]]
    cfg = generation.GenerationConfig(max_new_tokens=NEW, do_sample=True, seed=3, top_k=10, repetition_penalty=1.2)
    lean = list(generation.decode_steps(model, rows, cfg))
    monkeypatch.setattr(fast, "decode_step", lambda m: None)
    plain = list(generation.decode_steps(model, rows, cfg))
    assert len(lean) == len(plain) == NEW
    for (tok, logits), (ref_tok, ref_logits) in zip(lean, plain):
        assert tok.tolist() == ref_tok.tolist()
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # no padding (one row, two equal-length rows): the lean step runs without a mask
    for rows in ([PROMPTS[0]], [PROMPTS[0], PROMPTS[0][::-1]]):
        monkeypatch.undo()
        lean = list(generation.decode_steps(model, rows, cfg))
        monkeypatch.setattr(fast, "decode_step", lambda m: None)
        plain = list(generation.decode_steps(model, rows, cfg))
        for (tok, logits), (ref_tok, ref_logits) in zip(lean, plain):
            assert tok.tolist() == ref_tok.tolist()
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    # the serving engine's form: every row at its own slot (cache_pos (B, 1)), a bool mask
    torch.manual_seed(1)
    view.setup_kv_cache(2, 16)
    try:
        with torch.inference_mode():
            for block in view.blocks:
                block.attn.kv_cache.k.normal_()
                block.attn.kv_cache.v.normal_()
            before = [(b.attn.kv_cache.k.clone(), b.attn.kv_cache.v.clone()) for b in view.blocks]
            idx, pos = torch.tensor([[3], [9]]), torch.tensor([[2], [11]])
            mask = (torch.arange(16) <= pos[:, :, None])[:, None]  # (2, 1, 1, 16)
            ref = view.head(view.hidden(idx, pos, pos, mask)[:, -1])
            written = [(b.attn.kv_cache.k.clone(), b.attn.kv_cache.v.clone()) for b in view.blocks]
            for block, (k, v) in zip(view.blocks, before):
                block.attn.kv_cache.k.copy_(k)
                block.attn.kv_cache.v.copy_(v)
            got = step(view, idx, pos, pos, mask)
            assert got.shape == (2, model.config.vocab_size)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            for block, (k, v) in zip(view.blocks, written):  # the same cache slots written
                torch.testing.assert_close(block.attn.kv_cache.k, k, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(block.attn.kv_cache.v, v, rtol=1e-5, atol=1e-5)
            with pytest.raises(ValueError, match="without a mask needs one shared cache slot"):
                step(view, idx, pos, pos, None)
            with pytest.raises(ValueError, match=r"one new token per row, got idx of shape \(2, 2\)"):
                step(view, idx.repeat(1, 2), pos.repeat(1, 2), pos.repeat(1, 2), mask)
    finally:
        view.clear_kv_cache()


def test_lean_step_in_bf16_equals_the_modules(model, two_threads, monkeypatch):
    cfg = generation.GenerationConfig(max_new_tokens=8, dtype="bfloat16")
    lean = list(generation.decode_steps(model, PROMPTS, cfg))
    assert isinstance(fast.decode_step(fast.decode_model(fast.prepared(model, dtype="bfloat16"))), fast.LeanStep)
    monkeypatch.setattr(fast, "decode_step", lambda m: None)
    plain = list(generation.decode_steps(model, PROMPTS, cfg))
    for (tok, logits), (ref_tok, ref_logits) in zip(lean, plain):
        assert logits.dtype == torch.bfloat16 and tok.tolist() == ref_tok.tolist()
        torch.testing.assert_close(logits, ref_logits, rtol=1e-2, atol=1e-2)


def test_lean_step_with_unsplit_layers_and_no_leak(two_threads, monkeypatch):
    # vocab 127 does not split into 2 blocks: the head stays F.linear inside the lean step
    torch.manual_seed(2)
    cfg = GPTConfig(vocab_size=127, n_layer=2, n_head=4, d_model=32, max_seq_len=64, dropout=0.0, attn_dropout=0.0)
    odd = GPT(cfg).eval()
    view = fast.decode_model(odd)
    assert "head" not in vars(view) and isinstance(fast.decode_step(view), fast.LeanStep)
    rows = [PROMPTS[0], PROMPTS[1]]
    lean = list(generation.decode_steps(odd, rows, generation.GenerationConfig(max_new_tokens=6)))
    monkeypatch.setattr(fast, "decode_step", lambda m: None)
    plain = list(generation.decode_steps(odd, rows, generation.GenerationConfig(max_new_tokens=6)))
    for (tok, logits), (ref_tok, ref_logits) in zip(lean, plain):
        assert tok.tolist() == ref_tok.tolist()
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # the cached view and step never keep a dropped model's weights alive
    weight, view_ref = weakref.ref(odd.tok_emb.weight), weakref.ref(view)
    del odd, view, lean, plain
    gc.collect()
    assert weight() is None and view_ref() is None


def test_generation_with_chunked_layers_equals_plain_layers(model, two_threads, monkeypatch):
    rows = [PROMPTS[0], PROMPTS[1][:3]]
    got = generation.generate(model, rows, max_new_tokens=12)
    logits = [lg for _, lg in generation.decode_steps(model, rows, generation.GenerationConfig(max_new_tokens=12))]
    monkeypatch.setattr(fast, "decode_model", lambda m: m)
    assert generation.generate(model, rows, max_new_tokens=12) == got
    plain = [lg for _, lg in generation.decode_steps(model, rows, generation.GenerationConfig(max_new_tokens=12))]
    for a, b in zip(logits, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
