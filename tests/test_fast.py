"""The inference paths (gpt3zh.inference, gpt3zh.fast, gpt3zh.quantize): the compiled decode step,
int8 weights, dtype copies, the CPU decode layers and flat step, each equal to the plain modules.

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
from gpt3zh import ckernel, fast, generation, inference
from gpt3zh.config import GenerationConfig, GPTConfig, InferenceOptions
from gpt3zh.engine import Request, TokenEvent
from gpt3zh.inference import prepare
from gpt3zh.model import GPT
from gpt3zh.quantize import QuantLinear, is_quantized, quantize_int8, quantize_per_channel

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]  # ragged: rows at different slots
NEW = 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=128, n_layer=2, n_head=4, d_model=32, max_seq_len=64, dropout=0.0, attn_dropout=0.0)
    return GPT(cfg).eval()


def option_sets(model):
    """Every sampling option, plus a stop id that really fires in row 0."""
    eos = generation.generate(model, PROMPTS, max_new_tokens=NEW)[0][len(PROMPTS[0]) + 2]
    return [
        {},
        {"do_sample": True, "seed": 1},
        {"do_sample": True, "seed": 2, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3},
        {"repetition_penalty": 1.5, "eos_token_id": [eos, 3]},
    ]


def trace(model, rows, **options):
    """Per row: (tokens, the full log-probability vectors they were drawn from (steps, V))."""
    cfg = GenerationConfig(max_new_tokens=options.pop("max_new_tokens", NEW), **options)
    V = model.config.vocab_size
    reqs = [Request(row, c, index=i, logprobs=V) for i, (row, c) in enumerate(zip(rows, [cfg] * len(rows)))]
    toks, lps = [[] for _ in rows], [[] for _ in rows]
    for events in generation.run(model, reqs):
        for ev in events:
            if isinstance(ev, TokenEvent):
                toks[ev.request.index].append(ev.token_id)
                full = torch.full((V,), float("nan"))
                full[[i for i, _ in ev.top_logprobs]] = torch.tensor([v for _, v in ev.top_logprobs])
                lps[ev.request.index].append(full)
    return [(t, torch.stack(lp)) for t, lp in zip(toks, lps)]


def assert_same(a, b, tol=1e-5):
    for (ta, la), (tb, lb) in zip(a, b):
        assert ta == tb
        torch.testing.assert_close(la, lb, rtol=tol, atol=tol)


def test_compiled_decoding_equals_eager(model):
    # fp32 on CPU: the compiled step may reorder float ops, so logits agree to 1e-5, tokens exactly.
    compiled = prepare(model, compile=True)
    assert compiled.static_shapes and "compiled decode step" in compiled.description
    assert_same(trace(compiled, PROMPTS), trace(model, PROMPTS))
    for options in option_sets(model):
        eager = generation.generate(model, PROMPTS, max_new_tokens=NEW, **options)
        assert generation.generate(compiled, PROMPTS, max_new_tokens=NEW, **options) == eager, options
        streamed = list(generation.stream(compiled, PROMPTS, max_new_tokens=NEW, **options))
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


def test_quantize_int8_swaps_every_linear_and_the_head(model):
    q = quantize_int8(GPT(model.config).eval())
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert is_quantized(q) and isinstance(q.head, QuantLinear) and q.head.weight.shape == (128, 32)
    prepared = prepare(q)
    assert not any(isinstance(m, fast.ChunkedLinear) for m in prepared.module.modules())  # int8 layers stay


def test_int8_logits_close_and_greedy_tokens_equal(model):
    idx = torch.tensor([PROMPTS[0] * 4])
    q = prepare(model, quantize="int8")
    assert "int8 weights" in q.description
    with torch.inference_mode():
        ref, got = model(idx), q.module(idx)
    # Stated tolerance: int8 weights move the logits by < 2% of their spread (0.3% measured here).
    assert (got - ref).abs().max() < 0.02 * (ref.max() - ref.min())
    want = generation.generate(model, PROMPTS, max_new_tokens=NEW)
    assert generation.generate(q, PROMPTS, max_new_tokens=NEW) == want


def test_int8_compiled_equals_int8_eager_for_every_option(model):
    # A compiled step takes weight-only int8 (quantize="int8" picks it there); eager CPU would pick
    # dynamic int8 (tests/test_int8_dynamic.py), so the eager side asks for weight-only by name.
    eager_q, compiled_q = prepare(model, quantize="int8-weight"), prepare(GPT(model.config).eval(), quantize="int8",
                                                                           compile=True)
    assert "int8 weights" in compiled_q.description and "activations" not in compiled_q.description
    compiled_q.module.load_state_dict(eager_q.module.state_dict())
    for options in option_sets(model):
        eager = generation.generate(eager_q, PROMPTS, max_new_tokens=NEW, **options)
        assert generation.generate(compiled_q, PROMPTS, max_new_tokens=NEW, **options) == eager, options


def test_prepared_copies_once_and_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = prepare(model, quantize="int8")
    assert prepare(model, quantize="int8") is q  # cached
    assert not is_quantized(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bf = prepare(model, dtype="bfloat16")
    assert bf.module.tok_emb.weight.dtype == torch.bfloat16 and model.tok_emb.weight.dtype == torch.float32
    out = generation.generate(bf, PROMPTS, max_new_tokens=4)
    assert [len(r) for r in out] == [len(p) + 4 for p in PROMPTS]
    assert prepare(bf) is bf and prepare(model).module is not model  # a view: the model keeps no cache
    other = GPT(model.config).eval()
    q2 = prepare(other, quantize="int8")
    with torch.no_grad():
        other.blocks[0].mlp.fc.weight.mul_(2)  # an in-place weight change makes the cached copy stale
    assert prepare(other, quantize="int8") is not q2


def test_a_second_engine_gets_its_own_view(model):
    # Two engines over one prepared model at once (two threads, or a stream left open): the second
    # forks a view of the same tensors instead of sharing the first one's KV cache.
    prepared = prepare(model)
    first = generation.stream(prepared, PROMPTS, max_new_tokens=NEW)
    head = [next(first), next(first)]
    alone = generation.generate(prepared, PROMPTS, max_new_tokens=NEW)
    rest = list(first)
    streamed = [p + [t for t in row if t is not None] for p, row in zip(PROMPTS, zip(*(head + rest)))]
    assert streamed == alone


@pytest.mark.parametrize(
    ("options", "message"),
    [({"compile": "yes"}, "compile must be True or False"), ({"quantize": "int4"}, "quantize must be None or one of"),
     ({"dtype": "fp8"}, "dtype must be one of float32, bfloat16, float16"),
     ({"cpu_kernels": 1}, "cpu_kernels must be None"), ({"pack_weights": "yes"}, "pack_weights must be None"),
     ({"compyle": True}, "did you mean 'compile'")],
)
def test_invalid_inference_options(options, message):
    with pytest.raises(ValueError, match=message):
        InferenceOptions.from_dict(options)


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


@pytest.fixture(params=["C kernel", "torch kernels"])
def kernels(request, monkeypatch):
    """Each CPU-kernel test twice: with gpt3zh's C kernel (where it builds) and with torch's own
    kernels only (GPT3ZH_CKERNEL=0: what a machine without a C compiler runs). Yields the kernel or None."""
    ckernel._load.cache_clear()
    if request.param == "torch kernels":
        monkeypatch.setenv("GPT3ZH_CKERNEL", "0")
    elif ckernel.load() is None:
        pytest.skip(f"the C kernel does not build here: {ckernel.unavailable()}")
    yield ckernel.load()
    monkeypatch.delenv("GPT3ZH_CKERNEL", raising=False)
    ckernel._load.cache_clear()


def few_rows(kernel, threads, chunked="chunked GEMV over 2 threads"):
    """The description part of the few-row path."""
    if kernel is None:
        return chunked
    return f"1-{ckernel.MAX_ROWS} rows: gpt3zh's C kernel over {threads} thread{'s' * (threads > 1)}"


def unavailable(kernel):
    return "" if kernel is not None else ", C kernel unavailable: turned off by GPT3ZH_CKERNEL=0"


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


def test_cpu_kernels_share_the_weights_and_follow_them(model, two_threads, kernels):
    prepared = prepare(model, pack_weights=False)
    view = prepared.module
    assert prepared.description == f"cpu float32, {few_rows(kernels, 2)}{unavailable(kernels)}, flat decode step"
    assert view is not model and prepare(model, pack_weights=False) is prepared  # cached
    chunked = [m for m in view.modules() if isinstance(m, fast.ChunkedLinear)]
    assert len(chunked) == 4 * model.config.n_layer + 1  # every nn.Linear and the tied head
    assert not any(isinstance(m, fast.ChunkedLinear) for m in model.modules())  # the model is untouched
    for (name, p), (vname, vp) in zip(model.named_parameters(), view.named_parameters()):
        assert name == vname and vp is p  # nothing copied
    idx = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        torch.testing.assert_close(view(idx), model(idx), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an in-place update shows in the view at once
        model.blocks[0].mlp.fc.weight.mul_(1.5)
    try:
        assert prepare(model, pack_weights=False) is prepared
        with torch.inference_mode():
            torch.testing.assert_close(view(idx), model(idx), rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            model.blocks[0].mlp.fc.weight.div_(1.5)
    other = GPT(model.config)
    other.load_state_dict(model.state_dict(), assign=True)
    fresh = prepare(other, pack_weights=False)
    assert fresh is not prepared and next(fresh.module.parameters()) is next(other.parameters())
    torch.set_num_threads(1)
    # one thread: nothing to split; the C kernel still streams better than F.linear
    one = prepare(model, pack_weights=False)
    assert one.description == ("cpu float32, C kernel unavailable: turned off by GPT3ZH_CKERNEL=0, module decode step"
                               if kernels is None else f"cpu float32, {few_rows(kernels, 1)}, flat decode step")
    assert_same(trace(one, PROMPTS), trace(prepare(model, cpu_kernels=False), PROMPTS))
    assert prepare(model, cpu_kernels=False).description == "cpu float32, module decode step"


def test_packed_weights_follow_the_model(model, two_threads, kernels):
    prepared = prepare(model)  # the default on CPU when the copy fits: oneDNN-packed layers
    view = prepared.module
    size = inference.human_bytes(fast.packable_bytes(model))
    assert size.endswith(" KiB")
    rows = few_rows(kernels, 2, "one row: chunked GEMV over 2 threads")
    assert prepared.description == (f"cpu float32, oneDNN-packed weights (a {size} copy; {rows})"
                                    f"{unavailable(kernels)}, flat decode step")
    packed = [m for m in view.modules() if isinstance(m, fast.PackedLinear)]
    assert len(packed) == 4 * model.config.n_layer + 1  # every nn.Linear and the tied head
    assert not any(isinstance(m, fast.PackedLinear) for m in model.modules())  # the model is untouched
    for (name, p), (vname, vp) in zip(model.named_parameters(), view.named_parameters()):
        assert name == vname and vp is p  # the parameters are shared; the packed copies are extra
    rows = torch.tensor([PROMPTS[0][:2], PROMPTS[1][:2]])  # 4 rows: on the packed copies
    one = torch.tensor([PROMPTS[0]])  # a one-row batch: its T positions are T rows (packed); one[:, :1] one row

    def agree():  # rows[:, :1], one[:, :1]: the few-row path (C kernel or chunked GEMVs)
        with torch.inference_mode():
            for idx in (rows, rows[:, :1], one, one[:, :1], one[:, :3]):
                torch.testing.assert_close(view(idx), model(idx), rtol=1e-5, atol=1e-5)

    agree()
    with torch.no_grad():  # an in-place update: packed again at the next call
        model.blocks[0].mlp.fc.weight.mul_(1.5)
        model.tok_emb.weight.mul_(0.5)  # the tied head's copy follows the embedding
    try:
        assert prepare(model) is prepared
        agree()
    finally:
        with torch.no_grad():
            model.blocks[0].mlp.fc.weight.div_(1.5)
            model.tok_emb.weight.div_(0.5)
    old = model.blocks[1].attn.proj.weight.data
    model.blocks[1].attn.proj.weight.data = old * 2  # a new tensor behind the same Parameter
    try:
        agree()
    finally:
        model.blocks[1].attn.proj.weight.data = old
    fork = prepared.fork()  # a second engine's view shares the packed copies
    assert {id(m.packed) for m in fork.module.modules() if isinstance(m, fast.PackedLinear)} == {
        id(m.packed) for m in packed}
    torch.set_num_threads(1)  # one thread: packed, one-row inputs too (or on the C kernel)
    single = prepare(model)
    rows = "" if kernels is None else f"; {few_rows(kernels, 1)}"
    assert single.description == (f"cpu float32, oneDNN-packed weights (a {size} copy{rows})"
                                  f"{unavailable(kernels)}, flat decode step")
    assert_same(trace(single, PROMPTS[:1]), trace(prepare(model, cpu_kernels=False), PROMPTS[:1]))


def test_packing_is_skipped_when_the_copy_does_not_fit(model, two_threads, monkeypatch, kernels):
    need = fast.packable_bytes(model)
    monkeypatch.setattr(inference, "available_memory", lambda: 2 * need - 1)  # half of it is less than the copy
    assert prepare(model).description == f"cpu float32, {few_rows(kernels, 2)}{unavailable(kernels)}, flat decode step"
    monkeypatch.setattr(inference, "available_memory", lambda: 2 * need)
    other = GPT(model.config)  # prepare() decides once per model (cached): ask for another one
    other.load_state_dict(model.state_dict(), assign=True)
    assert "oneDNN-packed" in prepare(other).description
    with pytest.raises(ValueError, match="pack_weights=True needs a CPU model with compile=False"):
        prepare(model, pack_weights=True, compile=True)
    with pytest.raises(ValueError, match="pack_weights=True runs with the CPU kernels"):
        prepare(model, pack_weights=True, cpu_kernels=False)
    with pytest.raises(ValueError, match="pack_weights=True: the model has no plain linear layers to pack"):
        prepare(model, pack_weights=True, quantize="int8")


def test_lean_step_equals_the_modules(model, two_threads, kernels):
    lean, plain = prepare(model), prepare(model, cpu_kernels=False)
    assert isinstance(lean._lean, fast.LeanStep) and plain._lean is None
    assert lean._lean.kernel is kernels  # with the C kernel, one-slot steps attend through it too
    # shared slots (one row; two equal-length rows: no mask) and ragged rows (per-row slots, a mask),
    # with sampling: the same tokens and log-probabilities either way
    cfg = dict(do_sample=True, seed=3, top_k=10, repetition_penalty=1.2)
    for rows in ([PROMPTS[0]], [PROMPTS[0], PROMPTS[0][::-1]], [PROMPTS[0], PROMPTS[1][:1], PROMPTS[1]]):
        assert_same(trace(lean, rows, **cfg), trace(plain, rows, **cfg))
    # the step itself, every row at its own slot (cache_pos (B, 1)) with a bool mask, random cache
    view, step = lean.module, lean._lean
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
            got = step(view, idx, pos, pos, mask, None)
            assert got.shape == (2, model.config.vocab_size)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            for block, (k, v) in zip(view.blocks, written):  # the same cache slots written
                torch.testing.assert_close(block.attn.kv_cache.k, k, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(block.attn.kv_cache.v, v, rtol=1e-5, atol=1e-5)
            # no mask: one shared slot, attending to the first `slots` slots = the causal mask's view
            shared = torch.tensor([[5], [5]])
            ref = view.head(view.hidden(idx, shared, shared[0, :1], None, None, 6)[:, -1])
            torch.testing.assert_close(step(view, idx, shared, shared[0, :1], None, 6), ref, rtol=1e-5, atol=1e-5)
            with pytest.raises(ValueError, match=r"one new token per row, got idx of shape \(2, 2\)"):
                step(view, idx.repeat(1, 2), pos.repeat(1, 2), pos.repeat(1, 2), mask, None)
    finally:
        view.clear_kv_cache()


def test_lean_step_in_bf16_equals_the_modules(model, two_threads, kernels):
    lean, plain = prepare(model, dtype="bfloat16"), prepare(model, dtype="bfloat16", cpu_kernels=False)
    if fast.can_pack(torch.bfloat16):  # oneDNN bf16 (AVX-512): packed, one-row inputs too (or the C kernel)
        size = inference.human_bytes(fast.packable_bytes(model) // 2)  # bf16: half the fp32 bytes
        rows = "" if kernels is None else f"; {few_rows(kernels, 2)}"
        assert lean.description == (f"cpu bfloat16, oneDNN-packed weights (a {size} copy{rows})"
                                    f"{unavailable(kernels)}, flat decode step")
    else:
        assert lean.description == f"cpu bfloat16, {few_rows(kernels, 2)}{unavailable(kernels)}, flat decode step"
    for (ta, la), (tb, lb) in zip(trace(lean, PROMPTS, max_new_tokens=8), trace(plain, PROMPTS, max_new_tokens=8)):
        assert ta == tb
        torch.testing.assert_close(la, lb, rtol=2e-2, atol=2e-2)  # bf16 logits: 8 mantissa bits


def test_lean_step_with_unsplit_layers_and_no_leak(two_threads, kernels):
    # vocab 127 does not split into 2 blocks: the head stays F.linear inside the lean step (torch
    # kernels) or is one block on the C kernel
    torch.manual_seed(2)
    cfg = GPTConfig(vocab_size=127, n_layer=2, n_head=4, d_model=32, max_seq_len=64, dropout=0.0, attn_dropout=0.0)
    odd = GPT(cfg).eval()
    lean = prepare(odd, pack_weights=False)
    head = lean.module.head
    assert isinstance(lean._lean, fast.LeanStep)
    assert type(head).__name__ == "TiedHead" if kernels is None else (head.chunks, head.kernel) == (1, kernels)
    plain = prepare(odd, cpu_kernels=False)
    assert_same(trace(lean, PROMPTS, max_new_tokens=6), trace(plain, PROMPTS, max_new_tokens=6))
    packed = prepare(odd)  # packed: one-row inputs of the head on its packed copy too
    assert isinstance(packed.module.head, fast.PackedLinear) and packed.module.head.chunks == 0
    assert packed.module.blocks[0].mlp.fc.chunks == 2
    assert_same(trace(packed, PROMPTS, max_new_tokens=6), trace(plain, PROMPTS, max_new_tokens=6))
    del packed
    # the cached prepared copies never keep a dropped model's weights alive
    weight, view_ref = weakref.ref(odd.tok_emb.weight), weakref.ref(lean.module)
    del odd, lean, plain, head
    gc.collect()
    assert weight() is None and view_ref() is None


def test_generation_with_chunked_layers_equals_plain_layers(model, two_threads, kernels):
    rows = [PROMPTS[0], PROMPTS[1][:3]]
    assert_same(trace(model, rows), trace(prepare(model, cpu_kernels=False), rows))
    assert generation.generate(model, rows, max_new_tokens=12) == generation.generate(
        prepare(model, cpu_kernels=False), rows, max_new_tokens=12)
