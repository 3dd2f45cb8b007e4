"""Tokenizers against their references: ModelScope's JiebaBPETokenizer (fixture made with its own
code), transformers' BertTokenizer on real lines, the char tokenizer's round trip, and the errors a
user gets for a broken tokenizer file."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest

import gpt3zh
from conftest import FIXTURES, require_shared
from gpt3zh import tokenizer as tk
from gpt3zh.tokenizer import TokenizerError, load_tokenizer, remove_space_between_chinese_chars

JIEBA_FIXTURE = FIXTURES / "tokenizer" / "jiebabpe.jsonl"
JIEBA_META = FIXTURES / "tokenizer" / "meta.json"


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _real_lines(data, step: int) -> list[str]:
    """Every `step`-th poetry test body and qg dev source and question (real text, mixed scripts)."""
    texts = [r["src_txt"] for r in _jsonl(data / "poetry" / "test.jsonl")[::step]]
    qg = _jsonl(data / "qg" / "dev.jsonl")[::step]
    return texts + [r["src_txt"] for r in qg] + [r["tgt_txt"] for r in qg]


# ------------------------------------------------------------------------------------- JiebaBPE
@pytest.fixture(scope="module")
def jieba_rows():
    return _jsonl(JIEBA_FIXTURE)


@pytest.fixture(scope="module")
def jieba_tok():
    return load_tokenizer(require_shared() / "modelscope-gpt3-1.3B")


def test_jiebabpe_fixture_covers_real_lines_and_edge_cases(jieba_rows):
    texts = {r["text"] for r in jieba_rows}
    assert len(jieba_rows) >= 1000
    for edge in ("", "<sep>", "\t", "\n\n", "0123456789", "Hello world", "ＡＢＣ１２３，。！", "emoji 😀🎉👍 测试",
                 "ａｂｃ　全角空格", "hello  world   again"):  # fmt: skip
        assert edge in texts, edge


def test_jiebabpe_ids_equal_modelscope(jieba_tok, jieba_rows):
    wrong = [r["text"] for r in jieba_rows if jieba_tok.encode(r["text"]) != r["ids"]]
    assert wrong == []


def test_jiebabpe_encode_batch_equals_modelscope(jieba_tok, jieba_rows):
    ids = jieba_tok.encode_batch([r["text"] for r in jieba_rows])
    assert ids == [r["ids"] for r in jieba_rows]


def test_jiebabpe_segmentation_is_jieba(jieba_rows):
    # The fixture's words are jieba 0.42.1's as ModelScope called it; a faster segmenter that
    # cuts differently (rjieba does, see test_rjieba_segmentation_vs_jieba) must not sneak in.
    assert [tk.jieba_cut(r["text"]) for r in jieba_rows] == [r["jieba"] for r in jieba_rows]


def test_jiebabpe_special_ids_equal_modelscope(jieba_tok):
    meta = json.loads(JIEBA_META.read_text())
    data = require_shared()
    assert (jieba_tok.eod_id, jieba_tok.sep_id, jieba_tok.newline_id) == (
        meta["eod_id"],
        meta["sep_id"],
        meta["newline_id"],
    )
    assert jieba_tok.pad_id == 3 and jieba_tok.unk_id == 2
    assert jieba_tok.encode("\n") == [meta["newline_id"]]
    # 51,199 tokens (ModelScope's vocab_size) but id 520 is unused, so the ids need 51,200
    # embedding rows: the model's config.json vocab_size.
    assert len(jieba_tok.backend.get_vocab(with_added_tokens=True)) == meta["vocab_size"]
    config = json.loads((data / "modelscope-gpt3-1.3B" / "config.json").read_text())
    assert jieba_tok.vocab_size == config["vocab_size"] == 51200


def test_jiebabpe_fixture_is_for_this_file():
    real = require_shared() / "modelscope-gpt3-1.3B" / "tokenizer.json"
    meta = json.loads(JIEBA_META.read_text())
    assert hashlib.sha256(real.read_bytes()).hexdigest() == meta["tokenizer_json_sha256"]


def test_jiebabpe_detokenize_equals_modelscope(jieba_tok, jieba_rows):
    assert [jieba_tok.detokenize(r["ids"]) for r in jieba_rows] == [r["detok"] for r in jieba_rows]
    # jieba cuts a literal "<sep>" into "<", "sep", ">": ModelScope never encodes it as sep_id.
    row = next(r for r in jieba_rows if r["text"] == "前文<sep>后文")
    assert jieba_tok.sep_id not in row["ids"] and row["detok"] == "前文<sep>后文"
    row = next(r for r in jieba_rows if r["text"] == "结束<|endoftext|>开始")
    assert jieba_tok.eod_id not in row["ids"] and jieba_tok.encode(row["text"]) == row["ids"]
    # ModelScope's text is cut at the first sep_id, even one inside the prompt.
    ids = jieba_tok.encode("前文") + [jieba_tok.sep_id] + jieba_tok.encode("后文") + [jieba_tok.eod_id]
    assert jieba_tok.detokenize(ids) == "前文"
    assert jieba_tok.decode(ids) == "前文后文"


def test_jiebabpe_decode_round_trips_where_modelscope_does(jieba_tok, jieba_rows):
    # NFKC (，-> ,) and the Metaspace decoder make some texts unrecoverable; where ModelScope's
    # detokenize gives the text back, decode(encode(text)) must too.
    exact = [r["text"] for r in jieba_rows if r["detok"] == r["text"]]
    assert len(exact) >= 50
    assert [jieba_tok.decode(jieba_tok.encode(t)) for t in exact] == exact
    # Elsewhere it gives back ModelScope's (normalized) text.
    assert [jieba_tok.decode(jieba_tok.encode(r["text"])) for r in jieba_rows] == [
        r["detok"] for r in jieba_rows
    ]


def test_jiebabpe_loads_from_file_and_saves_byte_for_byte(jieba_tok, tmp_path):
    real_dir = require_shared() / "modelscope-gpt3-1.3B"
    # The real file with ModelScope's configuration.json marker, as a hub directory holds it.
    model_dir = tmp_path / "hub"
    model_dir.mkdir()
    for name in ("tokenizer.json", "configuration.json"):
        shutil.copy(real_dir / name, model_dir / name)
    from_file = gpt3zh.load_tokenizer(model_dir / "tokenizer.json")
    assert isinstance(from_file, tk.JiebaBPETokenizer)
    text = "床前明月光，疑是地上霜。\nGPT-3 2023年"
    assert from_file.encode(text) == jieba_tok.encode(text)

    saved = jieba_tok.save(tmp_path / "saved")
    assert (saved / "tokenizer.json").read_bytes() == (real_dir / "tokenizer.json").read_bytes()
    assert json.loads((saved / "tokenizer_config.json").read_text())["type"] == "jieba_bpe"
    again = load_tokenizer(saved)
    assert type(again) is tk.JiebaBPETokenizer
    assert again.encode(text) == jieba_tok.encode(text) and again.eod_id == 7


def test_rjieba_segmentation_vs_jieba():
    """rjieba (jieba-rs) is ~20x faster but cuts differently; gpt3zh keeps jieba (docs/benchmarks.md)."""
    rjieba = pytest.importorskip("rjieba", reason="rjieba not installed (optional, only compared)")
    texts = _real_lines(require_shared(), step=3)  # benchmarks/tokenizer.py compares all lines
    differ = [t for t in texts if list(rjieba.cut(t)) != tk.jieba_cut(t)]
    print(f"\nrjieba vs jieba: {len(differ)} of {len(texts)} poetry test + qg dev lines segment differently")
    if differ:
        # Then the package must not use it: its segmentation is jieba's on exactly those lines.
        import jieba

        assert [tk.jieba_cut(t) for t in differ] == [list(jieba.cut(t)) for t in differ]


# ------------------------------------------------------------------------------------------ BERT
@pytest.fixture(scope="module")
def bert_vocab():
    return require_shared() / "tokenizers" / "bert-base-chinese" / "vocab.txt"


@pytest.fixture(scope="module")
def bert_tok(bert_vocab):
    return load_tokenizer(bert_vocab)


BERT_EDGE = [
    "", "今天天气很好。", "GPT-3模型在2020年发布", "iPhone 15 Pro Max售价7999元", "hello, world! How's it?",
    "ＡＢＣ１２３，。！", "邮箱 test@example.com 网址 https://modelscope.cn", "a b  c   d", "第一行\n第二行\t制表",
    "emoji😀测试", "Ελληνικά русский Café naïve", "[CLS] 已有 [SEP] 标记 [MASK]", "unaffable running jumped",
    "𫗪马行无力",
]  # fmt: skip


def _modelscope_era_bert(vocab):
    """The Python BertTokenizer that ModelScope runs (transformers 4.x; kept as *Legacy in 5.x)."""
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    except ImportError:  # transformers 4.x: BertTokenizer is that Python class itself
        from transformers import BertTokenizer as BertTokenizerLegacy
    return BertTokenizerLegacy(str(vocab), do_lower_case=True)


def test_bert_ids_equal_transformers(bert_tok, bert_vocab):
    transformers = pytest.importorskip("transformers")
    texts = _real_lines(require_shared(), step=10) + BERT_EDGE
    assert len(texts) >= 300
    refs = [transformers.BertTokenizer(str(bert_vocab), do_lower_case=True), _modelscope_era_bert(bert_vocab)]
    for ref in refs:
        wrong = [t for t in texts if bert_tok.encode(t) != ref.encode(t)]
        assert wrong == [], type(ref).__name__


def test_bert_special_ids_and_prompt(bert_tok):
    assert (bert_tok.pad_id, bert_tok.unk_id, bert_tok.cls_id, bert_tok.sep_id) == (0, 100, 101, 102)
    assert bert_tok.eod_id == 102 and bert_tok.vocab_size == 21128
    ids = bert_tok.encode("你好")
    assert ids[0] == 101 and ids[-1] == 102
    # ModelScope generates from the [SEP] position, overwriting it: the prompt lacks [SEP].
    assert bert_tok.encode_prompt("你好") == ids[:-1]


def test_bert_decode_is_modelscope_pipeline_text(bert_tok, bert_vocab):
    pytest.importorskip("transformers")
    ref = _modelscope_era_bert(bert_vocab)
    texts = _real_lines(require_shared(), step=10) + BERT_EDGE
    ids = [ref.encode(t) for t in texts]
    expected = [remove_space_between_chinese_chars(ref.decode(i, skip_special_tokens=True)) for i in ids]
    assert [bert_tok.decode(i) for i in ids] == expected
    # Chinese comes back without the spaces BertTokenizer puts between characters.
    assert ref.decode(ids[0], skip_special_tokens=True).count(" ") > 5
    assert " " not in bert_tok.decode(ids[0])


@pytest.mark.parametrize(
    "spaced, joined",
    [
        ("今 天 天 气 很 好 。", "今天天气很好。"),
        ("你 好 ， 世 界 ！ hello world!", "你好，世界！ hello world!"),
        ("gpt - 3 模 型 在 2020 年 发 布", "gpt - 3 模型在 2020 年发布"),  # "-" is ASCII punctuation
        ("iphone 15 售 价 7999 元", "iphone 15 售价 7999 元"),
        ("《 红 楼 梦 》 （ 全 本 ）", "《红楼梦》（全本）"),
        ("a  b", "a  b"),  # the empty word between two spaces counts as Chinese, as in ModelScope
        (" 中 文 ", "中文"),
        ("日本語 かな", "日本語 かな"),  # kana is not in the CJK ideograph ranges
        ("", ""),
    ],
)
def test_remove_space_between_chinese_chars(spaced, joined):
    assert remove_space_between_chinese_chars(spaced) == joined


def test_bert_decode_skips_specials_and_out_of_range_ids(bert_tok):
    ids = bert_tok.encode("今天[MASK]好")
    assert 103 in ids
    assert bert_tok.decode(ids) == "今天好"
    assert bert_tok.decode([*ids, 10**6]) == "今天好"
    assert bert_tok.decode(ids, skip_special_tokens=False) == "[CLS] 今天 [MASK] 好 [SEP]"


# ------------------------------------------------------------------------------ char tokenizer
@pytest.fixture(scope="module")
def poems():
    return [r["src_txt"] for r in _jsonl(require_shared() / "poetry" / "sample.jsonl")[:300]]


def test_char_tokenizer_round_trip_and_reload(poems, tmp_path):
    tok = tk.train_char_tokenizer([*poems, " \t"], tmp_path / "char")
    assert (tok.pad_id, tok.sep_id, tok.eod_id, tok.unk_id, tok.newline_id) == (0, 1, 2, 3, 4)
    for text in poems + ["", "\n\n", "春 风\t月"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) == len(text)  # one id per character, spaces and newlines included
    cfg = json.loads((tmp_path / "char" / "tokenizer_config.json").read_text())
    assert cfg["type"] == "hf"
    for path in (tmp_path / "char", tmp_path / "char" / "tokenizer.json"):
        again = gpt3zh.load_tokenizer(path)
        assert type(again) is tk.HFTokenizer
        assert again.encode_batch(poems) == [tok.encode(p) for p in poems]
        assert (again.eod_id, again.sep_id, again.pad_id, again.vocab_size) == (2, 1, 0, tok.vocab_size)


def test_char_tokenizer_specials_unknowns_and_min_frequency(poems):
    tok = tk.train_char_tokenizer(poems)
    assert tok.encode("春<sep>风<|endoftext|>") == [tok.token_to_id("春"), 1, tok.token_to_id("风"), 2]
    assert tok.encode("春😀") == [tok.token_to_id("春"), tok.unk_id]
    assert tok.decode(tok.encode("春😀")) == "春"
    rare = tk.train_char_tokenizer(poems, min_frequency=5)
    assert rare.vocab_size < tok.vocab_size
    counts = {c: "".join(poems).count(c) for c in set("".join(poems))}
    kept = {c for c, n in counts.items() if n >= 5} | {"\n"}
    assert {rare.id_to_token(i) for i in range(5, rare.vocab_size)} | {"\n"} == kept
    with pytest.raises(ValueError, match="min_frequency"):
        tk.train_char_tokenizer(poems, min_frequency=0)


# -------------------------------------------------------------------------------------- errors
def test_missing_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)  # a directory without any tokenizer file
    (tmp_path / "tokenizer_config.json").write_text('{"type": "jieba_bpe"}')
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def rejects(source, file, message: str) -> None:
    """load_tokenizer(source) fails with an error that names `file`, then matches `message` (a regex)."""
    with pytest.raises(TokenizerError, match=rf"{re.escape(str(file))}: {message}"):
        load_tokenizer(source)


def test_truncated_tokenizer_json_names_the_file(tmp_path):
    real = (require_shared() / "modelscope-gpt3-1.3B" / "tokenizer.json").read_bytes()
    path = tmp_path / "tokenizer.json"
    path.write_bytes(real[: len(real) // 2])
    rejects(path, path, r"not valid JSON")
    path.write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    rejects(tmp_path, path, r"tokenizers cannot load it")
    path.write_text('{"vocab": {}}')
    rejects(path, path, r"not a Hugging Face tokenizers file")


def test_invalid_utf8_vocab_names_the_file(tmp_path, bert_vocab):
    path = tmp_path / "vocab.txt"
    head = bert_vocab.read_bytes()[:5000]
    head = head[: head.rindex(b"\n") + 1]  # whole lines, so the first bad byte is ours
    path.write_bytes(head + b"\xff\xfe broken\n")
    rejects(tmp_path, path, rf"not valid UTF-8 at byte {len(head)}")


def test_vocab_without_required_specials_names_them(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\n[SEP]\n你\n好\n", encoding="utf-8")
    rejects(path, path, r".*lacks.*\[CLS\]")


def test_unknown_kind_in_config_names_the_file(tmp_path, poems):
    tk.train_char_tokenizer(poems[:5], tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text('{"type": "sentencepiece"}')
    rejects(tmp_path, config, r"type 'sentencepiece' is not one of jieba_bpe, bert, hf")
    config.write_text('{"type": "hf", "eos": "</s>"}')
    rejects(tmp_path, config, r"unknown keys \['eos'\]")
    config.write_text('{"type": "hf", ')
    rejects(tmp_path, config, r"not valid JSON")
    config.write_text('{"type": "hf", "eod_token": "<eos>"}')
    with pytest.raises(TokenizerError, match=r"lacks required special tokens: '<eos>' \(eod_token\)"):
        load_tokenizer(tmp_path)
