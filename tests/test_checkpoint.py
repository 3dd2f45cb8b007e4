"""Checkpoint loading, saving and conversion: every format against an independent reference."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import require_shared
from gpt3zh import cli
from gpt3zh.checkpoint import (
    FORMATS,
    convert,
    describe,
    load_generation_defaults,
    load_model,
    load_pretrained,
    save_model,
)
from gpt3zh.config import PRESETS, GenerationDefaults
from gpt3zh.model import GPT


def spicy(model: GPT) -> GPT:
    """Large random weights (as the ModelScope parity fixture draws them) so layout or GELU mistakes show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_f"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
            else:
                p.normal_(0, 0.5 if "emb" in name else 0.2)
    return model.eval()


GEN = GenerationDefaults(eod_id=7, top_k=5, top_p=0.0, temperature=0.7, tokens_to_generate=33)


@pytest.fixture
def model(tiny_config):
    return spicy(GPT(tiny_config))


@pytest.fixture
def ids(tiny_config):
    return torch.randint(0, tiny_config.vocab_size, (2, 12))


def as_written(gen: GenerationDefaults, fmt: str) -> GenerationDefaults:
    """What a format keeps of the defaults: transformers has no top_p=0 (ModelScope's "off"), so the
    HF format writes top_p=1.0, the same sampling."""
    return dataclasses.replace(gen, top_p=1.0) if fmt == "hf" and gen.top_p == 0 else gen


def assert_same_weights(a: GPT, b: GPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# -------------------------------------------------------------------------- independent reference (spec §3)
def bias_gelu(x):
    # Megatron's fused bias_gelu kernel (spec §3.2), written out
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def reference_forward(sd, ids, *, n_head, eps, megatron, tanh, per_head=None):
    """ModelScope GPT3Model forward from spec §3.1 / §3.2, on ModelScope- or Megatron-named weights.

    per_head: qkv rows laid out [heads, 3, hn] (Megatron) rather than [3, heads, hn]; default by naming.
    """
    per_head = megatron if per_head is None else per_head
    lm = "language_model.embedding." if megatron else "language_model."
    top = "language_model.encoder." if megatron else "language_model.transformer."
    emb, pos = sd[lm + "word_embeddings.weight"], sd[lm + "position_embeddings.weight"]
    b, s = ids.shape
    x = emb[ids] + pos[:s]
    H = x.shape[-1]
    hn = H // n_head
    mask = torch.tril(torch.ones(s, s))
    n_layer = len({k.split(".")[3] for k in sd if ".layers." in k})
    for i in range(n_layer):
        p = f"{top}layers.{i}."
        att = p + ("self_attention." if megatron else "attention.")
        h = F.layer_norm(x, (H,), sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"], eps)
        qkv = h @ sd[att + "query_key_value.weight"].T + sd[att + "query_key_value.bias"]
        if per_head:  # rows laid out [heads, 3, hn]
            q, k, v = qkv.view(b, s, n_head, 3 * hn).split(hn, dim=-1)
        else:  # rows laid out [3, heads, hn]
            q, k, v = (t.reshape(b, s, n_head, hn) for t in qkv.split(H, dim=-1))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hn)
        scores = scores * mask - 10000.0 * (1 - mask)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, H)
        x = x + ctx @ sd[att + "dense.weight"].T + sd[att + "dense.bias"]
        h = F.layer_norm(x, (H,), sd[p + "post_attention_layernorm.weight"],
                         sd[p + "post_attention_layernorm.bias"], eps)
        a = h @ sd[p + "mlp.dense_h_to_4h.weight"].T + sd[p + "mlp.dense_h_to_4h.bias"]
        a = bias_gelu(a) if tanh else F.gelu(a)
        x = x + a @ sd[p + "mlp.dense_4h_to_h.weight"].T + sd[p + "mlp.dense_4h_to_h.bias"]
    x = F.layer_norm(x, (H,), sd[top + "final_layernorm.weight"], sd[top + "final_layernorm.bias"], eps)
    return x @ emb.T


MEGATRON_SPLIT_DIM = {  # spec §4.2, written out independently of gpt3zh.checkpoint.tables
    "word_embeddings.weight": 0, "query_key_value.weight": 0, "query_key_value.bias": 0,
    "dense_h_to_4h.weight": 0, "dense_h_to_4h.bias": 0, "self_attention.dense.weight": 1, "dense_4h_to_h.weight": 1,
}


def merge_megatron_by_spec(shard_files):
    shards = [torch.load(f, weights_only=True)["module"] for f in shard_files]
    merged = {}
    for key in shards[0]:
        dim = next((d for suffix, d in MEGATRON_SPLIT_DIM.items() if key.endswith(suffix)), None)
        merged[key] = shards[0][key] if dim is None else torch.cat([s[key] for s in shards], dim)
    return merged


@torch.no_grad()
def test_modelscope_file_matches_the_spec_forward(model, ids, tmp_path):
    save_model(model, tmp_path / "ms", format="modelscope")
    sd = torch.load(tmp_path / "ms" / "pytorch_model.bin", weights_only=True)
    assert len(sd) == 4 + 12 * model.config.n_layer
    cfg = model.config
    ref = reference_forward(sd, ids, n_head=cfg.n_head, eps=cfg.ln_eps, megatron=False, tanh=False)
    loaded = load_model(tmp_path / "ms")
    torch.testing.assert_close(loaded(ids), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=1e-5)
    # the reference can tell the layouts apart, so the check above can fail
    wrong = reference_forward(sd, ids, n_head=cfg.n_head, eps=cfg.ln_eps, megatron=False, tanh=True)
    assert (wrong - ref).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_megatron_shards_match_the_spec_forward(tiny_config, ids, tmp_path, tp):
    model = spicy(GPT(tiny_config.replace(gelu="tanh", d_ff=48)))
    save_model(model, tmp_path / "mg", format="megatron", tp=tp)
    files = sorted((tmp_path / "mg" / "model").iterdir())
    assert [f.name for f in files] == [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    sd = merge_megatron_by_spec(files)
    ref = reference_forward(sd, ids, n_head=4, eps=tiny_config.ln_eps, megatron=True, tanh=True)
    torch.testing.assert_close(load_model(tmp_path / "mg")(ids), ref, rtol=0, atol=1e-5)
    blocked = reference_forward(sd, ids, n_head=4, eps=tiny_config.ln_eps, megatron=True, tanh=True, per_head=False)
    assert (blocked - ref).abs().max() > 1e-3  # the per-head vs blocked qkv layouts really differ


# ------------------------------------------------------------------------------------ round trips
@torch.no_grad()
@pytest.mark.parametrize("fmt,tp", [("gpt3zh", 1), ("modelscope", 1), ("megatron", 1), ("megatron", 2),
                                    ("megatron", 4), ("hf", 1)])
def test_save_then_load_is_exact(model, ids, tmp_path, fmt, tp):
    out = save_model(model, tmp_path / fmt, format=fmt, tp=tp, generation=GEN)
    pretrained = load_pretrained(out)
    loaded = pretrained.model
    assert not loaded.training
    assert loaded.config == model.config
    written = as_written(GEN, fmt)
    assert pretrained.generation == written and load_generation_defaults(out) == written and pretrained.format == fmt
    assert_same_weights(loaded, model)
    assert torch.equal(loaded(ids), model(ids))
    info = describe(out)
    assert (info.format, info.config, info.extra["dtype"]) == (fmt, model.config, "float32")
    assert info.extra.get("tp", 1) == tp


def test_gpt3zh_format_layout(model, tmp_path):
    from safetensors import safe_open

    save_model(model, tmp_path / "m", generation=GEN)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config == {"format": "gpt3zh", "model": model.config.to_dict(), "generation": GEN.to_dict()}
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(model.state_dict())  # no tied output-head duplicate


def test_load_model_casts_dtype(model, tmp_path):
    save_model(model, tmp_path / "m", format="megatron", tp=2)
    loaded = load_model(tmp_path / "m", dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    save_model(loaded, tmp_path / "bf16", format="hf")
    assert describe(tmp_path / "bf16").extra["dtype"] == "bfloat16"
    assert torch.equal(load_model(tmp_path / "bf16").tok_emb.weight, model.tok_emb.weight.bfloat16())


def test_full_conversion_chain_is_bitwise_exact(model, tmp_path):
    require_shared()
    start = save_model(model, tmp_path / "a", generation=GEN)
    tokenizer = require_shared() / "modelscope-gpt3-1.3B" / "tokenizer.json"
    shutil.copy(tokenizer, start / "tokenizer.json")
    # Said explicitly: the single-process configuration.json written on the way names the BERT
    # preprocessor, and the HF step must know the kind to write a transformers tokenizer.
    (start / "tokenizer_config.json").write_text('{"type": "jieba_bpe"}')
    ms = convert(start, tmp_path / "b", to="modelscope")
    mg = convert(ms, tmp_path / "c", to="megatron", tp=4)
    hf = convert(mg, tmp_path / "d", to="hf")
    back = convert(hf, tmp_path / "e", to="gpt3zh")
    assert [describe(p).format for p in (ms, mg, hf, back)] == ["modelscope", "megatron", "hf", "gpt3zh"]
    assert describe(mg).extra["tp"] == 4
    final = load_pretrained(back)
    assert_same_weights(final.model, model)
    # The HF step adds the tokenizer's <sep> (id 1) as a stop id, where gpt3zh's pipeline stops too.
    expected = dataclasses.replace(as_written(GEN, "hf"), extra_stop_ids=(1,))
    assert final.model.config == model.config and final.generation == expected
    assert (back / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert describe(back).extra["tokenizer"].startswith("tokenizer.json")


def test_megatron_configuration_is_based_on_the_source(model, tmp_path):
    src = save_model(model, tmp_path / "src", format="megatron", tp=1)
    conf = json.loads((src / "configuration.json").read_text())
    conf["megatron"].update(checkpoint_tensor_model_parallel_size=1, rank=0)
    conf["train"] = {"max_epochs": 3}
    (src / "configuration.json").write_text(json.dumps(conf))
    out = convert(src, tmp_path / "tp2", to="megatron", tp=2)
    written = json.loads((out / "configuration.json").read_text())
    assert written["megatron"] == {"world_size": 2, "tensor_model_parallel_size": 2}
    assert written["train"] == {"max_epochs": 3} and written["pipeline"]["type"] == "gpt3-generation"
    single = json.loads((convert(src, tmp_path / "single", to="modelscope") / "configuration.json").read_text())
    assert "megatron" not in single and single["pipeline"]["type"] == "text-generation"


def test_tokenizer_object_is_saved_with_the_model(model, tmp_path):
    class VocabTokenizer:  # any object with .save(dir), as gpt3zh tokenizers have
        def save(self, directory):
            (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n", encoding="utf-8")

    out = save_model(model, tmp_path / "m", format="modelscope", tokenizer=VocabTokenizer())
    assert (out / "vocab.txt").read_text(encoding="utf-8") == "[PAD]\n[UNK]\n"
    assert describe(out).extra["tokenizer"] == "vocab.txt (BERT WordPiece)"


# ------------------------------------------------------------------------------------ Hugging Face
@torch.no_grad()
@pytest.mark.parametrize("gelu,d_ff", [("erf", None), ("tanh", 48)])
def test_hf_export_matches_transformers(tiny_config, ids, tmp_path, gelu, d_ff):
    transformers = pytest.importorskip("transformers")
    model = spicy(GPT(tiny_config.replace(gelu=gelu, d_ff=d_ff)))
    save_model(model, tmp_path / "hf", format="hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.activation_function == ("gelu" if gelu == "erf" else "gelu_new")
    torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-5)


@torch.no_grad()
def test_hf_written_by_transformers_loads(ids, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.config.gelu == "tanh" and loaded.config.vocab_size == 128
    torch.testing.assert_close(loaded(ids), hf(ids).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ config quirks
def _edit_config(d, **changes):
    path = d / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_single_process_config_ignores_what_modelscope_ignores(model, tmp_path):
    d = save_model(model, tmp_path / "ms", format="modelscope")
    _edit_config(d, layer_norm_eps=0.5, kv_channels=3, ffn_hidden_size=7, hidden_act="relu",
                 bias_gelu_fusion=True, attention_type="self", initializer_range=0.5, intermediate_size=768)
    cfg = describe(d).config
    assert (cfg.ln_eps, cfg.gelu, cfg.d_ff, cfg.init_std) == (model.config.ln_eps, "erf", None, model.config.init_std)
    assert_same_weights(load_model(d), model)


def test_megatron_config_reads_gelu_fusion_and_ffn(tiny_config, tmp_path):
    model = GPT(tiny_config.replace(d_ff=48, gelu="erf"))
    d = save_model(model, tmp_path / "mg", format="megatron", tp=2)
    assert json.loads((d / "config.json").read_text())["bias_gelu_fusion"] is False
    assert describe(d).config.gelu == "erf" and describe(d).config.d_ff == 48
    _edit_config(d, bias_gelu_fusion=True, kv_channels=99, layer_norm_eps=0.5)
    assert describe(d).config == tiny_config.replace(d_ff=48, gelu="tanh")


def test_generation_defaults_come_from_config_json(model, tmp_path):
    d = save_model(model, tmp_path / "ms", format="modelscope")
    _edit_config(d, eod_id=3, top_k=20, top_p=0.95, temperature=0.5, tokens_to_generate=64)
    gen = load_pretrained(d).generation
    assert gen == GenerationDefaults(eod_id=3, top_k=20, top_p=0.95, temperature=0.5, tokens_to_generate=64)


def test_modelscope_wrapped_and_prefixed_weights_load(model, ids, tmp_path):
    d = save_model(model, tmp_path / "ms", format="modelscope")
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}}, d / "pytorch_model.bin")
    assert torch.equal(load_model(d)(ids), model(ids))


def test_megatron_bare_shards_without_module_wrapper_load(model, ids, tmp_path):
    d = save_model(model, tmp_path / "mg", format="megatron", tp=2)
    for f in (d / "model").iterdir():
        torch.save(torch.load(f, weights_only=True)["module"], f)
    assert torch.equal(load_model(d)(ids), model(ids))


# ---------------------------------------------------------------------- the real 1.3B config files
def real_1_3b_dir():
    return require_shared() / "modelscope-gpt3-1.3B"


def test_real_1_3B_config_parses_to_the_preset():
    src = real_1_3b_dir()
    from gpt3zh.checkpoint.configs import modelscope_to_config

    cfg, gen = modelscope_to_config(json.loads((src / "config.json").read_text()), src / "config.json", megatron=True)
    assert cfg == PRESETS["1.3B"]
    assert (cfg.gelu, cfg.ln_eps, cfg.vocab_size) == ("tanh", 1e-5, 51200)
    assert gen == GenerationDefaults()  # the file sets no generation keys


@torch.no_grad()
def test_describe_and_load_a_shrunk_1_3B_directory(tmp_path, ids):
    src = real_1_3b_dir()
    d = tmp_path / "gpt3-1.3B-shrunk"
    d.mkdir()
    shutil.copy(src / "configuration.json", d)
    shutil.copy(src / "tokenizer.json", d)
    config = json.loads((src / "config.json").read_text())
    config.update(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=64)
    (d / "config.json").write_text(json.dumps(config))
    # shards not written yet: describe must fail clearly
    with pytest.raises(ValueError, match="no tensor-parallel shards found"):
        describe(d)
    cfg = PRESETS["1.3B"].replace(d_model=32, n_head=4, n_layer=2, max_seq_len=64)
    model = spicy(GPT(cfg))
    tmp = save_model(model, tmp_path / "tmp", format="megatron", tp=2)
    shutil.copytree(tmp / "model", d / "model")
    info = describe(d)
    assert (info.format, info.config, info.extra["tp"]) == ("megatron", cfg, 2)
    assert info.extra["tokenizer"].startswith("tokenizer.json")
    assert torch.equal(load_model(d)(ids), model(ids))


# --------------------------------------------------------------------------------------------- CLI
def test_cli_convert_then_info(model, tmp_path, capsys):
    src = save_model(model, tmp_path / "src", format="modelscope")
    assert cli.main(["convert", str(src), str(tmp_path / "mg"), "--to", "megatron", "--tp", "2"]) == 0
    assert "megatron" in capsys.readouterr().out
    assert cli.main(["info", str(tmp_path / "mg"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["params"], info["tp"]) == ("megatron", model.config.num_params, 2)
    assert_same_weights(load_model(tmp_path / "mg"), model)


def test_cli_convert_reports_bad_input_cleanly(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_formats_table_lists_the_four_formats():
    assert list(FORMATS) == ["gpt3zh", "hf", "megatron", "modelscope"]
