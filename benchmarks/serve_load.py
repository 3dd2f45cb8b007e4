"""A bounded load test: 200 concurrent streaming clients for 30 s against the real `gpt3zh serve`.

    .venv/bin/python benchmarks/serve_load.py --clients 200 --seconds 30

The server (a subprocess on loopback, the same random poetry-small-shaped model as benchmarks/serve.py,
--max-batch 8 --max-queue 32) is kept saturated: every client sends a streamed greedy completion,
and on a 503 waits the Retry-After it was given and tries again. What must hold (checked, exit 1
otherwise): no response other than 200 and 503-with-Retry-After, no broken stream, the server
still healthy at the end, and every completed text equal to the same prompt's text served alone
before the load. Prints requests served and refused, tokens/s and time-to-first-token percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from serve import free_port, make_model_dir, pct, start_server


async def request(port: int, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: {"status", "retry_after", "text", "tokens", "ttft", "error"}."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            return {"status": status, "retry_after": headers.get("retry-after"), "body": await reader.read()}
        out = {"status": 200, "text": [], "tokens": 0, "ttft": None, "error": None, "done": False}
        buf = b""
        while True:  # chunked transfer, then server-sent events
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                break
            buf += (await reader.readexactly(size + 2))[:-2]
            while (cut := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:cut], buf[cut + 2:]
                if event == b"data: [DONE]":
                    out["done"] = True
                    continue
                chunk = json.loads(event[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    out["ttft"] = out["ttft"] or time.perf_counter() - t0
                    out["text"].append(chunk["choices"][0]["text"])
                elif chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
        out["text"] = "".join(out["text"])
        return out
    finally:
        writer.close()


async def client(port: int, prompts: list[str], max_tokens: int, until: float, rng: random.Random, log: list):
    while time.monotonic() < until:
        i = rng.randrange(len(prompts))
        try:
            r = await request(port, prompts[i], max_tokens)
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            r = {"status": "broken", "error": repr(err)}
        r["prompt"] = i
        log.append(r)
        if r["status"] == 503:
            await asyncio.sleep(float(r["retry_after"] or 1))


async def load(port: int, prompts: list[str], max_tokens: int, clients: int, seconds: float) -> list[dict]:
    log: list[dict] = []
    until = time.monotonic() + seconds
    await asyncio.gather(*(client(port, prompts, max_tokens, until, random.Random(c), log) for c in range(clients)))
    return log


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        chars, _, _ = make_model_dir("poetry-small", Path(tmp))
        rng = random.Random(0)
        prompts = ["".join(rng.choices(chars, k=rng.randint(8, 24))) for _ in range(args.prompts)]
        port = free_port()
        proc = start_server(Path(tmp), port, max_batch=args.max_batch, threads=args.threads)
        try:
            alone = [asyncio.run(request(port, p, args.max_tokens))["text"] for p in prompts]
            t0 = time.perf_counter()
            log = asyncio.run(load(port, prompts, args.max_tokens, args.clients, args.seconds))
            wall = time.perf_counter() - t0
            healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    statuses = Counter(r["status"] for r in log)
    served = [r for r in log if r["status"] == 200]
    bad = [r for r in log if r["status"] not in (200, 503)
           or (r["status"] == 503 and r.get("retry_after") is None)
           or (r["status"] == 200 and (r["error"] or not r["done"]))]
    wrong = [r for r in served if r["text"] != alone[r["prompt"]]]
    tokens = sum(r["tokens"] for r in served)
    ttft = [r["ttft"] for r in served if r["ttft"] is not None]
    print(f"{args.clients} clients for {args.seconds:.0f} s (wall {wall:.1f} s), server --max-batch "
          f"{args.max_batch} --max-queue {4 * args.max_batch}, {args.max_tokens} new tokens, greedy")
    print(f"responses: {dict(statuses)}; served {len(served)} streams, {tokens} tokens = {tokens / wall:.1f} tok/s")
    print(f"TTFT p50 {pct(ttft, 0.5) * 1e3:.0f} ms, p99 {pct(ttft, 0.99) * 1e3:.0f} ms (served streams)")
    print(f"errors other than 503 + Retry-After: {len(bad)}; texts differing from alone: {len(wrong)}; "
          f"server alive and healthy after: {alive and healthy}")
    ok = not bad and not wrong and alive and healthy and served
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
