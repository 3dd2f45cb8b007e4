"""`gpt3zh info`: every preset, and model directories in each format."""

import json

import pytest
import torch

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


# ------------------------------------------------------------------------ the real tensors, not the config
def _drop_layer(path, fmt):
    """Remove every tensor of the last layer from a saved model directory's weight file(s)."""
    import torch
    from safetensors.torch import load_file, save_file

    if fmt in ("gpt3zh", "hf"):
        sd = load_file(path / "model.safetensors")
        save_file({k: v for k, v in sd.items() if ".1." not in k}, path / "model.safetensors",
                  metadata={"format": "pt"})
    elif fmt == "modelscope":
        sd = torch.load(path / "pytorch_model.bin", weights_only=True)
        torch.save({k: v for k, v in sd.items() if ".layers.1." not in k}, path / "pytorch_model.bin")
    else:
        for shard in (path / "model").iterdir():
            obj = torch.load(shard, weights_only=True)
            torch.save({"module": {k: v for k, v in obj["module"].items() if ".layers.1." not in k}}, shard)


@pytest.mark.parametrize("fmt,tp", [("gpt3zh", 1), ("modelscope", 1), ("megatron", 2), ("hf", 1)])
def test_info_counts_the_real_tensors_and_fails_on_a_mismatch(tiny_config, tmp_path, capsys, fmt, tp):
    from gpt3zh.checkpoint import save_model
    from gpt3zh.model import GPT

    model = GPT(tiny_config)
    d = save_model(model, tmp_path / fmt, format=fmt, tp=tp)
    per_layer = sum(p.numel() for p in model.blocks[1].parameters())
    _drop_layer(d, fmt)
    assert main(["info", str(d)]) == 2
    out, err = capsys.readouterr()
    # 2 layers claimed, 1 there
    assert f"params      {tiny_config.num_params - per_layer:,} in {16 * tp} tensors" in out
    assert "MISMATCH" in out and "missing keys (12)" in out
    assert err.count("\n") == 1 and err.startswith(f"gpt3zh info: error: {d}: the weights do not match its config")
    assert main(["info", str(d), "--json"]) == 2
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == tiny_config.num_params - per_layer
    assert info["weights"]["config_params"] == tiny_config.num_params and not info["weights"]["matches_config"]


def test_info_names_the_tokenizer_kind(tiny_config, tmp_path, capsys):
    import shutil

    from conftest import require_shared
    from gpt3zh.checkpoint import save_model
    from gpt3zh.model import GPT
    from gpt3zh.tokenizer import load_tokenizer, train_char_tokenizer

    model = GPT(tiny_config)
    char = save_model(model, tmp_path / "char", tokenizer=train_char_tokenizer(["床前明月光"]))
    assert main(["info", str(char), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer"] == "tokenizer.json (character-level WordLevel, no jieba)"
    shared = require_shared()
    jieba = save_model(model, tmp_path / "jieba")
    for name in ("tokenizer.json", "configuration.json"):  # ModelScope's 1.3B files: jieba + BPE
        shutil.copy(shared / "modelscope-gpt3-1.3B" / name, jieba / name)
    assert type(load_tokenizer(jieba)).__name__ == "JiebaBPETokenizer"
    assert main(["info", str(jieba), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer"] == "tokenizer.json (jieba + BPE)"
    bert = save_model(model, tmp_path / "bert")
    shutil.copy(shared / "tokenizers" / "bert-base-chinese" / "vocab.txt", bert / "vocab.txt")
    assert main(["info", str(bert), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer"] == "vocab.txt (BERT WordPiece)"


def test_init_writes_a_random_preset_model(tmp_path, capsys):
    from conftest import require_shared
    from gpt3zh.checkpoint import describe, load_pretrained

    vocab = require_shared() / "tokenizers" / "bert-base-chinese" / "vocab.txt"
    assert main(["init", str(tmp_path / "m"), "--preset", "base", "--tokenizer", str(vocab),
                 "--dtype", "bfloat16"]) == 0
    assert "random base (106,289,664 parameters, bfloat16), with its tokenizer" in capsys.readouterr().out
    info = describe(tmp_path / "m")
    assert info.config == PRESETS["base"] and info.extra["tokenizer"].startswith("vocab.txt")
    assert load_pretrained(tmp_path / "m").model.tok_emb.weight.dtype == torch.bfloat16
    jieba = require_shared() / "modelscope-gpt3-1.3B"
    assert main(["init", str(tmp_path / "x"), "--preset", "base", "--tokenizer", str(jieba)]) == 2
    assert "51200 ids, more than preset base's vocab_size 25600" in capsys.readouterr().err
