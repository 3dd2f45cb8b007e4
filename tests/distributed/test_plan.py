"""`gpt3zh plan`: the real parallelization on a meta model under a fake process group."""

import json

import pytest

from gpt3zh.cli import main
from gpt3zh.config import PRESETS
from gpt3zh.parallel import ParallelDims
from gpt3zh.planning import GiB, plan_layout


def test_plan_175B_finds_a_layout_that_fits_80GB_gpus(capsys):
    assert main(["plan", "--preset", "175B", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["total_bytes"] <= 0.9 * 80 * GiB and plan["gpu_bytes"] == 80 * GiB
    assert plan["dp"] * plan["tp"] <= 512 and PRESETS["175B"].n_head % plan["tp"] == 0
    # the weights really are split over all ranks: each holds about 1/world of them (bf16)
    world = plan["dp"] * plan["tp"]
    assert plan["params_bytes"] == pytest.approx(2 * PRESETS["175B"].num_params / world, rel=0.02)


def test_plan_of_one_gpu_for_175B_does_not_fit():
    plan = plan_layout(PRESETS["175B"], ParallelDims(dp=1, tp=8))
    assert not plan.fits and plan.params > 40 * GiB


def test_plan_refuses_an_impossible_layout(capsys):
    assert main(["plan", "--preset", "base", "--dp", "1", "--tp", "8"]) == 2
    err = capsys.readouterr().err
    assert "n_head=12 is not divisible by tp=8" in err
