"""`gpt3zh plan --serve`: per-GPU weights, KV cache and prefill activations of the serving layout."""

import itertools
import json

import pytest

from gpt3zh.cli import main
from gpt3zh.config import PRESETS
from gpt3zh.planning import GiB, plan_serving


def test_plan_serve_prints_the_memory_table_for_every_tp(capsys):
    assert main(["plan", "--preset", "13B", "--serve", "--batch", "8", "--seq", "2048"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("13B serving, bf16 weights and KV cache, batch 8 x context 2048, 80 GiB GPUs "
                      "(10% kept free); per GPU:")
    assert out[1].split() == ["tp", "GPUs", "weights", "KV", "cache", "activations", "total", "fits"]
    rows = [line.split() for line in out[2:]]
    assert [r[0] for r in rows] == ["1", "2", "4", "8"]  # the tp sizes 40 heads allow on one node
    weights = [float(r[2]) for r in rows]
    assert weights[0] == pytest.approx(2 * PRESETS["13B"].num_params / GiB, abs=0.05)  # bf16, all of it
    # halves, but the embeddings stay whole
    assert all(1.8 * w2 < w1 < 2 * w2 for w1, w2 in itertools.pairwise(weights))


def test_serve_plan_is_the_layout_each_rank_holds():
    cfg = PRESETS["175B"]
    plan = plan_serving(cfg, 8, batch=8, context=2048)
    H, L, V, P = cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.max_seq_len
    replicated = 2 * (V * H + P * H + L * (4 * H + H + H) + 2 * H)  # embeddings, layer norms, proj biases, ln_f
    assert plan.weights == pytest.approx((2 * cfg.num_params - replicated) / 8 + replicated, rel=1e-9)
    assert plan.kv_cache == 2 * L * 8 * 2048 * (H // 8) * 2  # k and v, local heads only, bf16
    assert plan.fits and not plan_serving(cfg, 4, batch=8, context=2048).fits


def test_plan_serve_json_and_refusals(capsys):
    assert main(["plan", "--preset", "30B", "--serve", "--tp", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["tp"] for p in data["plans"]] == [4] and data["plans"][0]["context"] == 2048
    assert main(["plan", "--preset", "30B", "--serve", "--tp", "16"]) == 2
    assert "n_head=56 is not divisible by tp=16" in capsys.readouterr().err
    assert main(["plan", "--preset", "13B", "--serve", "--dp", "2"]) == 2
    assert "serving has no data parallelism" in capsys.readouterr().err
