"""pipeline("text-generation"): input forms, ModelScope defaults and max_length, stop strings,
streaming that reassembles exactly, transformers' habits (num_return_sequences, return_full_text,
the prompt as typed), and clear errors. Tiny random models with real tokenizers."""

import json

import pytest
import tokenizers
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers

import gpt3zh
from conftest import require_shared
from gpt3zh.checkpoint import save_model
from gpt3zh.config import GenerationDefaults, GPTConfig
from gpt3zh.generation import generate
from gpt3zh.model import GPT
from gpt3zh.pipelines import TextGenerationPipeline
from gpt3zh.tokenizer import HFTokenizer, load_tokenizer, train_char_tokenizer

POEMS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
         "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]
OPENINGS = ["床前明月光，", "春眠不觉晓，", "白日依山尽，"]


def tiny_gpt(vocab: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, n_layer=2, n_head=4, d_model=32, max_seq_len=64, dropout=0.0, attn_dropout=0.0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so greedy output varies with the prompt
        model.tok_emb.weight.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("char")
    tok = train_char_tokenizer(POEMS)
    # eod = the tokenizer's <|endoftext|>; tokens_to_generate small to keep the tests fast
    save_model(tiny_gpt(tok.vocab_size), d / "m", tokenizer=tok,
               generation=GenerationDefaults(eod_id=tok.eod_id, tokens_to_generate=12))
    return d / "m"


@pytest.fixture(scope="module")
def pipe(char_dir):
    return gpt3zh.pipeline("text-generation", model=char_dir)


def greedy_text(pipe, prompt, n):
    """What the pipeline must return: the prompt as typed + the text of the greedy ids, cut before
    the first stop id (a character tokenizer: the text of ids is their characters)."""
    ids = pipe.tokenizer.encode_prompt(prompt)
    stops = pipe.default_config().stop_ids
    out = generate(pipe.model, [ids], max_new_tokens=n)[0][len(ids):]
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    return prompt + pipe.tokenizer.decode(out[:cut])


# ------------------------------------------------------------------------------------ input forms
def test_input_forms_give_the_same_text(pipe):
    want = greedy_text(pipe, OPENINGS[0], 10)
    assert want.startswith(OPENINGS[0]) and len(want) > len(OPENINGS[0])
    for inputs in (OPENINGS[0], {"src_txt": OPENINGS[0]}, {"sentence": OPENINGS[0]}, {"text": OPENINGS[0]}):
        assert pipe(inputs, do_sample=False, max_new_tokens=10) == {"text": want}


def test_list_input_batched_equals_one_by_one(pipe):
    want = [{"text": greedy_text(pipe, p, 10)} for p in OPENINGS]
    assert len({w["text"] for w in want}) == 3
    for batch_size in (None, 1, 2):
        assert pipe(OPENINGS, batch_size=batch_size, do_sample=False, max_new_tokens=10) == want
    assert pipe([{"src_txt": OPENINGS[1]}], do_sample=False, max_new_tokens=10) == [want[1]]


def test_default_model_path(monkeypatch, char_dir):
    from gpt3zh import assets

    monkeypatch.setattr(assets, "DEFAULT_MODEL_NAME", "no-such-model")
    with pytest.raises(FileNotFoundError, match="model=PATH"):
        assets.default_model_path()
    with pytest.raises(FileNotFoundError, match="default model is not installed"):
        gpt3zh.pipeline("text-generation")
    monkeypatch.setattr(assets, "default_model_path", lambda: char_dir)
    assert gpt3zh.pipeline()(OPENINGS[0], do_sample=False, max_new_tokens=4)["text"] == greedy_text(
        gpt3zh.pipeline(model=char_dir), OPENINGS[0], 4)


def test_model_object_needs_a_tokenizer(char_dir):
    from gpt3zh.checkpoint import load_model

    model = load_model(char_dir)
    with pytest.raises(ValueError, match="tokenizer="):
        gpt3zh.pipeline("text-generation", model=model)
    p = gpt3zh.pipeline("text-generation", model=model, tokenizer=char_dir)
    assert p(OPENINGS[0], do_sample=False, max_new_tokens=5)["text"] == greedy_text(p, OPENINGS[0], 5)
    assert p.defaults == GenerationDefaults() and p.model is model
    with pytest.raises(ValueError, match="unknown task"):
        gpt3zh.pipeline("summarization", model=char_dir)
    with pytest.raises(ValueError, match="does not move a caller's model"):
        gpt3zh.pipeline(model=model, tokenizer=char_dir, device="meta")


# ---------------------------------------------------------------------- defaults and max_length
def test_defaults_come_from_the_model_config(char_dir):
    p = gpt3zh.pipeline(model=char_dir)
    cfg = p.default_config()
    d = p.defaults
    assert (cfg.do_sample, cfg.top_k, cfg.top_p, cfg.temperature, cfg.max_new_tokens) == (True, 0, 0.9, 1.0, 12)
    assert set(cfg.stop_ids) == {d.eod_id, p.tokenizer.sep_id}
    # top_k == 1 in config.json is greedy (ModelScope's sample() takes it as argmax); top_p 0 is off
    p = gpt3zh.pipeline(model=char_dir, defaults=GenerationDefaults(eod_id=d.eod_id, top_k=1, top_p=0.0,
                                                                     tokens_to_generate=7))
    assert not p.default_config().do_sample and p.default_config().top_p == 1.0
    assert p(OPENINGS[2]) == {"text": greedy_text(p, OPENINGS[2], 7)}
    # the caller overrides: sampling with a seed repeats, and differs from greedy for some prompt
    sampled = [p(o, do_sample=True, top_k=0, temperature=1.5, seed=3)["text"] for o in OPENINGS]
    assert sampled == [p(o, do_sample=True, top_k=0, temperature=1.5, seed=3)["text"] for o in OPENINGS]
    assert sampled != [greedy_text(p, o, 7) for o in OPENINGS]


def test_max_length_is_the_total_length_including_the_prompt(pipe):
    prompts = ["床前", "春眠不觉晓，处处"]  # ragged: each row gets max_length - its own length
    out = pipe(prompts, max_length=14, do_sample=False)
    for prompt, got in zip(prompts, out):
        assert got["text"] == greedy_text(pipe, prompt, 14 - len(prompt))
    # without stop tokens (char tokenizer: one char per id) the text has exactly 14 characters
    stopless = {"do_sample": False, "eos_token_id": None}
    assert [len(o["text"]) for o in pipe(prompts, max_length=14, **stopless)] == [14, 14]
    assert len(pipe(prompts[0], max_length=1000, **stopless)["text"]) == 64  # capped at the context
    with pytest.raises(ValueError, match="max_length=8 .*prompt included"):
        pipe(prompts, max_length=8)
    with pytest.raises(ValueError, match="not both"):
        pipe(prompts[0], max_length=20, max_new_tokens=3)


# --------------------------------------------------------------------------------- stop strings
def test_stop_strings_cut_the_continuation(pipe):
    full = greedy_text(pipe, OPENINGS[0], 12)
    cont = full[len(OPENINGS[0]):]
    assert len(cont) >= 6
    stop = cont[3:5]
    want = OPENINGS[0] + cont[: cont.index(stop)]
    assert pipe(OPENINGS[0], stop=stop, do_sample=False)["text"] == want
    assert pipe(OPENINGS[0], stop=["不在其中的字串", stop], do_sample=False)["text"] == want
    assert OPENINGS[0] + "".join(pipe.stream(OPENINGS[0], stop=stop, do_sample=False)) == want
    # a stop string inside the prompt does not count
    assert pipe(OPENINGS[0], stop=OPENINGS[0][:2], do_sample=False, max_new_tokens=12)["text"] == full


# ------------------------------------------------------------------------------------- streaming
STREAM_OPTIONS = [
    {"do_sample": False},
    {"do_sample": True, "seed": 1, "temperature": 1.3},
    {"do_sample": True, "seed": 2, "top_k": 5, "max_length": 20},
    {"do_sample": True, "seed": 3, "top_p": 0.8, "stop": "。"},
]


@pytest.mark.parametrize("options", STREAM_OPTIONS)
def test_stream_equals_call_char_tokenizer(pipe, options):
    for prompt in OPENINGS:
        pieces = list(pipe.stream(prompt, **options))
        assert "".join(pieces) == pipe(prompt, return_full_text=False, **options)["text"]
        assert prompt + "".join(pieces) == pipe(prompt, **options)["text"]
        assert all(pieces)


@pytest.fixture(scope="module")
def jieba_pipe():
    tok = load_tokenizer(require_shared() / "modelscope-gpt3-1.3B")
    assert tok.kind == "jieba_bpe" and tok.vocab_size == 51200
    model = tiny_gpt(51200, seed=1)
    return gpt3zh.pipeline("text-generation", model=model, tokenizer=tok,
                           defaults=GenerationDefaults(eod_id=tok.eod_id, tokens_to_generate=12))


@pytest.mark.parametrize("options", STREAM_OPTIONS)
def test_stream_equals_call_jieba_bpe(jieba_pipe, options):
    for prompt in ["床前明月光，", {"src_txt": "今天天气不错，我们去"}]:
        pieces = list(jieba_pipe.stream(prompt, **options))
        assert "".join(pieces) == jieba_pipe(prompt, return_full_text=False, **options)["text"]
        assert all(not p.endswith("\ufffd") for p in pieces[:-1])


def test_the_prompt_comes_back_as_typed(jieba_pipe):
    # ModelScope re-decodes the prompt (JiebaBPE turns "，" into ","); transformers and gpt3zh
    # return it as the caller typed it, followed by the continuation.
    out = jieba_pipe("床前明月光，", do_sample=False)["text"]
    assert out.startswith("床前明月光，")
    assert out == "床前明月光，" + jieba_pipe("床前明月光，", do_sample=False, return_full_text=False)["text"]


def test_num_return_sequences(pipe):
    kw = dict(do_sample=True, seed=11, temperature=1.2, max_new_tokens=8)
    many = pipe(OPENINGS[0], num_return_sequences=3, **kw)
    assert isinstance(many, list) and len(many) == 3
    # sequence k of a call samples with seed + k: each equals its own single call
    assert many == [pipe(OPENINGS[0], **{**kw, "seed": 11 + k}) for k in range(3)]
    both = pipe(OPENINGS[:2], num_return_sequences=2, **kw)
    assert both[1] == [pipe(OPENINGS[1], **{**kw, "seed": 11 + k}) for k in (2, 3)]
    assert both == pipe(OPENINGS[:2], num_return_sequences=2, batch_size=1, **kw)


def test_text_ends_before_a_stop_token(char_dir):
    # eod, extra stop ids and <sep> end the continuation and are not part of the text.
    p = gpt3zh.pipeline(model=char_dir)
    ids = p.tokenizer.encode_prompt(OPENINGS[1])
    cont = generate(p.model, [ids], max_new_tokens=6)[0][len(ids):]
    p = gpt3zh.pipeline(model=char_dir, defaults=GenerationDefaults(
        eod_id=p.defaults.eod_id, extra_stop_ids=(cont[3],), tokens_to_generate=6))
    first = cont.index(cont[3])
    want = OPENINGS[1] + p.tokenizer.decode(cont[:first])
    assert p(OPENINGS[1], do_sample=False) == {"text": want}
    assert OPENINGS[1] + "".join(p.stream(OPENINGS[1], do_sample=False)) == want


@pytest.fixture(scope="module")
def byte_pipe():
    """A byte-level tokenizer: one id per byte, so a Chinese character takes three ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<sep>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = HFTokenizer(backend, backend.to_str().encode(), {"eod_token": "<|endoftext|>", "sep_token": "<sep>",
                                                           "pad_token": "<pad>"})
    assert len(tok.encode("床")) == 3 and tok.decode(tok.encode("床前")[:4]) == "床\ufffd"
    return TextGenerationPipeline(tiny_gpt(tok.vocab_size, seed=2), tok,
                                  GenerationDefaults(eod_id=tok.eod_id, tokens_to_generate=24))


def test_stream_never_splits_a_multibyte_character(byte_pipe):
    # Nudge the random model towards the UTF-8 bytes of one character, so complete characters and
    # split ones both occur in the sample.
    ids = byte_pipe.tokenizer.encode("月")
    with torch.no_grad():
        byte_pipe.model.tok_emb.weight[ids] *= 3
    for seed in range(3):
        opts = {"do_sample": True, "seed": seed, "temperature": 0.7}
        pieces = list(byte_pipe.stream("明月", **opts))
        text = byte_pipe("明月", **opts)["text"]
        assert "明月" + "".join(pieces) == text
        assert all(not p.endswith("\ufffd") for p in pieces[:-1]), pieces
        for p in pieces:  # no piece starts with the continuation bytes of a character
            assert p.encode("utf-8")[:1] not in {bytes([b]) for b in range(0x80, 0xC0)}


def test_stream_bert_tokenizer():
    tok = load_tokenizer(require_shared() / "tokenizers" / "bert-base-chinese" / "vocab.txt")
    model = tiny_gpt(tok.vocab_size, seed=4)
    p = TextGenerationPipeline(model, tok, GenerationDefaults(eod_id=tok.sep_id, tokens_to_generate=10))
    for options in STREAM_OPTIONS:
        for prompt in ["床前明月光，", "hello 世界"]:
            assert prompt + "".join(p.stream(prompt, **options)) == p(prompt, **options)["text"]


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "options, message",
    [
        ({"top_p": -0.5}, r"top_p must be in \[0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \[0, 1\]"),
        ({"num_return_sequences": 0}, "num_return_sequences must be an int >= 1"),
        ({"return_full_text": "no"}, "return_full_text must be True or False"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0"),
        ({"max_length": 0}, "max_length must be an int >= 1"),
        ({"stop": ""}, "stop must be a non-empty string"),
        ({"top_kk": 3}, "did you mean 'top_k'"),
    ],
)
def test_invalid_options(pipe, options, message):
    with pytest.raises(ValueError, match=message):
        pipe(OPENINGS[0], **options)
    with pytest.raises(ValueError, match=message):
        pipe.stream(OPENINGS[0], **options)  # at the call, not at the first piece


def test_invalid_inputs(pipe):
    with pytest.raises(ValueError, match="at most 63 tokens"):
        pipe("床" * 64)
    with pytest.raises(ValueError, match="src_txt, sentence, text"):
        pipe({"prompt": "床前"})
    with pytest.raises(ValueError, match="empty list"):
        pipe([])
    with pytest.raises(ValueError, match="batch_size"):
        pipe(OPENINGS, batch_size=0)
    with pytest.raises(TypeError, match="one prompt"):
        next(pipe.stream(OPENINGS))
    with pytest.raises(ValueError, match="num_return_sequences must be 1"):
        next(pipe.stream(OPENINGS[0], num_return_sequences=2))
    with pytest.raises(ValueError, match="encodes to no tokens"):
        pipe("")


def test_output_is_json_serialisable(pipe):
    out = pipe(OPENINGS, max_new_tokens=3, seed=0)
    assert json.loads(json.dumps(out, ensure_ascii=False)) == out
