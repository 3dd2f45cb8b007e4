"""Model ids (`owner/name`) resolved through a ModelScope cache laid out as ModelScope's client lays it.

The cache is built in tmp_path: a tiny model saved by gpt3zh.save_model in the Megatron layout
of the 1.3B model, with the real 1.3B tokenizer.json beside it. No network: sockets are refused.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt3zh
from conftest import require_shared
from gpt3zh import cli
from gpt3zh.checkpoint import CheckpointError, convert, describe, load_model, save_model
from gpt3zh.config import GPTConfig
from gpt3zh.hub import HubSettings, ModelNotFoundError, cache_candidates, is_model_id, resolve_model
from gpt3zh.model import GPT
from gpt3zh.tokenizer import load_tokenizer

MODEL_ID = "damo/nlp_gpt3_text-generation_1.3B"
MASKED = "nlp_gpt3_text-generation_1___3B"  # how ModelScope >= 1.9 writes the '.' on disk
HAS_MODELSCOPE = importlib.util.find_spec("modelscope") is not None


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("test_hub: network access is not allowed in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def ms_model(tmp_path_factory):
    """A ModelScope-style 1.3B directory (config.json, configuration.json, model/, tokenizer.json), tiny."""
    data = require_shared()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=51200, n_layer=1, n_head=2, d_model=16, max_seq_len=64, gelu="tanh",
                    dropout=0.0, attn_dropout=0.0)
    model = GPT(cfg).eval()
    src = save_model(model, tmp_path_factory.mktemp("src") / "model", format="megatron")
    shutil.copy2(data / "modelscope-gpt3-1.3B" / "tokenizer.json", src / "tokenizer.json")
    return src, model


def lay_out(src: Path, cache: Path, relative: str) -> Path:
    dest = cache / relative
    shutil.copytree(src, dest)
    return dest


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------ resolution
SNAPSHOTS = "models/damo--nlp_gpt3_text-generation_1.3B/snapshots"


@pytest.mark.parametrize("relative", [
    f"models/damo/{MASKED}",  # clients 1.23-1.37 with MODELSCOPE_CACHE set
    "models/damo/nlp_gpt3_text-generation_1.3B",  # ... the dotted name they link to the masked one
    f"hub/models/damo/{MASKED}",  # ... with the default cache ~/.cache/modelscope/hub
    f"{SNAPSHOTS}/master",  # clients >= 1.38 (modelscope_hub)
    f"{SNAPSHOTS}/main",
    f"{SNAPSHOTS}/v1.0.1",  # the only cached revision
    f"damo/{MASKED}",  # clients before 1.23, MODELSCOPE_CACHE set
    "damo/nlp_gpt3_text-generation_1.3B",
    f"hub/damo/{MASKED}",  # ... with the default cache
])
def test_id_resolves_in_every_cache_layout(ms_model, tmp_path, monkeypatch, relative):
    src, model = ms_model
    cache = tmp_path / "cache"
    dest = lay_out(src, cache, relative)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    assert resolve_model(MODEL_ID) == dest
    assert resolve_model(MODEL_ID, HubSettings(cache)) == dest
    assert same_weights(load_model(MODEL_ID), model)


def test_search_order_and_what_is_not_a_model(ms_model, tmp_path, monkeypatch):
    src, _ = ms_model
    cache = tmp_path / "cache"
    settings = HubSettings(cache, offline=True)
    (cache / "models" / "damo" / MASKED).mkdir(parents=True)  # what an interrupted download leaves
    lay_out(src, cache, f"{SNAPSHOTS}/v1")
    lay_out(src, cache, f"{SNAPSHOTS}/v2")
    with pytest.raises(ModelNotFoundError):  # empty dir, and two revisions but no master / main
        resolve_model(MODEL_ID, settings)
    pre_123 = lay_out(src, cache, "damo/nlp_gpt3_text-generation_1.3B")
    assert resolve_model(MODEL_ID, settings) == pre_123
    master = lay_out(src, cache, f"{SNAPSHOTS}/master")
    assert resolve_model(MODEL_ID, settings) == master
    legacy = lay_out(src, cache, f"hub/models/damo/{MASKED}")  # the newest client reuses it: so do we
    assert resolve_model(MODEL_ID, settings) == legacy
    monkeypatch.chdir(tmp_path)
    local = lay_out(src, tmp_path, MODEL_ID)  # ./damo/nlp_gpt3_text-generation_1.3B wins over any cache
    assert resolve_model(MODEL_ID, settings) == Path(MODEL_ID) and Path(MODEL_ID).resolve() == local.resolve()


def test_settings_come_from_the_environment(tmp_path):
    assert HubSettings.from_env({}) == HubSettings(Path.home() / ".cache" / "modelscope", offline=False)
    assert HubSettings.from_env({"MODELSCOPE_CACHE": str(tmp_path)}).cache == tmp_path
    assert HubSettings.from_env({"MODELSCOPE_CACHE": "~/ms"}).cache == Path.home() / "ms"
    assert HubSettings.from_env({"GPT3ZH_OFFLINE": "1"}).offline
    assert not HubSettings.from_env({"GPT3ZH_OFFLINE": "0"}).offline
    assert cache_candidates("a.b/c.d", tmp_path)[:2] == [tmp_path / "models/a.b/c.d", tmp_path / "models/a___b/c___d"]
    assert len(cache_candidates("damo/base", tmp_path)) == 5  # no '.': one spelling per layout


@pytest.mark.parametrize("name, is_id", [
    (MODEL_ID, True), ("damo/nlp_gpt3_text-generation_chinese-base", True), ("owner/name", True),
    ("name", False), ("a/b/c", False), ("/abs/path", False), ("./damo/x", False), ("../damo/x", False),
    ("damo/", False), ("/damo", False), ("da mo/x", False), ("~/x", False), ("", False),
])
def test_what_counts_as_a_model_id(name, is_id):
    assert is_model_id(name) is is_id


# ---------------------------------------------------------------------------- loading by model id
def test_every_loader_takes_an_id(ms_model, tmp_path, monkeypatch, capsys):
    src, model = ms_model
    data = require_shared()
    cache = tmp_path / "cache"
    lay_out(src, cache, f"models/damo/{MASKED}")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))

    tok, real = load_tokenizer(MODEL_ID), load_tokenizer(data / "modelscope-gpt3-1.3B")
    text = "程序员脱发用什么洗发水"
    assert tok.kind == "jieba_bpe" and tok.encode(text) == real.encode(text)
    info = describe(MODEL_ID)
    assert (info.format, info.config) == ("megatron", model.config)
    out = convert(MODEL_ID, tmp_path / "converted", to="gpt3zh")
    assert same_weights(load_model(out), model) and load_tokenizer(out).encode(text) == real.encode(text)

    # the pipeline and the CLI's --model reach the same loaders
    by_path = gpt3zh.pipeline("text-generation", model=src)(text, do_sample=False, max_new_tokens=5)
    by_id = gpt3zh.pipeline("text-generation", model=MODEL_ID)(text, do_sample=False, max_new_tokens=5)
    assert by_id == by_path and by_id["text"].startswith(text)
    assert cli.main(["generate", "--model", MODEL_ID, "--no-do-sample", "--max-new-tokens", "5", "--json",
                     text]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["text"] == by_path["text"]
    assert cli.main(["info", MODEL_ID, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "megatron"


def test_training_config_takes_an_id(ms_model, tmp_path, monkeypatch):
    src, model = ms_model
    data = require_shared()
    cache = tmp_path / "cache"
    lay_out(src, cache, f"models/damo/{MASKED}")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    rows = [json.loads(line) for line in (data / "poetry" / "test.jsonl").open(encoding="utf-8")][:8]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"src_txt": r["src_txt"]}, ensure_ascii=False) + "\n"
                                                  for r in rows), encoding="utf-8")
    result = gpt3zh.train({
        "model": MODEL_ID,
        "dataset": {"train": str(tmp_path / "train.jsonl")},
        "preprocessor": {"sequence_length": 32},
        "train": {"work_dir": str(tmp_path / "run"), "max_steps": 2, "progress_bar": False, "device": "cpu",
                  "dataloader": {"batch_size_per_gpu": 4}, "optimizer": {"lr": 1e-2}},
    })
    trained = load_model(result.output_dir)
    assert trained.config == model.config and not same_weights(trained, model)


# ---------------------------------------------------------------------------------------- errors
def expect_not_found(load, tmp_path, cache, reason):
    with pytest.raises(ModelNotFoundError) as err:
        load(MODEL_ID)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and err.value.model_id == MODEL_ID
    for path in [tmp_path / MODEL_ID, *cache_candidates(MODEL_ID, cache)]:
        assert f"  {path}\n" in msg
    assert f"modelscope download --model {MODEL_ID}" in msg
    assert f"snapshot_download('{MODEL_ID}')" in msg
    assert reason in msg


def test_an_id_not_cached_lists_every_path_tried_and_how_to_fetch_it(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv("GPT3ZH_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for load in (resolve_model, load_model, load_tokenizer, describe):
        expect_not_found(load, tmp_path, cache, "Downloads are off (GPT3ZH_OFFLINE is set)")
    assert cli.main(["info", MODEL_ID]) == 2
    assert f"model {MODEL_ID!r} is not a local directory" in capsys.readouterr().err


@pytest.mark.skipif(HAS_MODELSCOPE, reason="the modelscope client is installed (it would be asked to download)")
def test_without_the_client_nothing_is_downloaded(tmp_path, monkeypatch):
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.delenv("GPT3ZH_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    expect_not_found(load_model, tmp_path, cache, "The modelscope client is not installed")


def test_a_missing_path_that_is_not_an_id_keeps_the_usual_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT3ZH_OFFLINE", "1")
    for missing in ("./damo/model", "runs/a/output", str(tmp_path / "nope"), "nope"):
        with pytest.raises(CheckpointError, match=r"no such model directory"):
            load_model(missing)
        with pytest.raises(FileNotFoundError, match=r"does not exist") as err:
            load_tokenizer(missing)
        assert not isinstance(err.value, ModelNotFoundError)


@pytest.mark.slow  # the client retries with back-off (about 25 s) before it gives up
@pytest.mark.skipif(not HAS_MODELSCOPE, reason="the modelscope client is not installed (pip install gpt3zh[hub])")
def test_snapshot_download_is_asked_when_the_client_is_installed(tmp_path, monkeypatch):
    # Offline here (sockets refused): the client's own failure is reported with the paths tried.
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GPT3ZH_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    expect_not_found(load_model, tmp_path, tmp_path / "cache", "modelscope's snapshot_download failed: ")


PARITY_SCRIPT = """
import os, socket, sys
from pathlib import Path
def refuse(*a, **k):
    raise OSError("no network in tests")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
from modelscope.hub.snapshot_download import snapshot_download
from gpt3zh.hub import HubSettings, resolve_model
cache = Path(os.environ["MODELSCOPE_CACHE"])
theirs = Path(snapshot_download(sys.argv[1], local_files_only=True))
print(theirs.relative_to(cache), resolve_model(sys.argv[1], HubSettings(cache, offline=True)).relative_to(cache))
"""


@pytest.mark.slow  # one interpreter per layout: the client reads MODELSCOPE_CACHE once per process
@pytest.mark.skipif(not HAS_MODELSCOPE, reason="the modelscope client is not installed (pip install gpt3zh[hub])")
@pytest.mark.parametrize("relative", [
    f"models/damo/{MASKED}", f"hub/models/damo/{MASKED}", f"{SNAPSHOTS}/master", f"{SNAPSHOTS}/3f2a9c1",
    "models/damo/nlp_gpt3_text-generation_1.3B", f"damo/{MASKED}",
])
def test_the_modelscope_client_finds_the_same_directory(tmp_path, relative):
    cache = tmp_path / "cache"
    (cache / relative).mkdir(parents=True)
    (cache / relative / "config.json").write_text("{}")
    env = {**os.environ, "MODELSCOPE_CACHE": str(cache), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", PARITY_SCRIPT, MODEL_ID], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [relative, relative]
