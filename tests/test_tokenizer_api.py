"""transformers habits on gpt3zh tokenizers: tok(text), tok(texts, padding, return_tensors), batch_decode,
Tokenizer.from_pretrained. (That the HF export's tokenizer gives the same tensors: test_hf_export.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import require_shared
from gpt3zh.assets import default_model_path
from gpt3zh.tokenizer import (
    BatchEncoding,
    BertTokenizer,
    HFTokenizer,
    JiebaBPETokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_char_tokenizer,
)

TEXTS = ["床前明月光，疑是地上霜。", "春眠不觉晓", ""]


@pytest.fixture(scope="module", params=["hf", "jieba_bpe", "bert"])
def tok(request) -> Tokenizer:
    paths = {
        "hf": lambda: default_model_path(),
        "jieba_bpe": lambda: require_shared() / "modelscope-gpt3-1.3B",
        "bert": lambda: require_shared() / "tokenizers" / "bert-base-chinese" / "vocab.txt",
    }
    return load_tokenizer(paths[request.param]())


def test_call_on_a_str_gives_the_prompt_ids_and_a_mask(tok):
    enc = tok(TEXTS[0])
    assert isinstance(enc, BatchEncoding) and sorted(enc) == ["attention_mask", "input_ids"]
    assert enc["input_ids"] == enc.input_ids == tok.encode_prompt(TEXTS[0])
    assert enc.attention_mask == [1] * len(enc.input_ids)
    with pytest.raises(AttributeError):
        enc.token_type_ids  # noqa: B018


def test_call_on_a_list_gives_rows(tok):
    enc = tok(TEXTS)
    assert enc.input_ids == [tok.encode_prompt(t) for t in TEXTS]
    assert enc.attention_mask == [[1] * len(r) for r in enc.input_ids]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_and_tensors(tok, side):
    rows = [tok.encode_prompt(t) for t in TEXTS]
    width = max(map(len, rows))
    enc = tok(TEXTS, padding=True, padding_side=side, return_tensors="pt")
    assert enc.input_ids.shape == enc.attention_mask.shape == (3, width)
    assert enc.input_ids.dtype == enc.attention_mask.dtype == torch.long
    for ids, mask, row in zip(enc.input_ids.tolist(), enc.attention_mask.tolist(), rows):
        pad = [tok.pad_id] * (width - len(row))
        assert ids == (row + pad if side == "right" else pad + row)
        assert [i for i, m in zip(ids, mask) if m] == row and sum(mask) == len(row)
    single = tok(TEXTS[0], return_tensors="pt")
    assert single.input_ids.tolist() == [rows[0]]  # (1, T), as transformers returns it
    assert tok(TEXTS, padding="longest").input_ids == [r + [tok.pad_id] * (width - len(r)) for r in rows]


def test_call_errors_name_what_to_do(tok):
    with pytest.raises(ValueError, match="pass padding=True"):
        tok(TEXTS, return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors must be 'pt'"):
        tok(TEXTS[0], return_tensors="np")
    with pytest.raises(ValueError, match="padding must be"):
        tok(TEXTS, padding="max_length")
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        tok(TEXTS, padding=True, padding_side="middle")
    with pytest.raises(TypeError, match="a str or a list of str"):
        tok([[1, 2, 3]])


def test_padding_without_a_pad_token_is_refused(tmp_path):
    train_char_tokenizer(["春眠不觉晓"], tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": None}))
    tok = load_tokenizer(tmp_path)
    assert tok(["春", "春眠"]).input_ids == [tok.encode("春"), tok.encode("春眠")]  # fine unpadded
    with pytest.raises(TokenizerError, match="padding needs a pad token"):
        tok(["春", "春眠"], padding=True)


def test_batch_decode_takes_lists_and_tensors(tok):
    rows = [tok.encode_prompt(t) for t in TEXTS]
    expected = [tok.decode(r) for r in rows]
    assert tok.batch_decode(rows) == expected
    padded = tok(TEXTS, padding=True, return_tensors="pt").input_ids
    assert tok.batch_decode(padded) == expected  # pad is a special token: skipped
    assert tok.batch_decode(rows, skip_special_tokens=False) == [
        tok.decode(r, skip_special_tokens=False) for r in rows
    ]


def test_from_pretrained_is_load_tokenizer():
    path = default_model_path()
    tok = Tokenizer.from_pretrained(path)
    assert type(tok) is HFTokenizer and tok.config() == load_tokenizer(path).config()
    assert HFTokenizer.from_pretrained(path).encode("春") == tok.encode("春")
    with pytest.raises(TokenizerError, match="holds a HFTokenizer .hf., not a BertTokenizer"):
        BertTokenizer.from_pretrained(path)
    jieba = require_shared() / "modelscope-gpt3-1.3B"
    assert type(JiebaBPETokenizer.from_pretrained(jieba)) is JiebaBPETokenizer
