"""Generation through the one engine: KV cache vs full recompute, ragged batches, stopping, seeds,
the sampler's meaning of every option, and clear errors."""

import warnings

import pytest
import torch

from gpt3zh.config import GenerationConfig
from gpt3zh.engine import Request, TokenEvent
from gpt3zh.generation import generate, run, stream
from gpt3zh.inference import prepare
from gpt3zh.model import GPT
from gpt3zh.sampling import SamplingParams, sample

ROWS = [[5, 17, 25, 99, 3, 40, 2], [11, 22, 33], [7]]


@pytest.fixture
def model(tiny_config):
    return GPT(tiny_config).eval()


def full_recompute_greedy(model, row, n):
    """ModelScope's single-process loop: re-run the whole prefix each step, take the argmax."""
    ids = list(row)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def run_with_logprobs(model, rows, cfg):
    """[(token ids, their log-probabilities)] per row, from the engine's events."""
    reqs = [Request(row, cfg, index=i, logprobs=0) for i, row in enumerate(rows)]
    out = [([], []) for _ in rows]
    for events in run(model, reqs):
        for ev in events:
            if isinstance(ev, TokenEvent):
                out[ev.request.index][0].append(ev.token_id)
                out[ev.request.index][1].append(ev.logprob)
    return out


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "seed": 1, "top_k": 20, "repetition_penalty": 1.5}])
def test_cached_steps_equal_the_full_forward(model, options):
    # Each row's log-probabilities (and so its logits) must not depend on the cache or its
    # neighbours: feed the row's own tokens to the whole model and compare.
    cfg = GenerationConfig(max_new_tokens=9, **options)
    for row, (toks, lps) in zip(ROWS, run_with_logprobs(model, ROWS, cfg)):
        full = torch.log_softmax(model(torch.tensor([row + toks]))[0], -1)  # (T, V)
        want = full[len(row) - 1 : -1].gather(1, torch.tensor(toks)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lps), want, rtol=0, atol=1e-5)


def test_cached_steps_equal_the_full_forward_on_the_module_path(model):
    plain = prepare(model, cpu_kernels=False)
    assert "module decode step" in plain.description
    for row, (toks, lps) in zip(ROWS, run_with_logprobs(plain, ROWS, GenerationConfig(max_new_tokens=7))):
        full = torch.log_softmax(model(torch.tensor([row + toks]))[0], -1)
        want = full[len(row) - 1 : -1].gather(1, torch.tensor(toks)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lps), want, rtol=0, atol=1e-5)


def test_greedy_equals_full_recompute_argmax(model):
    for row in ROWS:
        assert generate(model, [row], max_new_tokens=12)[0] == full_recompute_greedy(model, row, 12)


def test_ragged_batch_equals_each_row_alone(model):
    batch = generate(model, ROWS, max_new_tokens=12)
    assert batch == [generate(model, [row], max_new_tokens=12)[0] for row in ROWS]
    assert [len(r) for r in batch] == [len(r) + 12 for r in ROWS]


def test_seeded_rows_equal_themselves_alone(model):
    # Row i of a seeded call samples with seed + i: the same tokens alone, whatever its neighbours.
    kw = dict(max_new_tokens=10, do_sample=True, seed=7, top_k=30, top_p=0.9, repetition_penalty=1.2)
    batch = generate(model, ROWS, **kw)
    for i, row in enumerate(ROWS):
        assert generate(model, [row], **{**kw, "seed": 7 + i})[0] == batch[i]


def test_tensor_prompts_and_zero_new_tokens(model):
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert generate(model, x, max_new_tokens=4) == generate(model, x.tolist(), max_new_tokens=4)
    assert generate(model, x, max_new_tokens=0) == x.tolist()
    assert list(stream(model, x, max_new_tokens=0)) == []


def test_each_row_stops_at_its_own_eos(model):
    free = generate(model, ROWS, max_new_tokens=10)
    eos = free[1][len(ROWS[1]) + 2]  # the third token row 1 generates
    out = generate(model, ROWS, max_new_tokens=10, eos_token_id=[eos, 127])
    for row, full, got in zip(ROWS, free, out):
        cont = full[len(row) :]
        want = cont[: cont.index(eos) + 1] if eos in cont else cont
        assert got == row + want
    assert out[1][-1] == eos


def test_stream_equals_generate(model):
    kw = dict(max_new_tokens=8, do_sample=True, seed=5, top_p=0.9)
    ref = generate(model, ROWS, **kw)
    eos = ref[0][len(ROWS[0]) + 1]
    ref = generate(model, ROWS, eos_token_id=eos, **kw)
    got = [list(r) for r in ROWS]
    for step in stream(model, ROWS, eos_token_id=eos, **kw):
        for b, tok in enumerate(step):
            if tok is not None:
                got[b].append(tok)
    assert got == ref


def test_seed_repeats_and_ignores_global_rng(model):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, seed=123)
    first = generate(model, ROWS, **kw)
    torch.manual_seed(999)
    assert generate(model, ROWS, **kw) == first
    assert generate(model, ROWS, **{**kw, "seed": 124}) != first


def test_unseeded_sampling_follows_the_global_generator(model):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5)
    torch.manual_seed(5)
    first = generate(model, ROWS, **kw)
    torch.manual_seed(5)
    assert generate(model, ROWS, **kw) == first


def test_greedy_special_cases(model):
    # temperature 0, top_k 1 and top_p 0 all mean greedy (the smallest candidate set), as in OpenAI's API.
    greedy = generate(model, ROWS, max_new_tokens=8)
    for options in ({"top_k": 1}, {"temperature": 0}, {"top_p": 0.0}, {"top_p": 1e-9}):
        assert generate(model, ROWS, max_new_tokens=8, do_sample=True, seed=0, **options) == greedy, options
    # top_k at or beyond the vocabulary, and top_p 1, filter nothing
    sampled = generate(model, ROWS, max_new_tokens=8, do_sample=True, seed=0)
    for options in ({"top_k": 128}, {"top_k": 10**30}, {"top_p": 1.0}):
        assert generate(model, ROWS, max_new_tokens=8, do_sample=True, seed=0, **options) == sampled, options


def test_extreme_options_stay_finite(model):
    # A temperature far below float32's range and the smallest / largest penalties still give tokens
    # from the distribution's support (no NaN -> token 0 fallout).
    greedy = generate(model, ROWS, max_new_tokens=6)
    assert generate(model, ROWS, max_new_tokens=6, do_sample=True, temperature=1e-300, seed=0) == greedy
    for penalty in (1e-6, 1e6):
        out = generate(model, ROWS, max_new_tokens=6, repetition_penalty=penalty)
        assert all(len(o) == len(r) + 6 for o, r in zip(out, ROWS))


def _params(**options):
    return SamplingParams.of([GenerationConfig(do_sample=True, **options)], "cpu")


def test_sampling_draws_from_the_filtered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rng = torch.Generator().manual_seed(0)

    def freq(**options):
        draws = [int(sample(probs.log()[None], _params(**options), None, [rng])) for _ in range(6000)]
        return torch.bincount(torch.tensor(draws), minlength=4) / len(draws)

    torch.testing.assert_close(freq(), probs, rtol=0, atol=0.02)
    # top_p=0.6: 0.5 alone does not reach 0.6, so 0.3 (the crossing token) is kept; the rest dropped.
    torch.testing.assert_close(freq(top_p=0.6), torch.tensor([0.625, 0.375, 0.0, 0.0]), rtol=0, atol=0.02)


def test_top_k_keeps_ties_and_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    rng = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, _params(top_k=2), None, [rng])) for _ in range(400)}
    assert draws == {0, 1, 2}  # both tokens tied with the 2nd largest are kept
    cold = [int(sample(logits, _params(temperature=0.05), None, [rng])) for _ in range(400)]
    assert cold.count(0) > 396


def test_rows_of_one_batch_sample_with_their_own_options():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    seen = torch.rand(4, 50) < 0.2
    configs = [GenerationConfig(), GenerationConfig(do_sample=True, temperature=0.7, top_k=5, seed=1),
               GenerationConfig(do_sample=True, top_p=0.6, repetition_penalty=1.3, seed=2),
               GenerationConfig(do_sample=True, temperature=1.3, top_k=10, top_p=0.8, seed=3)]

    def rngs():
        return [None if c.greedy else torch.Generator().manual_seed(c.seed) for c in configs]

    together = sample(logits, SamplingParams.of(configs, "cpu"), seen, rngs())
    alone = [int(sample(logits[r : r + 1], SamplingParams.of([c], "cpu"), seen[r : r + 1], [g]))
             for r, (c, g) in enumerate(zip(configs, rngs()))]
    assert together.tolist() == alone


def test_repetition_penalty_hf_convention():
    cfg = SamplingParams.of([GenerationConfig(repetition_penalty=2.0)], "cpu")
    logits = torch.tensor([[3.0, -1.0, 2.5, -0.5]])
    seen = torch.tensor([[True, True, False, False]])
    assert sample(logits, cfg, seen, [None]).tolist() == [2]  # 3.0 / 2 = 1.5 < 2.5
    seen = torch.tensor([[False, True, False, False]])
    logits = torch.tensor([[-0.2, -0.3, -4.0, -1.0]])
    # a seen negative logit is multiplied: -0.3 * 2 = -0.6, so -0.2 (unseen) stays best
    assert sample(logits, cfg, seen, [None]).tolist() == [0]
    logits = torch.tensor([[-0.5, -0.3, -4.0, -1.0]])
    assert sample(logits, cfg, seen, [None]).tolist() == [0]


def test_repetition_penalty_counts_prompt_tokens(model):
    row = [9, 9, 9]
    greedy = generate(model, [row], max_new_tokens=1)[0][-1]
    penal = generate(model, [row + [greedy]], max_new_tokens=1, repetition_penalty=1e6)[0][-1]
    assert penal not in row + [greedy]


def test_the_model_is_left_untouched(model):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generate(model, ROWS, max_new_tokens=3)
    assert model.training and model.cache_len == 0
    assert all(b.attn.kv_cache is None for b in model.blocks)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.head).__name__ == "TiedHead"  # no layer swapped on the caller's model


def test_context_limit(model, tiny_config):
    ctx = tiny_config.max_seq_len
    with pytest.warns(UserWarning, match=f"max_new_tokens=50 with a 40-token prompt exceeds the context of {ctx}"):
        out = generate(model, [[1] * 40], max_new_tokens=50)
    assert len(out[0]) == ctx
    with pytest.raises(ValueError, match=f"prompt of {ctx} tokens leaves no room .* context of {ctx} tokens"):
        generate(model, [[1] * ctx], max_new_tokens=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(generate(model, [[1] * 40], max_new_tokens=ctx - 40)[0]) == ctx


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_p": -0.1}, r"top_p must be in \[0, 1\] \(1 = off, 0 = greedy\), got -0.1"),
        ({"top_p": 1.5}, r"top_p must be in \[0, 1\] .*got 1.5"),
        ({"temperature": -0.1}, r"temperature must be >= 0 \(0 means greedy\), got -0.1"),
        ({"temperature": float("inf")}, r"temperature must be >= 0 .*got inf"),
        ({"top_k": -1}, r"top_k must be an int >= 0 \(0 = off\), got -1"),
        ({"max_new_tokens": -2}, r"max_new_tokens must be an int >= 0, got -2"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be in \[1e-06, 1e\+06\]"),
        ({"repetition_penalty": 1e-300}, r"repetition_penalty must be in"),
        ({"eos_token_id": -1}, r"eos_token_id must be None, a token id >= 0 or a list of them, got -1"),
        ({"eos_token_id": 500}, r"eos_token_id 500 is outside the vocabulary \[0, 128\)"),
        ({"do_sample": "yes"}, r"do_sample must be True or False"),
        ({"seed": 2**63}, r"seed must be < 2\*\*63"),
        ({"stop": "。"}, r"stop strings need text: give the engine \(or generate\) a tokenizer"),
        ({"topk": 3}, r"unknown generation option 'topk'; did you mean 'top_k'\?"),
        ({"dtype": "bfloat16"}, r"'dtype' is a per-model transform.*gpt3zh.prepare\(model, dtype=...\)"),
        ({"quantize": "int8"}, r"'quantize' is a per-model transform"),
    ],
)
def test_invalid_options(model, options, message):
    with pytest.raises(ValueError, match=message):
        generate(model, ROWS, **options)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([], r"prompts must be a non-empty list"),
        ([[1, 2], []], r"prompt 1 is empty"),
        ([1, 2, 3], r"prompt 0 must be a list of token ids, got 1"),
        ([[1, 128]], r"prompt 0 has token id 128 outside the vocabulary \[0, 128\)"),
        (torch.ones(3), r"integer \(B, T\) tensor"),
    ],
)
def test_invalid_prompts(model, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate(model, prompts)


def test_a_loaded_model_directory_starts_from_its_defaults(model, tmp_path):
    # As transformers' generate starts from generation_config.json: load_pretrained's result brings
    # the directory's stop ids and sampling settings; a bare GPT starts greedy with no stop id.
    from gpt3zh.checkpoint import load_pretrained, save_model
    from gpt3zh.config import GenerationDefaults

    free = generate(model, ROWS, max_new_tokens=10)
    eos = free[1][len(ROWS[1]) + 2]
    save_model(model, tmp_path / "m", generation=GenerationDefaults(eod_id=eos, top_k=1, tokens_to_generate=10))
    loaded = load_pretrained(tmp_path / "m")
    got = generate(loaded, ROWS)
    assert got == generate(model, ROWS, max_new_tokens=10, eos_token_id=eos)
    assert got[1][-1] == eos and len(got[1]) < len(free[1])
    assert generate(loaded, ROWS, eos_token_id=None) == free  # overridable
    assert [len(r) for r in generate(loaded, ROWS, max_new_tokens=3, eos_token_id=None)] == [len(r) + 3 for r in ROWS]
