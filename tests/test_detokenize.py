"""The one incremental detokenizer: deltas that join to the final text, held-back partial characters
and stop-string prefixes, and a bounded re-decoded window, for the three tokenizer kinds."""

import random

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from conftest import require_shared
from gpt3zh.detokenize import Detokenizer
from gpt3zh.tokenizer import HFTokenizer, load_tokenizer, train_char_tokenizer

CHAR = train_char_tokenizer(["abcdefghijklmnopqrstuvwxyz XYZQ床前明月光，。"])


def run(tok, prompt, ids, stop=()):
    d = Detokenizer(tok, prompt, stop)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.finish())
    return d, pieces


def test_stop_strings_are_held_back_and_cut():
    d = Detokenizer(CHAR, CHAR.encode("ab"), stop=("XYZ",))
    assert "".join(d.push(i) for i in CHAR.encode("hiXY")) == "hi"  # "XY" may start "XYZ": held back
    assert d.push(CHAR.encode("Q")[0]) == "XYQ"  # it did not: released
    assert d.push(CHAR.encode("X")[0]) == "" and d.push(CHAR.encode("Y")[0]) == ""
    assert d.push(CHAR.encode("Z")[0]) == "" and d.stopped  # the text ends before the stop string
    assert d.push(CHAR.encode("a")[0]) == "" and d.finish() == "" and d.text == "hiXYQ"


def test_a_stop_string_across_the_prompt_boundary_does_not_count():
    d, pieces = run(CHAR, CHAR.encode("ab"), CHAR.encode("cd"), stop=("bc",))
    assert not d.stopped and "".join(pieces) == "cd"


def byte_level():
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<pad>", "<sep>", "<|endoftext|>", *sorted(alphabet)])}
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<pad>", "<sep>", "<|endoftext|>")])
    return HFTokenizer(backend, b"", {"eod_token": "<|endoftext|>", "sep_token": "<sep>", "pad_token": "<pad>"})


def test_no_piece_ends_inside_a_character():
    tok = byte_level()
    ids = tok.encode("床前明月光，疑是地上霜。" * 6)
    d, pieces = run(tok, tok.encode("明月"), ids)
    assert "".join(pieces) == tok.decode(ids) == d.text
    assert all(not p.endswith("\ufffd") for p in pieces)
    cut, pieces = run(tok, tok.encode("明月"), ids[:4])  # ends one byte into "前": the decode shows U+FFFD
    assert "".join(pieces) == "床\ufffd" and pieces[-1] == "\ufffd"


def test_long_outputs_equal_one_whole_decode_and_the_window_stays_bounded():
    tok = load_tokenizer(require_shared() / "modelscope-gpt3-1.3B")
    decoded: list[int] = []

    class Recording:  # the real tokenizer, recording how many ids each decode call sees
        def decode(self, ids):
            decoded.append(len(ids))
            return tok.decode(ids)

        def unstable_tail(self, ids):
            return tok.unstable_tail(ids)

    text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 20 + "Hello, world! 2026年12月1日。"
    prompt, ids = tok.encode("静夜思："), tok.encode(text)
    assert len(ids) > 300
    d, pieces = run(Recording(), prompt, ids)
    assert "".join(pieces) == d.text == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert max(decoded) <= 2 * Detokenizer.WINDOW + Detokenizer.CONTEXT + 1  # not the whole output


def test_bert_pieces_words_and_punctuation():
    tok = load_tokenizer(require_shared() / "tokenizers" / "bert-base-chinese" / "vocab.txt")
    words = [t for t in ("床", "前", "明", "hello", "##ing", "world", ",", ".", "it", "'", "s", "##ly", "2026", "年")
             if tok.token_to_id(t) is not None]
    rng = random.Random(0)
    prompt = tok.encode_prompt("床前明月光，")
    checked = 0
    for _ in range(300):
        ids = [tok.token_to_id(rng.choice(words)) for _ in range(rng.randint(1, 25))]
        d, pieces = run(tok, prompt, ids)
        assert "".join(pieces) == d.text  # always
        whole = tok.decode(prompt[-Detokenizer.CONTEXT:] + ids)
        context = tok.decode(prompt[-Detokenizer.CONTEXT:])
        if whole.startswith(context):  # not when a "##" piece rewrites the prompt's last word
            assert d.text == whole[len(context):]
            checked += 1
    assert checked > 200


@pytest.mark.parametrize("stops", [("。",), ("明月", "故乡"), ("不在其中",)])
def test_stop_strings_with_jieba_bpe(stops):
    tok = load_tokenizer(require_shared() / "modelscope-gpt3-1.3B")
    ids = tok.encode("举头望明月，低头思故乡。床前明月光")
    d, pieces = run(tok, tok.encode("静夜思："), ids, stops)
    full = tok.decode(ids)
    cuts = [full.find(s) for s in stops if s in full]
    assert "".join(pieces) == d.text == (full[: min(cuts)] if cuts else full)
    assert d.stopped == bool(cuts)
