"""Greedy tokens equal ModelScope's own GPT3Model.generate on the parity fixture (generation.json).

How ModelScope was called (see the json's notes): prompts right-padded with 0, `max_length` is
the total length including the prompt, every row runs to the same width, and a row that sampled
eod_id keeps generating until every row has (nothing masks it). So row b of the reference is
exactly "row b alone, greedy, for (width - len(row b)) new tokens, no stop token"; with eod_id as
a stop token gpt3zh ends the row at its first eod, which must be the reference row's prefix.
"""

import json

import pytest

from conftest import FIXTURES
from gpt3zh.checkpoint import load_generation_defaults, load_model
from gpt3zh.generation import generate

REF = json.loads((FIXTURES / "generation.json").read_text(encoding="utf-8"))
GREEDY = [name for name, case in REF["cases"].items() if case["call"]["top_k"] == 1]


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURES / "single")


def test_fixture_is_the_greedy_reference():
    assert REF["reference"].startswith("modelscope.models.nlp.gpt3.backbone.GPT3Model.generate")
    assert {"single_greedy", "ragged_greedy", "ragged_greedy_early_eod", "single_greedy_eod_stop"} <= set(GREEDY)
    assert REF["cases"]["ragged_greedy"]["sequences"] == REF["spec_expected_ragged_greedy"]


@pytest.mark.parametrize("name", GREEDY)
def test_each_row_alone_equals_modelscope(model, name):
    case = REF["cases"][name]
    assert load_generation_defaults(FIXTURES / "single").eod_id == 7  # the fixture's config.json; cases may override
    for prompt, expected in zip(case["prompts"], case["sequences"]):
        got = generate(model, [prompt], max_new_tokens=len(expected) - len(prompt))[0]
        assert got == expected


@pytest.mark.parametrize("name", GREEDY)
def test_ragged_batch_equals_modelscope(model, name):
    case = REF["cases"][name]
    width = len(case["sequences"][0])
    shortest = min(len(p) for p in case["prompts"])
    got = generate(model, case["prompts"], max_new_tokens=width - shortest)
    assert [row[:width] for row in got] == case["sequences"]


@pytest.mark.parametrize("name", GREEDY)
def test_stopping_at_eod_gives_the_reference_prefix(model, name):
    case = REF["cases"][name]
    eod = case["config_eod_id"]
    width = len(case["sequences"][0])
    got = generate(model, case["prompts"], max_new_tokens=width - min(len(p) for p in case["prompts"]),
                   eos_token_id=eod)
    for prompt, row, expected in zip(case["prompts"], got, case["sequences"]):
        cont = expected[len(prompt):]
        end = len(prompt) + (cont.index(eod) + 1 if eod in cont else len(cont))
        assert row[:width] == expected[:end]


def test_default_max_length_is_prompt_plus_tokens_to_generate(model):
    # ModelScope's default max_length is tokens.size(1) + 100; unpadded that is the prompt + 100,
    # i.e. the config's tokens_to_generate new tokens (what the pipeline's default is).
    case = REF["cases"]["single_greedy_default_max_length"]
    new = load_generation_defaults(FIXTURES / "single").tokens_to_generate
    assert "max_length" not in case["call"] and new == 100
    assert generate(model, case["prompts"], max_new_tokens=new) == case["sequences"]


def test_early_eod_case_really_stops_early(model):
    # The case exercises the stop rule: both rows sample eod before max_length (32).
    case = REF["cases"]["ragged_greedy_early_eod"]
    assert len(case["sequences"][0]) < case["call"]["max_length"]
    assert all(case["config_eod_id"] in row[len(p):] for p, row in zip(case["prompts"], case["sequences"]))
