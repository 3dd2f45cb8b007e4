"""Serving throughput: N concurrent streaming clients vs the same requests one at a time.

    .venv/bin/python benchmarks/serve.py --clients 16 --max-tokens 64 --rounds 3

Starts the real `gpt3zh serve` in a subprocess on a free loopback port, serving a random model of
the embedded poetry-small shape (6 layers, d_model 256, 4 heads, a 6,784-character vocabulary,
160-token context; `--shape base` for the base preset's 12 x 768 with a 25,600 vocabulary) with a
character tokenizer, and drives it over loopback HTTP with streaming /v1/completions requests
(greedy, so both modes must return the same texts; checked). Each round serves the N requests one
after the other, then all N at once (the order alternates between rounds so that drifting load from
other processes on the machine hits both modes alike). Prints the median tokens/s of each mode,
their ratio, and p50 / p99 time to first token over all rounds.

The server runs with OMP_NUM_THREADS=1 by default (--threads): on a machine whose cores are busy,
more intra-op threads spin-wait on each other. The clients are bare asyncio connections, so the
load generator takes little of the CPU it shares with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from gpt3zh.checkpoint import save_model
from gpt3zh.config import PRESETS
from gpt3zh.generation import generate
from gpt3zh.model import GPT
from gpt3zh.tokenizer import train_char_tokenizer

SHAPES = {
    "poetry-small": {"n_layer": 6, "n_head": 4, "d_model": 256, "max_seq_len": 160},  # examples/poetry_small.yaml
    "base": {"max_seq_len": 2048},
}
VOCAB = {"poetry-small": 6784, "base": 25600}


def make_model_dir(shape: str, out: Path):
    """Save a random model + char tokenizer to `out`; return them and the characters prompts draw from."""
    n_chars = VOCAB[shape] - 5  # ids 0-4: the char tokenizer's specials and "\n"
    chars = [chr(0x4E00 + i) for i in range(n_chars)]
    tok = train_char_tokenizer(["".join(chars)])
    torch.manual_seed(0)
    cfg = PRESETS["base"].replace(vocab_size=tok.vocab_size, dropout=0.0, attn_dropout=0.0, **SHAPES[shape])
    model = GPT(cfg).eval()
    save_model(model, out, tokenizer=tok)
    print(f"model: random, {shape} shape: n_layer={cfg.n_layer} d_model={cfg.d_model} n_head={cfg.n_head} "
          f"vocab={cfg.vocab_size} context={cfg.max_seq_len}, {cfg.num_params / 1e6:.1f}M parameters, fp32")
    return chars, model, tok


def model_only(model: GPT, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """The ceiling of any batching: gpt3zh.generate's tokens/s at batch 1 (2 prompts) and batch N."""
    t0 = time.perf_counter()
    for p in prompts[:2]:
        generate(model, [p], max_new_tokens=max_tokens)
    solo = 2 * max_tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    generate(model, prompts, max_new_tokens=max_tokens)
    return solo, len(prompts) * max_tokens / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gpt3zh.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", str(4 * max_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up within 120 s")


async def one(port: int, prompt: str, max_tokens: int) -> dict:
    """One streamed request on its own connection: its text, completion tokens and time to first token.

    A bare asyncio HTTP/1.1 client (chunked transfer + server-sent events), so that the load generator
    takes as little as possible of the CPU it shares with the server on this machine.
    """
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"request failed: {status!r} {await reader.read()!r}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
    ttft, text, tokens, buf = None, [], 0, b""
    while True:
        if chunked:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                break
            buf += (await reader.readexactly(size + 2))[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                break
            buf += data
        while (cut := buf.find(b"\n\n")) >= 0:
            event, buf = buf[:cut], buf[cut + 2 :]
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            chunk = json.loads(event[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = ttft or time.perf_counter() - t0
                text.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    writer.close()
    return {"text": "".join(text), "tokens": tokens, "ttft": ttft}


async def run_mode(port: int, prompts: list[str], max_tokens: int, concurrent: bool):
    t0 = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(one(port, p, max_tokens) for p in prompts))
    else:
        results = [await one(port, p, max_tokens) for p in prompts]
    return time.perf_counter() - t0, results


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's OMP_NUM_THREADS (default 1: on a machine whose cores are busy with other "
                         "jobs, more intra-op threads spin-wait on each other and make every step slower)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="poetry-small")
    args = ap.parse_args()

    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}; the machine is shared (other jobs, a training run among them), so both "
          f"modes run interleaved in the same rounds against the same server")
    with tempfile.TemporaryDirectory() as tmp:
        chars, model, tok = make_model_dir(args.shape, Path(tmp))
        torch.set_num_threads(args.threads)
        rng = random.Random(0)
        prompts = ["".join(rng.choices(chars, k=args.prompt_len - i % 5)) for i in range(args.clients)]
        port = free_port()
        proc = start_server(Path(tmp), port, max_batch=args.clients, threads=args.threads)
        try:
            asyncio.run(run_mode(port, prompts[:2], 8, concurrent=False))  # warm-up
            stats = {False: [], True: []}
            ttfts = {False: [], True: []}
            texts, ratios, ceiling = {}, [], []
            for r in range(args.rounds):
                for concurrent in ((False, True) if r % 2 == 0 else (True, False)):
                    wall, results = asyncio.run(run_mode(port, prompts, args.max_tokens, concurrent))
                    tokens = sum(x["tokens"] for x in results)
                    stats[concurrent].append(tokens / wall)
                    ttfts[concurrent] += [x["ttft"] for x in results if x["ttft"] is not None]
                    texts.setdefault(concurrent, [x["text"] for x in results])
                    name = "concurrent" if concurrent else "one at a time"
                    print(f"  round {r + 1} {name:>13}: {tokens} tokens in {wall:6.2f} s = {tokens / wall:7.1f} tok/s")
                ratios.append(stats[True][-1] / stats[False][-1])
                solo, batched = model_only(model, [tok.encode(p) for p in prompts], args.max_tokens)
                ceiling.append(batched / solo)
                print(f"  round {r + 1}: served ratio {ratios[-1]:.2f}x; model alone (gpt3zh.generate, no server): "
                      f"batch 1 {solo:.1f} tok/s, batch {args.clients} {batched:.1f} tok/s = {ceiling[-1]:.2f}x")
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\n{args.clients} requests x {args.max_tokens} new tokens (greedy, streamed), prompts of "
          f"{args.prompt_len - 4}-{args.prompt_len} tokens, server --max-batch {args.clients} with "
          f"OMP_NUM_THREADS={args.threads}; medians of "
          f"{args.rounds} rounds")
    print(f"{'mode':<22}{'tok/s':>9}{'TTFT p50':>11}{'TTFT p99':>11}")
    for concurrent, name in ((False, "one at a time"), (True, f"{args.clients} concurrent clients")):
        tps = statistics.median(stats[concurrent])
        p50, p99 = pct(ttfts[concurrent], 0.5), pct(ttfts[concurrent], 0.99)
        print(f"{name:<22}{tps:9.1f}{p50 * 1e3:9.1f}ms{p99 * 1e3:9.1f}ms")
    ratio = statistics.median(stats[True]) / statistics.median(stats[False])
    print(f"throughput ratio (concurrent / one at a time): {ratio:.2f}x of the medians; per round "
          f"{', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}x)")
    print(f"the model alone, batch {args.clients} vs batch 1 (the ceiling for any batching on this machine now): "
          f"median {statistics.median(ceiling):.2f}x")
    print(f"identical texts in both modes: {'yes' if texts[True] == texts[False] else 'NO'}")
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
