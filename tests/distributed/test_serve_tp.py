"""`torchrun --nproc_per_node N -m gpt3zh serve --tp N`, driven with the real `openai` client.

The reference is the single-process server (same app, same engine, one process) on the same
weights: over HTTP, the tensor-parallel server must answer every request with the same text,
chunk for chunk, finish reason and token counts (greedy, seeded sampling with top-k / top-p /
repetition penalty / stop strings / n choices, chat, streamed and not, all at once from concurrent
clients). The char tokenizer maps each id >= 5 to one character, so equal text and equal token
counts mean equal tokens. Then the failure paths: a rank killed or frozen mid-stream ends the
stream with an error and the whole job within a bound; an impossible layout is refused before a
process group or a weight file is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is in the [dev] extra")
try:  # the HTTP client the openai package ships with (httpx2 in openai >= 3, httpx before)
    import httpx2 as httpx
except ImportError:
    import httpx

from gpt3zh.checkpoint import load_pretrained, save_model
from gpt3zh.config import GPTConfig, InferenceOptions
from gpt3zh.model import GPT
from gpt3zh.tokenizer import train_char_tokenizer

from .launch import torchrun_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CHARS = "".join(chr(i) for i in range(32, 127)) + "系统用户助手：中国的首都是春夏秋"
TOK = train_char_tokenizer([CHARS])  # 116 ids: divisible by 2 and 4, as Megatron shards need
CONFIG = GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=256,
                   dropout=0.0, attn_dropout=0.0, init_std=0.3)
START_S = 150  # torchrun, then every rank importing torch and loading, on two shared cores

JOBS = [  # (endpoint, options): each is sent streamed and not, all at once
    ("completions", {"prompt": "Hello", "max_tokens": 40, "temperature": 0}),
    ("completions", {"prompt": "中国的首都是", "max_tokens": 40, "temperature": 0.8, "seed": 11,
                     "extra_body": {"top_k": 20}}),
    ("completions", {"prompt": ["ab", "xyz"], "max_tokens": 24, "temperature": 1.0, "seed": 3, "n": 2}),
    ("completions", {"prompt": "Hello", "max_tokens": 60, "temperature": 1.0, "seed": 5, "stop": ["e"]}),
    ("completions", {"prompt": "aaa", "max_tokens": 30, "temperature": 0.7, "top_p": 0.9, "seed": 9,
                     "extra_body": {"repetition_penalty": 1.3}}),
    ("chat", {"messages": [{"role": "user", "content": "中国的首都是"}], "max_tokens": 30, "temperature": 0.9,
              "seed": 2}),
]


# ------------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchrunServer:
    """`torchrun --standalone --nproc_per_node N -m gpt3zh serve ...` once /health answers; the
    ranks' pids come from their startup lines."""

    def __init__(self, nproc: int, log: Path, *args: str) -> None:
        self.nproc, self.log, self.port = nproc, log, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "gpt3zh", "serve", "--port", str(self.port), *args]
        self._out = open(log, "w")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=torchrun_env())
        self.pids: dict[int, int] = {}

    def start(self) -> TorchrunServer:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited:\n{self.output()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    found = re.findall(r"gpt3zh serve: rank (\d+) of \d+ \(pid (\d+)\)", self.output())
                    self.pids = {int(r): int(p) for r, p in found}
                    assert sorted(self.pids) == list(range(self.nproc)), self.output()
                    return self
            time.sleep(0.3)
        self.kill()
        raise AssertionError(f"the server did not start in {START_S} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.wait(30)


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status  # a zombie waiting to be reaped has ended


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def _one(client, endpoint: str, options: dict, stream: bool):
    """A request's answer as plain data: per choice (text chunks, finish reason), and the usage."""
    create = client.completions.create if endpoint == "completions" else client.chat.completions.create
    model = {"model": "m"}
    if not stream:
        r = await create(**model, **options)
        texts = [c.text if endpoint == "completions" else c.message.content for c in r.choices]
        return {"texts": texts, "reasons": [c.finish_reason for c in r.choices], "usage": r.usage.model_dump()}
    chunks: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    usage = None
    async for chunk in await create(**model, **options, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage.model_dump() if chunk.usage else usage
        for c in chunk.choices:
            text = c.text if endpoint == "completions" else (c.delta.content or "")
            chunks.setdefault(c.index, []).append(text)
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return {"chunks": [chunks[i] for i in sorted(chunks)], "reasons": [reasons[i] for i in sorted(reasons)],
            "usage": usage}


async def _suite(url: str) -> list:
    client = _client(url)
    solo = await _one(client, *JOBS[0], stream=False)  # alone first, then everything at once
    together = await asyncio.gather(*[_one(client, e, o, s) for e, o in JOBS for s in (False, True)])
    await client.close()
    return [solo, *together]


def _cancel_then_answer(url: str) -> dict:
    """Leave a long stream after three chunks, then ask JOBS[0] again."""
    body = {"model": "m", "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
    return asyncio.run(_one(_client(url), *JOBS[0], stream=False))


def _model_dirs(root: Path) -> dict[str, Path]:
    torch.manual_seed(1234)
    model = GPT(CONFIG).eval()
    return {fmt: save_model(model, root / fmt, format=fmt, tp=2 if fmt == "megatron" else 1, tokenizer=TOK)
            for fmt in ("gpt3zh", "megatron")}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return _model_dirs(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference(dirs) -> list:
    """The single-process server's answers (the module decode step, as the ranks' one thread)."""
    from gpt3zh.serve import ServeConfig, create_app
    from serving import BackgroundServer

    loaded = load_pretrained(dirs["gpt3zh"])
    app = create_app(loaded.model, TOK, ServeConfig(), "m", loaded.generation, InferenceOptions(cpu_kernels=False))
    with BackgroundServer(app) as srv:
        return asyncio.run(_suite(srv.url))


# ------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("nproc,fmt", [(2, "megatron"), (4, "gpt3zh")])
def test_tp_server_answers_as_the_single_process_server(dirs, reference, tmp_path, nproc, fmt):
    tp = [] if fmt == "megatron" else ["--tp", str(nproc)]  # Megatron: tp from its configuration.json
    server = TorchrunServer(nproc, tmp_path / "log.txt", "--model", str(dirs[fmt]), "--model-id", "m", *tp).start()
    try:
        got = asyncio.run(_suite(server.url))
        after_cancel = _cancel_then_answer(server.url)
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        os.kill(server.pids[0], signal.SIGTERM)  # rank 0 shuts down, then tells the others to stop
        rc = server.wait(60)
    out = server.output()
    for want, have in zip(reference, got, strict=True):
        assert have == want
    for whole, streamed in zip(got[1::2], got[2::2], strict=True):  # each job streamed and not: the same
        assert ["".join(c) for c in streamed["chunks"]] == whole["texts"]
        assert streamed["reasons"] == whole["reasons"] and streamed["usage"] == whole["usage"]
    # a client that went away mid-stream was cancelled on every rank in the same step: they still agree
    assert after_cancel == reference[0] and "gpt3zh_cancelled_total 1\n" in metrics
    assert f"gpt3zh_tensor_parallel_size {nproc}\n" in metrics and f"gpt3zh_ranks {nproc}\n" in metrics
    assert f"tensor parallel: tp={nproc} over {nproc} ranks (gloo), {fmt} checkpoint" in out
    if fmt == "megatron":  # each rank read its own shard file (and the others' embedding rows only)
        for r in range(2):
            assert (f"rank {r} of 2 (pid {server.pids[r]}): read mp_rank_{r:02d}_model_states.pt of 2 Megatron "
                    "shards (and the vocab embedding's rows from 1 more)") in out
    else:
        assert out.count("read its slices of model.safetensors") == nproc
    assert rc == 0, out[-4000:]  # a clean stop: every rank exited 0
    assert all(_gone(pid) for pid in server.pids.values())


# ------------------------------------------------------------------------------------------ failures
@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    """Wide enough that a 1000-token stream is still running when a rank is killed."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, n_layer=4, n_head=4, d_model=256, max_seq_len=1024,
                    dropout=0.0, attn_dropout=0.0)
    return save_model(GPT(cfg).eval(), tmp_path_factory.mktemp("slow") / "m", tokenizer=TOK)


def _stream_until_error(url: str, on_chunk) -> tuple[int, Exception | None, float]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model="m", prompt="Hello", max_tokens=1000, temperature=0, stream=True)
    n, t0 = 0, time.monotonic()
    try:
        for _ in stream:
            n += 1
            if n == 5:
                on_chunk()
                t0 = time.monotonic()
    except (openai.APIError, httpx.HTTPError) as err:
        return n, err, time.monotonic() - t0
    return n, None, time.monotonic() - t0


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_stream_ends_the_stream_and_the_job(slow_model, tmp_path, victim):
    server = TorchrunServer(2, tmp_path / "log.txt", "--model", str(slow_model), "--model-id", "m",
                            "--max-tokens", "1000").start()
    try:
        n, err, after = _stream_until_error(server.url, lambda: os.kill(server.pids[victim], signal.SIGKILL))
        rc = server.wait(30)  # torchrun stops the others once one is gone; rank 0 first answers its streams
    except BaseException:
        server.kill()
        raise
    out = server.output()
    assert err is not None and n < 1000, f"the stream ended normally after {n} chunks"
    assert after < 10
    if victim == 1:  # rank 0 saw its peer go: the stream ends with the server's error, in OpenAI's shape
        assert isinstance(err, openai.APIError) and "a tensor-parallel rank failed or is gone" in str(err), err
        assert "gpt3zh serve: error: a tensor-parallel rank failed or is gone" in out
    assert rc != 0
    assert all(_gone(pid) for pid in server.pids.values()), out[-3000:]


def test_a_frozen_rank_fails_the_stream_after_the_timeout(slow_model, tmp_path):
    server = TorchrunServer(2, tmp_path / "log.txt", "--model", str(slow_model), "--model-id", "m",
                            "--max-tokens", "1000", "--dist-timeout", "3").start()
    try:
        n, err, after = _stream_until_error(server.url, lambda: os.kill(server.pids[1], signal.SIGSTOP))
        for _ in range(150):  # rank 0 ends itself; the frozen rank is torchrun's to kill
            if _gone(server.pids[0]):
                break
            time.sleep(0.1)
        rank0_gone = _gone(server.pids[0])
        os.kill(server.pids[1], signal.SIGCONT)  # instead of waiting for torchrun's SIGKILL (30 s)
        # bound: the resumed rank notices rank 0 is gone, or torchrun's SIGKILL comes 30 s after its
        # SIGTERM; a loaded CI machine can need most of that, so 60 s
        rc = server.wait(60)
    except BaseException:
        server.kill()
        raise
    out = server.output()
    assert isinstance(err, openai.APIError), (n, err, out[-3000:])
    assert "has not finished in 3 s: a rank is hung or dead" in str(err) or "rank failed or is gone" in str(err)
    assert after < 3 + 8
    assert rank0_gone and rc != 0
    assert all(_gone(pid) for pid in server.pids.values()), out[-3000:]


def test_impossible_layouts_are_refused_before_any_weight_or_process_group(dirs, tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    from gpt3zh.cli import main

    odd = GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=3, d_model=48, max_seq_len=64)
    d = save_model(GPT(odd), tmp_path / "odd", tokenizer=TOK)
    (d / "model.safetensors").unlink()  # the check must not need the weights
    assert main(["serve", "--model", str(dirs["gpt3zh"]), "--tp", "2"]) == 2
    assert ("tensor parallelism tp=2 needs 2 processes: launch with `torchrun --nproc_per_node 2"
            in capsys.readouterr().err)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["serve", "--model", str(d), "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert "n_head=3 is not divisible by tp=2" in err and "[tp from --tp]" in err
    assert main(["serve", "--model", str(d)]) == 2  # tp defaults to the number of processes
    assert "[tp from the number of processes]" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_torchrun_refuses_a_layout_on_every_rank_and_exits(dirs, tmp_path):
    megatron_tp2 = str(dirs["megatron"])  # its configuration.json says tensor_model_parallel_size 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m", "gpt3zh",
           "serve", "--model", megatron_tp2, "--port", str(_free_port())]
    run = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=START_S, check=False)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("gpt3zh serve: error:")]
    assert errors and all("tp=2 needs 2 processes" in e and "[tp from configuration.json megatron."
                          "tensor_model_parallel_size]" in e for e in errors), run.stderr[-3000:]
