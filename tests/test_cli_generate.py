"""`gpt3zh generate` and `gpt3zh demo`, through `gpt3zh.cli.main` and once as the installed script."""

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt3zh
from gpt3zh import assets
from gpt3zh.checkpoint import save_model
from gpt3zh.cli import main
from gpt3zh.cli_generate import DEMO_OPENINGS, interactive
from gpt3zh.config import GenerationDefaults, GPTConfig
from gpt3zh.model import GPT
from gpt3zh.tokenizer import train_char_tokenizer

POEMS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
         "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]
GREEDY = ["--no-do-sample", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_char_tokenizer(POEMS)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=64)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.normal_(0, 0.3)
    return save_model(model, tmp_path_factory.mktemp("cli") / "m", tokenizer=tok,
                      generation=GenerationDefaults(eod_id=tok.eod_id, tokens_to_generate=10))


@pytest.fixture(scope="module")
def pipe(model_dir):
    return gpt3zh.pipeline("text-generation", model=model_dir)


def run(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_prompts_as_arguments_are_streamed(capsys, model_dir, pipe):
    code, out, _ = run(capsys, "--model", model_dir, *GREEDY, "床前明月光，", "春眠不觉晓，")
    want = [pipe(p, do_sample=False, max_new_tokens=6)["text"] for p in ("床前明月光，", "春眠不觉晓，")]
    assert code == 0 and out == "".join(w + "\n" for w in want)


def test_file_json_batched(capsys, tmp_path, model_dir, pipe):
    prompts = list(DEMO_OPENINGS)
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n", encoding="utf-8")
    code, out, _ = run(capsys, "--model", model_dir, "--file", f, "--json", "--batch-size", "2", "--seed", "5",
                       "--temperature", "1.2", "--top-k", "8")
    rows = [json.loads(line) for line in out.splitlines()]
    want = pipe(prompts, seed=5, temperature=1.2, top_k=8, batch_size=2)
    assert code == 0 and rows == [{"prompt": p, "text": w["text"]} for p, w in zip(prompts, want)]


def test_stdin_plain_text(capsys, monkeypatch, model_dir, pipe):
    monkeypatch.setattr(sys, "stdin", io.StringIO("床前明月光，\n\n白日依山尽，\n"))
    code, out, _ = run(capsys, "--model", model_dir, "--max-length", "12", "--stop", "。", "--no-do-sample")
    want = pipe(["床前明月光，", "白日依山尽，"], max_length=12, stop="。", do_sample=False)
    assert code == 0 and out.splitlines() == [w["text"] for w in want]


def test_flags_follow_generation_config(capsys, model_dir, pipe):
    code, out, _ = run(capsys, "--model", model_dir, "--do-sample", "--seed", "3", "--top-p", "0.7",
                       "--repetition-penalty", "1.3", "--eos-token-id", "9", "--max-new-tokens", "8", "床前")
    want = pipe("床前", do_sample=True, seed=3, top_p=0.7, repetition_penalty=1.3, eos_token_id=9, max_new_tokens=8)
    assert code == 0 and out == want["text"] + "\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--top-p", "1.5", "x"], r"top_p must be in \[0, 1\]"),
        (["--temperature", "-1", "x"], "temperature must be >= 0"),
        (["--max-new-tokens", "-2", "x"], "max_new_tokens must be an int >= 0"),
        (["--file", "/no/such/prompts.txt"], "no such file"),
        (["床" * 80], "at most 63 tokens"),
    ],
)
def test_user_errors_exit_2_with_a_message(capsys, model_dir, argv, message):
    code, _, err = run(capsys, "--model", model_dir, *argv)
    assert code == 2
    assert err.startswith("gpt3zh generate: error:")
    assert re.search(message, err), err


def test_inference_path_flags_and_verbose(capsys, model_dir, pipe):
    code, out, err = run(capsys, "--model", model_dir, "--verbose", "--no-cpu-kernels", *GREEDY, "床前")
    assert code == 0 and "gpt3zh: TextGenerationPipeline(cpu float32, module decode step" in err
    assert out.strip() == pipe("床前", do_sample=False, max_new_tokens=6)["text"]
    code, out, err = run(capsys, "--model", model_dir, "--verbose", "--quantize", "int8", *GREEDY, "床前")
    assert code == 0 and "int8 weights" in err and out.startswith("床前")


def test_without_model_uses_the_default(capsys, monkeypatch, model_dir, pipe):
    monkeypatch.setattr(assets, "DEFAULT_MODEL_NAME", "not-installed")
    code, _, err = run(capsys, "x")
    assert code == 2 and "default model is not installed" in err and "--model PATH" in err
    monkeypatch.setattr(assets, "default_model_path", lambda: Path(model_dir))
    code, out, _ = run(capsys, *GREEDY, "床前")
    assert code == 0 and out == pipe("床前", do_sample=False, max_new_tokens=6)["text"] + "\n"


def test_interactive_loop(pipe):
    lines = iter(["床前", "床" * 80, "春眠"])

    def read(prompt):
        assert prompt == "> "
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    assert interactive(pipe, {"do_sample": False, "max_new_tokens": 4}, out, read) == 0
    shown = out.getvalue().splitlines()
    assert shown[1] == pipe("床前", do_sample=False, max_new_tokens=4)["text"]
    assert shown[2].startswith("error:") and "at most 63 tokens" in shown[2]
    assert shown[3] == pipe("春眠", do_sample=False, max_new_tokens=4)["text"]


def test_demo_with_the_default_model(capsys, monkeypatch, model_dir):
    monkeypatch.setattr(assets, "default_model_path", lambda: Path(model_dir))
    assert main(["demo", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "NOISE" not in out + err and str(model_dir) in lines[0]
    assert [line[:6] for line in lines[1:]] == list(DEMO_OPENINGS)


def test_demo_without_the_default_model_says_it_is_noise(capsys, monkeypatch):
    monkeypatch.setattr(assets, "DEFAULT_MODEL_NAME", "not-installed")
    assert main(["demo", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "NOISE from random weights" in out and "NOISE from random weights" in err
    poems = [line for line in out.splitlines() if not line.startswith("!")]
    assert [line[:6] for line in poems] == list(DEMO_OPENINGS)
    assert all(len(line) > 6 for line in poems)


def test_console_script_reads_stdin(model_dir, pipe):
    script = shutil.which("gpt3zh", path=str(Path(sys.executable).parent)) or shutil.which("gpt3zh")
    if script is None:
        pytest.skip("the gpt3zh console script is not installed (pip install -e .)")
    proc = subprocess.run(
        [script, "generate", "--model", str(model_dir), "--json", *GREEDY],
        input="床前明月光，\n春眠不觉晓，\n", capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    want = pipe(["床前明月光，", "春眠不觉晓，"], do_sample=False, max_new_tokens=6)
    assert rows == [{"prompt": p, "text": w["text"]} for p, w in zip(["床前明月光，", "春眠不觉晓，"], want)]
