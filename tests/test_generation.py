import warnings

import pytest
import torch

from gpt3zh.generation import GenerationConfig, decode_steps, generate, sample, stream
from gpt3zh.model import GPT

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


def test_cached_step_logits_equal_full_forward(model):
    cfg = GenerationConfig(max_new_tokens=9)
    steps = list(decode_steps(model, ROWS, cfg))
    for b, row in enumerate(ROWS):
        ids = row + [int(tok[b]) for tok, _ in steps]
        full = model(torch.tensor([ids]))[0]  # (T, V)
        cached = torch.stack([logits[b] for _, logits in steps])  # (steps, V)
        torch.testing.assert_close(cached, full[len(row) - 1 : -1], rtol=0, atol=1e-5)


def test_greedy_equals_full_recompute_argmax(model):
    for row in ROWS:
        assert generate(model, [row], max_new_tokens=12)[0] == full_recompute_greedy(model, row, 12)


def test_ragged_batch_equals_each_row_alone(model):
    batch = generate(model, ROWS, max_new_tokens=12)
    assert batch == [generate(model, [row], max_new_tokens=12)[0] for row in ROWS]
    assert [len(r) for r in batch] == [len(r) + 12 for r in ROWS]


def test_ragged_sampling_with_penalty_equals_rows_alone_in_logits(model):
    # Sampled tokens depend on the batch's random draws, but each row's logits must not depend on
    # its neighbours: feed the batch's tokens to each row alone and compare.
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, seed=1, top_k=20, repetition_penalty=1.5)
    steps = list(decode_steps(model, ROWS, cfg))
    for b, row in enumerate(ROWS):
        ids = row + [int(tok[b]) for tok, _ in steps]
        full = model(torch.tensor([ids]))[0]
        torch.testing.assert_close(torch.stack([lg[b] for _, lg in steps]), full[len(row) - 1 : -1], rtol=0, atol=1e-5)


def test_tensor_prompts_and_zero_new_tokens(model):
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert generate(model, x, max_new_tokens=4) == generate(model, x.tolist(), max_new_tokens=4)
    assert generate(model, x, max_new_tokens=0) == x.tolist()


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


def test_greedy_special_cases(model):
    greedy = generate(model, ROWS, max_new_tokens=8)
    assert generate(model, ROWS, max_new_tokens=8, do_sample=True, top_k=1, seed=0) == greedy
    assert generate(model, ROWS, max_new_tokens=8, do_sample=True, temperature=0) == greedy
    # top_p tiny keeps only the most likely token (the one that crosses p)
    assert generate(model, ROWS, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=0) == greedy


def test_sampling_draws_from_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    rng = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample(logits, GenerationConfig(do_sample=True), None, rng), minlength=4) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), rtol=0, atol=0.015)
    # top_p=0.6: 0.5 alone does not reach 0.6, so 0.3 (the crossing token) is kept; the rest dropped.
    draws = sample(logits, GenerationConfig(do_sample=True, top_p=0.6), None, rng)
    freq = torch.bincount(draws, minlength=4) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), rtol=0, atol=0.015)


def test_top_k_keeps_ties_and_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]]).expand(4000, 4)
    rng = torch.Generator().manual_seed(0)
    draws = sample(logits, GenerationConfig(do_sample=True, top_k=2), None, rng)
    assert set(draws.tolist()) == {0, 1, 2}  # both tokens tied with the 2nd largest are kept
    cold = sample(logits, GenerationConfig(do_sample=True, temperature=0.05), None, rng)
    assert (cold == 0).float().mean() > 0.99


def test_repetition_penalty_hf_convention():
    logits = torch.tensor([[3.0, -1.0, 2.5, -0.5]])
    seen = torch.tensor([[True, True, False, False]])
    cfg = GenerationConfig(repetition_penalty=2.0)
    assert sample(logits, cfg, seen, None).tolist() == [2]  # 3.0 / 2 = 1.5 < 2.5
    seen = torch.tensor([[False, True, False, False]])
    logits = torch.tensor([[-0.2, -0.3, -4.0, -1.0]])
    # a seen negative logit is multiplied: -0.3 * 2 = -0.6, so -0.2 (unseen) stays best
    assert sample(logits, cfg, seen, None).tolist() == [0]
    logits = torch.tensor([[-0.5, -0.3, -4.0, -1.0]])
    assert sample(logits, cfg, seen, None).tolist() == [0]


def test_repetition_penalty_counts_prompt_tokens(model):
    row = [9, 9, 9]
    greedy = generate(model, [row], max_new_tokens=1)[0][-1]
    penal = generate(model, [row + [greedy]], max_new_tokens=1, repetition_penalty=1e6)[0][-1]
    assert penal not in row + [greedy]


def test_model_state_restored(model):
    model.train()
    generate(model, ROWS, max_new_tokens=3)
    assert model.training and model.cache_len == 0
    assert all(b.attn.kv_cache is None for b in model.blocks)


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
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"temperature": -0.1}, r"temperature must be >= 0 \(0 means greedy\), got -0.1"),
        ({"top_k": -1}, r"top_k must be an int >= 0 \(0 = off\), got -1"),
        ({"max_new_tokens": -2}, r"max_new_tokens must be an int >= 0, got -2"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be > 0"),
        ({"eos_token_id": -1}, r"eos_token_id must be None, a token id >= 0 or a list of them, got -1"),
        ({"eos_token_id": 500}, r"eos_token_id 500 is outside the vocabulary \[0, 128\)"),
        ({"do_sample": "yes"}, r"do_sample must be True or False"),
        ({"topk": 3}, r"unknown generation option 'topk'; did you mean 'top_k'\?"),
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
