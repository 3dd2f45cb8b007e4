"""The HF export used the way transformers users use it: AutoTokenizer, the model's inputs, pipeline.

Three tokenizer kinds on real files: the embedded char-level poetry-small model; ModelScope's 1.3B
JiebaBPE tokenizer.json with a tiny random model; Google's Chinese BERT vocab.txt with a tiny
random model. The text is the poetry test set plus edge cases. Exports are made the way users make
them: a gpt3zh model directory (weights, config.json, tokenizer) converted with `convert(to="hf")`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import require_shared
from gpt3zh import generation
from gpt3zh.assets import default_model_path
from gpt3zh.checkpoint import convert, describe, load_model, save_model
from gpt3zh.config import PRESETS
from gpt3zh.generation import GenerationConfig
from gpt3zh.model import GPT
from gpt3zh.pipelines import pipeline
from gpt3zh.tokenizer import (
    Tokenizer,
    load_tokenizer,
    remove_space_between_chinese_chars,
    train_char_tokenizer,
)

transformers = pytest.importorskip("transformers")

N_LINES = 300  # poetry test bodies: enough for every kind's paths, fast enough for jieba
EDGE = ["", "  两个空格  ", "Hello, World! ÉCOLE café", "第一行\n第二行", "ＡＢＣ１２３，全角！",
        "literal <sep> and [SEP]", "emoji 😀 end"]  # fmt: skip
PROMPTS = ["床前明月光，", "春眠不觉晓，", "白日依山尽，黄河入海流。"]
NEW_TOKENS = 24


@dataclass
class Export:
    kind: str
    src: Path  # the gpt3zh model directory it was converted from
    dir: Path  # the HF export
    tok: Tokenizer  # gpt3zh's tokenizer of src
    remote: bool  # needs trust_remote_code (JiebaBPE)

    def hf_tokenizer(self):
        return transformers.AutoTokenizer.from_pretrained(self.dir, trust_remote_code=self.remote)

    def stop_ids(self) -> tuple[int, ...]:
        """Where gpt3zh's pipeline stops: eod_id, extra_stop_ids and the tokenizer's <sep>."""
        gen = describe(self.src).generation
        stops = {gen.eod_id, *gen.extra_stop_ids} | (
            {self.tok.sep_id} if self.tok.sep_id is not None else set()
        )
        return tuple(sorted(stops))


@pytest.fixture(scope="module")
def lines() -> list[str]:
    with (require_shared() / "poetry" / "test.jsonl").open(encoding="utf-8") as f:
        return [json.loads(next(f))["src_txt"] for _ in range(N_LINES)] + EDGE


def _random_model_dir(out: Path, tok: Tokenizer, vocab_size: int, gelu: str) -> Path:
    """A tiny random gpt3zh model with `tok`, whose greedy output varies (large weights) and stops
    at a token it really emits: the 4th greedy token of the first prompt becomes an extra stop id."""
    cfg = PRESETS["base"].replace(vocab_size=vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=96,
                                  gelu=gelu, dropout=0.0, attn_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.3)
    prompt = tok.encode_prompt(PROMPTS[0])
    free = generation.generate(model, [prompt], GenerationConfig(max_new_tokens=4))[0]
    d = save_model(model, out, tokenizer=tok)
    config = json.loads((d / "config.json").read_text())
    config["generation"].update(eod_id=tok.eod_id, extra_stop_ids=[free[-1]], top_k=0, top_p=0.0)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def exports(tmp_path_factory, lines) -> dict[str, Export]:
    root = tmp_path_factory.mktemp("hf")
    data = require_shared()
    jieba = load_tokenizer(data / "modelscope-gpt3-1.3B")
    bert = load_tokenizer(data / "tokenizers" / "bert-base-chinese" / "vocab.txt")
    sources = {
        "hf": default_model_path(),
        "jieba_bpe": _random_model_dir(root / "jieba-src", jieba, 51200, "tanh"),
        "bert": _random_model_dir(root / "bert-src", bert, 21128, "erf"),
    }
    return {
        kind: Export(
            kind, src, convert(src, root / f"{kind}-hf", to="hf"), load_tokenizer(src), kind == "jieba_bpe"
        )
        for kind, src in sources.items()
    }


KINDS = ["hf", "jieba_bpe", "bert"]


# ----------------------------------------------------------------------------------- tokenizer ids
@pytest.mark.parametrize("kind", KINDS)
def test_autotokenizer_ids_equal_gpt3zh(exports, lines, kind):
    ex = exports[kind]
    hf = ex.hf_tokenizer()
    assert type(hf).__name__ == ("JiebaBPETokenizer" if ex.remote else "TokenizersBackend")
    ours = [ex.tok.encode_prompt(t) for t in lines]
    assert hf(lines)["input_ids"] == ours
    assert [hf.encode(t) for t in lines[:20]] == ours[:20]  # the single-text path too
    assert hf.tokenize(lines[0], add_special_tokens=True) == [ex.tok.id_to_token(i) for i in ours[0]]
    decoded = hf.batch_decode(ours, skip_special_tokens=True)
    if kind == "bert":  # transformers' BERT decode; ModelScope then removes spaces between Chinese characters
        decoded = [remove_space_between_chinese_chars(t) for t in decoded]
    assert decoded == [ex.tok.decode(ids) for ids in ours]


@pytest.mark.parametrize("kind", ["hf", "bert"])
def test_plain_kinds_load_without_remote_code(exports, lines, kind):
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(exports[kind].dir)
    assert hf(lines[:50])["input_ids"] == [exports[kind].tok.encode_prompt(t) for t in lines[:50]]
    assert not (exports[kind].dir / "tokenization_gpt3zh.py").exists()


def test_bert_export_drops_the_trailing_sep_as_modelscope_does_before_generating(exports):
    ex = exports["bert"]
    ids = ex.hf_tokenizer()("床前明月光")["input_ids"]
    assert ids == ex.tok.encode("床前明月光")[:-1] and ids[0] == ex.tok.cls_id


def test_jieba_export_refuses_to_load_without_its_jieba_class(exports):
    # Without trust_remote_code transformers falls back to a plain fast tokenizer, which would encode
    # without jieba (other ids). tokenizer.json is ModelScope's file byte for byte, whose legacy
    # Metaspace entry plain tokenizers refuse: a loud failure, never silently different ids.
    ex = exports["jieba_bpe"]
    assert (ex.dir / "tokenizer.json").read_bytes() == ex.tok.source
    with pytest.raises(Exception, match="prepend_scheme"):
        transformers.AutoTokenizer.from_pretrained(ex.dir)


def test_jieba_remote_code_needs_no_gpt3zh(exports, lines, tmp_path):
    ex = exports["jieba_bpe"]
    script = (
        "import json, sys\n"
        "sys.modules['gpt3zh'] = None  # any import of gpt3zh fails\n"
        "import transformers\n"
        "tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(json.dumps(tok(json.loads(sys.argv[2]))['input_ids']))\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    texts = lines[:20] + EDGE
    out = subprocess.run([sys.executable, "-c", script, str(ex.dir), json.dumps(texts)],
                         capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [ex.tok.encode_prompt(t) for t in texts]


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_carry_hf_names(exports, kind):
    ex, hf = exports[kind], exports[kind].hf_tokenizer()
    assert (hf.eos_token_id, hf.pad_token_id, hf.unk_token_id, hf.sep_token_id) == (
        ex.tok.eod_id, ex.tok.pad_id, ex.tok.unk_id, ex.tok.sep_id)  # fmt: skip
    assert hf.cls_token_id == ex.tok.cls_id
    assert hf.model_max_length == describe(ex.src).config.max_seq_len


@pytest.mark.parametrize("kind", KINDS)
def test_padded_tensors_equal_gpt3zh_call(exports, lines, kind):
    ex, hf = exports[kind], exports[kind].hf_tokenizer()
    texts = lines[:3] + ["", "短"]
    for side in ("right", "left"):
        hf.padding_side = side
        theirs = hf(texts, padding=True, return_tensors="pt")
        ours = ex.tok(texts, padding=True, padding_side=side, return_tensors="pt")
        assert sorted(theirs) == ["attention_mask", "input_ids"]  # no token_type_ids: GPT-2 would embed them
        assert torch.equal(theirs["input_ids"], ours["input_ids"])
        assert torch.equal(theirs["attention_mask"], ours["attention_mask"])


# --------------------------------------------------------------------------------- the model's inputs
@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_output_feeds_the_transformers_model(exports, kind):
    ex = exports[kind]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(ex.dir).eval()
    enc = ex.hf_tokenizer()(PROMPTS[2], return_tensors="pt")
    ours = load_model(ex.src)(torch.tensor([ex.tok.encode_prompt(PROMPTS[2])]))
    torch.testing.assert_close(
        hf_model(**enc).logits, ours, rtol=0, atol=1e-5
    )  # fp32 CPU, different matmul order


@pytest.mark.parametrize("kind", KINDS)
def test_generation_config_stops_where_gpt3zh_stops(exports, kind):
    ex = exports[kind]
    gen, hf = describe(ex.src).generation, transformers.GenerationConfig.from_pretrained(ex.dir)
    eos = hf.eos_token_id if isinstance(hf.eos_token_id, list) else [hf.eos_token_id]
    assert tuple(sorted(eos)) == ex.stop_ids() and eos[0] == gen.eod_id
    assert hf.pad_token_id == ex.tok.pad_id
    assert (hf.do_sample, hf.top_k, hf.temperature, hf.max_new_tokens) == (
        gen.top_k != 1, gen.top_k, gen.temperature, gen.tokens_to_generate)  # fmt: skip
    assert hf.top_p == (gen.top_p if 0 < gen.top_p <= 1 else 1.0)  # ModelScope's top_p=0 is "off"


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_greedy_equals_gpt3zh_generate(exports, kind):
    ex = exports[kind]
    pipe = transformers.pipeline("text-generation", model=str(ex.dir), trust_remote_code=ex.remote)
    model, hf_tok = load_model(ex.src), pipe.tokenizer
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_id=ex.stop_ids())
    stopped = 0
    for prompt in PROMPTS:
        ids = ex.tok.encode_prompt(prompt)
        ours = generation.generate(model, [ids], cfg)[0]
        out = pipe(prompt, do_sample=False, max_new_tokens=NEW_TOKENS, return_tensors=True)[0]
        assert out["generated_token_ids"] == ours, prompt
        assert hf_tok.decode(out["generated_token_ids"]) == hf_tok.decode(ours)
        stopped += ours[-1] in ex.stop_ids() and len(ours) - len(ids) < NEW_TOKENS
    assert stopped >= 1  # the stop ids were really exercised


@torch.no_grad()
def test_pipeline_text_equals_gpt3zh_pipeline_for_the_embedded_model(exports):
    # Char-level text decodes the same on both sides. (JiebaBPE normalises the prompt with NFKC and
    # BERT's transformers decode keeps spaces, so their texts differ by design; their ids are equal.)
    ex = exports["hf"]
    theirs = transformers.pipeline("text-generation", model=str(ex.dir))
    ours = pipeline("text-generation", model=ex.dir)
    for prompt in PROMPTS:
        text = ours(prompt, do_sample=False)["text"]  # the model's own max_new_tokens
        assert theirs(prompt, do_sample=False)[0]["generated_text"] == text


# ------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("kind", KINDS)
def test_gpt3zh_reads_its_hf_export_back(exports, lines, kind, tmp_path):
    ex = exports[kind]
    back = load_tokenizer(ex.dir)
    assert type(back) is type(ex.tok) and back.config() == ex.tok.config() and back.source == ex.tok.source
    assert back.encode_batch(lines) == ex.tok.encode_batch(lines)
    again = convert(ex.dir, tmp_path / "again", to="gpt3zh")
    own = json.loads((again / "tokenizer_config.json").read_text())
    assert own == ex.tok.config()  # gpt3zh's own layout again, not the HF one
    source = {"bert": "vocab.txt"}.get(kind, "tokenizer.json")
    assert sorted(p.name for p in again.iterdir()) == sorted(["config.json", "model.safetensors", source,
                                                              "tokenizer_config.json"])  # fmt: skip
    assert (again / source).read_bytes() == ex.tok.source
    assert load_tokenizer(again).encode_batch(lines) == ex.tok.encode_batch(lines)
    a, b = load_model(again).state_dict(), load_model(ex.src).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert describe(again).config == describe(ex.src).config


def test_hf_export_of_an_hf_export_is_the_same(exports, tmp_path):
    ex = exports["jieba_bpe"]
    again = convert(ex.dir, tmp_path / "again", to="hf")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenization_gpt3zh.py",
        "generation_config.json",
    ):
        assert (again / name).read_bytes() == (ex.dir / name).read_bytes(), name


def test_generation_config_for_greedy_and_top_p_zero(tmp_path):
    tok = train_char_tokenizer(["床前明月光，疑是地上霜。"])
    model = GPT(
        PRESETS["base"].replace(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    )
    save_model(model, tmp_path / "src", tokenizer=tok)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    for gen, expected in (
        (
            {"top_k": 1, "temperature": 0.5},
            {"do_sample": False},
        ),  # ModelScope's argmax: greedy, no sampling keys
        ({"top_k": 0, "top_p": 0.0, "temperature": 0.7}, {"do_sample": True, "top_k": 0, "top_p": 1.0}),
        ({"top_k": 40, "top_p": 0.95}, {"do_sample": True, "top_k": 40, "top_p": 0.95}),
    ):
        config["generation"].update(gen)
        (tmp_path / "src" / "config.json").write_text(json.dumps(config))
        out = convert(tmp_path / "src", tmp_path / "hf", to="hf", overwrite=True)
        written = json.loads((out / "generation_config.json").read_text())
        assert {k: written[k] for k in expected} == expected
        assert ("temperature" in written) == expected["do_sample"]
        assert transformers.GenerationConfig.from_pretrained(out).do_sample == expected["do_sample"]
        assert describe(out).generation.top_k == gen["top_k"]  # greedy reads back as top_k=1


# ------------------------------------------------------------------------------ the model's alias
@torch.no_grad()
def test_gpt_from_pretrained_is_load_model(exports):
    for path in (exports["hf"].src, exports["hf"].dir):  # gpt3zh and HF formats
        model, ref = GPT.from_pretrained(path, dtype="bfloat16"), load_model(path, dtype="bfloat16")
        assert type(model) is GPT and not model.training
        a, b = model.state_dict(), ref.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_describe_names_the_exported_tokenizer_kind(exports):
    names = {kind: describe(ex.dir).extra["tokenizer"] for kind, ex in exports.items()}
    assert names == {"hf": "tokenizer.json (character-level WordLevel, no jieba)",
                     "jieba_bpe": "tokenizer.json (jieba + BPE)", "bert": "vocab.txt (BERT WordPiece)"}  # fmt: skip


def test_a_modelscope_1_3B_directory_exports_its_jieba_tokenizer(tmp_path, lines):
    src = require_shared() / "modelscope-gpt3-1.3B"  # tokenizer.json + configuration.json, no gpt3zh config
    cfg = PRESETS["1.3B"].replace(d_model=32, n_head=4, n_layer=2, max_seq_len=64)
    d = save_model(GPT(cfg), tmp_path / "ms", format="megatron", tp=2)
    for name in ("tokenizer.json", "configuration.json"):
        (d / name).write_bytes((src / name).read_bytes())
    assert not (d / "tokenizer_config.json").exists()
    out = convert(d, tmp_path / "hf", to="hf")
    hf = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ours = load_tokenizer(src)
    assert hf(lines[:50])["input_ids"] == ours.encode_batch(lines[:50])
