"""Bad input: each case is a clear CheckpointError naming the file or key and what was expected."""

import json
import pickle
import re
import shutil

import pytest
import torch

from gpt3zh.checkpoint import CheckpointError, describe, load_model, save_model
from gpt3zh.model import GPT


@pytest.fixture
def model(tiny_config):
    return GPT(tiny_config).eval()


@pytest.fixture
def ms_dir(model, tmp_path):
    return save_model(model, tmp_path / "ms", format="modelscope")


@pytest.fixture
def mg_dir(model, tmp_path):
    return save_model(model, tmp_path / "mg", format="megatron", tp=4)


def expect_error(path, *patterns):
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in:\n{info.value}"
    return str(info.value)


def edit_sd(path, fn, wrap=None):
    obj = torch.load(path, weights_only=True)
    sd = obj[wrap] if wrap else obj
    fn(sd)
    torch.save({wrap: sd} if wrap else sd, path)


QKV = "language_model.transformer.layers.0.attention.query_key_value.weight"


# ------------------------------------------------------------------------------------------ files
def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", r"nope: no such model directory")


def test_path_is_a_file(ms_dir):
    expect_error(ms_dir / "config.json", r"expected a model directory, got a file")


def test_missing_config_json(ms_dir):
    (ms_dir / "config.json").unlink()
    expect_error(ms_dir, r"ms/config.json: file not found")


def test_missing_weights_file(ms_dir):
    (ms_dir / "pytorch_model.bin").unlink()
    expect_error(ms_dir, r"ms/pytorch_model.bin: file not found \(ModelScope weights\)")


@pytest.mark.parametrize("fmt,file", [("modelscope", "pytorch_model.bin"), ("gpt3zh", "model.safetensors"),
                                      ("hf", "model.safetensors"), ("megatron", "model/mp_rank_01_model_states.pt")])
def test_truncated_weights(model, tmp_path, fmt, file):
    d = save_model(model, tmp_path / fmt, format=fmt, tp=2 if fmt == "megatron" else 1)
    path = d / file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(d, re.escape(str(path)) + r": cannot read: truncated or not a")


def test_invalid_json_config(ms_dir):
    (ms_dir / "config.json").write_text('{"hidden_size": 32,\n "vocab_size": }')
    expect_error(ms_dir, r"config.json: invalid JSON at line 2 column")


def test_config_json_not_an_object(ms_dir):
    (ms_dir / "config.json").write_text("[1, 2]")
    expect_error(ms_dir, r"config.json: expected a JSON object at the top level, got list")


# -------------------------------------------------------------------------------------- contents
def test_wrong_shape_names_key_and_both_shapes(ms_dir):
    edit_sd(ms_dir / "pytorch_model.bin", lambda sd: sd.__setitem__(QKV, torch.zeros(96, 31)))
    expect_error(ms_dir, "pytorch_model.bin: the weights do not match",
                 re.escape(f"shape mismatch: {QKV} is [96, 31] in the file, expected [96, 32]"))


def test_missing_key(ms_dir):
    name = "language_model.transformer.final_layernorm.bias"
    edit_sd(ms_dir / "pytorch_model.bin", lambda sd: sd.pop(name))
    expect_error(ms_dir, re.escape(f"missing keys (1): {name} [32]"))


def test_extra_key(ms_dir):
    edit_sd(ms_dir / "pytorch_model.bin", lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(128, 32)))
    expect_error(ms_dir, re.escape("unexpected keys (1): lm_head.weight [128, 32]"))


def test_non_tensor_value(ms_dir):
    edit_sd(ms_dir / "pytorch_model.bin", lambda sd: sd.__setitem__("step", 3))
    expect_error(ms_dir, r"expected tensors only, but these keys hold other values: step")


def test_vocab_mismatch_names_config_and_weights(ms_dir):
    cfg = json.loads((ms_dir / "config.json").read_text())
    (ms_dir / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256}))
    expect_error(ms_dir, r"config.json says vocab_size=256",
                 re.escape("language_model.word_embeddings.weight is [128, 32] in the file, expected [256, 32]"))


def test_megatron_vocab_mismatch_per_shard(mg_dir):
    cfg = json.loads((mg_dir / "config.json").read_text())
    (mg_dir / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256}))
    expect_error(mg_dir, r"mp_rank_00_model_states.pt: the weights do not match",
                 r"vocab_size=256.*split over 4 TP shards",
                 re.escape("word_embeddings.weight is [32, 32] in the file, expected [64, 32]"))


def test_megatron_missing_shard(mg_dir):
    (mg_dir / "model" / "mp_rank_01_model_states.pt").unlink()
    expect_error(mg_dir, r"shard mp_rank_01_model_states.pt is missing: found ranks 00, 02, 03, expected 00..03")


def test_megatron_no_shards(mg_dir):
    shutil.rmtree(mg_dir / "model")
    expect_error(mg_dir, r"model: no tensor-parallel shards found \(expected mp_rank_00_model_states.pt")


def test_megatron_shards_that_disagree(mg_dir):
    path = mg_dir / "model" / "mp_rank_02_model_states.pt"
    edit_sd(path, lambda sd: sd["language_model.encoder.final_layernorm.weight"].add_(1), wrap="module")
    expect_error(mg_dir, r"final_layernorm.weight is replicated across TP ranks but shard 2 differs from shard 0")


def test_megatron_tp_not_dividing_heads(model, tmp_path):
    with pytest.raises(CheckpointError, match="tensor parallelism 3 does not divide n_head=4"):
        save_model(model, tmp_path / "mg3", format="megatron", tp=3)
    assert not (tmp_path / "mg3").exists()


# ------------------------------------------------------------------------------- code payloads
class Payload:
    """Unpickling this runs exec(), which creates a marker file: a stand-in for any malicious code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("fmt,file", [("modelscope", "pytorch_model.bin"),
                                      ("megatron", "model/mp_rank_00_model_states.pt")])
def test_pickle_with_code_payload_is_refused_and_never_run(model, tmp_path, fmt, file):
    d = save_model(model, tmp_path / fmt, format=fmt)
    marker = tmp_path / "pwned"
    sd = {"language_model.word_embeddings.weight": torch.zeros(2, 2), "evil": Payload(marker)}
    torch.save({"module": sd} if fmt == "megatron" else sd, d / file)
    expect_error(d, re.escape(str(d / file)) + r": refused to load: the pickle references (builtins\.)?exec,")
    with pytest.raises(CheckpointError, match="refused to load"):
        describe(d)
    assert not marker.exists()
    torch.load(d / file, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "pwned"


def _dcp_checkpoint(model, d):
    """A parallel run's checkpoint as DistributedTrainer.checkpoint lays it out (one process here)."""
    import torch.distributed.checkpoint as dcp

    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 3, dtype=torch.long)).sum().backward()
    opt.step()
    d.mkdir()
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=str(d / "dcp"))
    torch.save({"step": 2}, d / "state.pt")
    (d / "meta.json").write_text(json.dumps({"step": 2, "parallel": {"dp": 1, "tp": 1}}))
    config = {"format": "gpt3zh-train", "model": model.config.to_dict(), "generation": {"eod_id": 7}}
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_a_parallel_runs_checkpoint_loads_without_unpickling_its_metadata(model, tmp_path):
    d = _dcp_checkpoint(model, tmp_path / "step-00000002")
    loaded = load_model(d)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert describe(d).extra["parallel"] == {"dp": 1, "tp": 1} and describe(d).generation.eod_id == 7
    marker = tmp_path / "pwned"
    (d / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    expect_error(d, r"dcp/.metadata: refused to load: the DCP metadata references builtins.exec")
    assert not marker.exists()
    pickle.loads((d / "dcp" / ".metadata").read_bytes())  # the payload is real: DCP's own pickle.load runs it
    assert marker.read_text() == "pwned"


# ------------------------------------------------------------------------------------- configs
def _set_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_heads_not_dividing_hidden(ms_dir):
    _set_config(ms_dir, num_attention_heads=5)
    expect_error(ms_dir, r"config.json: num_attention_heads=5 does not divide hidden_size=32")


def test_gpt3zh_config_heads_not_dividing(model, tmp_path):
    d = save_model(model, tmp_path / "g")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["n_head"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    expect_error(d, r"config.json.*d_model=32 is not divisible by n_head=5")


def test_gpt3zh_config_unknown_key(model, tmp_path):
    d = save_model(model, tmp_path / "g")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["n_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    expect_error(d, r"config.json \[model\]: unknown key 'n_layers'; did you mean 'n_layer'")


def test_wrongly_typed_config_value(ms_dir):
    _set_config(ms_dir, hidden_size="32")
    expect_error(ms_dir, r"config.json: hidden_size='32' must be a JSON int")


def test_negative_layer_count(ms_dir):
    _set_config(ms_dir, num_hidden_layers=0)
    expect_error(ms_dir, r"config.json: GPTConfig.n_layer must be a positive int, got 0")


def test_post_layernorm_residual_is_refused(mg_dir):
    _set_config(mg_dir, apply_residual_connection_post_layernorm=True)
    expect_error(mg_dir, r"config.json: apply_residual_connection_post_layernorm=true is not supported")


def test_hf_untied_head_and_unknown_activation(model, tmp_path):
    from safetensors.torch import load_file, save_file

    d = save_model(model, tmp_path / "hf", format="hf")
    sd = load_file(d / "model.safetensors")
    save_file({**sd, "lm_head.weight": torch.zeros(128, 32)}, d / "model.safetensors", metadata={"format": "pt"})
    expect_error(d, r"lm_head.weight differs from transformer.wte.weight; gpt3zh needs a tied output head")
    _set_config(d, activation_function="relu")
    expect_error(d, r"config.json: activation_function='relu' is not supported")


# ------------------------------------------------------------------------------------- saving
def test_single_process_format_refuses_tanh_and_custom_ffn(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match="always runs erf GELU"):
        save_model(GPT(tiny_config.replace(gelu="tanh")), tmp_path / "a", format="modelscope")
    with pytest.raises(CheckpointError, match="always has MLP width 4\\*d_model=128, but this model has d_ff=48"):
        save_model(GPT(tiny_config.replace(d_ff=48)), tmp_path / "b", format="modelscope")
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp dirs left


def test_unknown_format_and_tp_for_unsharded_format(model, tmp_path):
    with pytest.raises(CheckpointError, match="unknown format 'onnx'"):
        save_model(model, tmp_path / "x", format="onnx")
    with pytest.raises(CheckpointError, match="only the 'megatron' format is written as tensor-parallel shards"):
        save_model(model, tmp_path / "x", format="hf", tp=2)


def test_refuses_to_overwrite_a_non_model_directory(model, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing to overwrite a non-empty directory that is not a model"):
        save_model(model, out)
    assert (out / "thesis.txt").read_text() == "precious"
    save_model(model, out, overwrite=True)
    assert not (out / "thesis.txt").exists() and describe(out).format == "gpt3zh"


def test_failed_write_leaves_existing_output_untouched(model, tiny_config, tmp_path):
    out = save_model(model, tmp_path / "m", format="hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class BrokenTokenizer:
        def save(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(GPT(tiny_config), out, format="hf", tokenizer=BrokenTokenizer())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # temp dir cleaned up


def test_replacing_a_model_directory_is_allowed(model, tiny_config, tmp_path):
    out = save_model(model, tmp_path / "m", format="megatron", tp=4)
    save_model(model, out, format="megatron", tp=2)
    assert describe(out).extra["tp"] == 2
    assert sorted(p.name for p in (out / "model").iterdir()) == ["mp_rank_00_model_states.pt",
                                                                 "mp_rank_01_model_states.pt"]
