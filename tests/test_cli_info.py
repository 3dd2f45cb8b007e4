"""`gpt3zh info`: every preset, and model directories in each format."""

import json

import pytest

from gpt3zh.cli import main
from gpt3zh.config import PRESETS

# Exact counts, computed independently from the ModelScope shapes: embeddings V*H + P*H, per layer
# 2 layernorms (4H), qkv (3H*H + 3H), proj (H*H + H), fc (4H*H + 4H), fc proj (4H*H + H); final ln 2H.
EXPECTED = {
    "base": 106_289_664,
    "large": 330_622_976,
    "1.3B": 1_317_654_528,
    "2.7B": 2_653_967_360,
    "13B": 12_858_214_400,
    "30B": 29_981_177_856,
    "175B": 174_615_846_912,
}


def _by_formula(V: int, P: int, L: int, H: int) -> int:
    per_layer = 4 * H + (3 * H * H + 3 * H) + (H * H + H) + (4 * H * H + 4 * H) + (4 * H * H + H)
    return V * H + P * H + L * per_layer + 2 * H


def test_expected_table_matches_the_formula():
    for name, cfg in PRESETS.items():
        assert _by_formula(cfg.vocab_size, cfg.max_seq_len, cfg.n_layer, cfg.d_model) == EXPECTED[name]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_info_preset_json(name, capsys):
    assert main(["info", "--preset", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == EXPECTED[name]
    assert info["format"] == "preset"
    assert info["bf16_bytes"] == 2 * EXPECTED[name]


def test_info_preset_text(capsys):
    assert main(["info", "--preset", "13B"]) == 0
    out = capsys.readouterr().out
    assert "12,858,214,400" in out and "25.7 GB" in out


@pytest.mark.parametrize("fmt,tp", [("gpt3zh", 1), ("modelscope", 1), ("megatron", 2), ("hf", 1)])
def test_info_model_directory_names_its_format(tiny_config, tmp_path, capsys, fmt, tp):
    from gpt3zh.checkpoint import save_model
    from gpt3zh.model import GPT

    model = GPT(tiny_config)
    save_model(model, tmp_path / fmt, format=fmt, tp=tp)
    assert main(["info", str(tmp_path / fmt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == fmt
    assert info["params"] == sum(p.numel() for p in model.parameters())
    if fmt == "megatron":
        assert info["tp"] == 2


def test_info_errors(tmp_path, capsys):
    assert main(["info"]) == 2
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "no such model directory" in capsys.readouterr().err
