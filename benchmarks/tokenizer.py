"""JiebaBPE encoding speed on the poetry train set, and whether rjieba could replace jieba.

    .venv/bin/python benchmarks/tokenizer.py --runs 3

Encodes every `src_txt` of ../shared/data/poetry/train.jsonl (about 4.7 M characters) with the
real ModelScope 1.3B tokenizer.json, four ways, run side by side in one process and interleaved
(round robin, after one warm-up), so load from other processes on a shared machine hits them all
alike; the median of the runs is reported in characters per second:

- `encode` loop: `[tok.encode(t) for t in texts]`, what ModelScope's `JiebaBPETokenizer` does;
- `encode_batch`: jieba per text, then one call into tokenizers' parallel batch encoder;
- with --breakdown, jieba cut only and BPE only (on the pre-cut words): where the time goes;
- rjieba + BPE, when rjieba is installed: the speed a Rust segmenter would give.

gpt3zh may use rjieba only if it segments exactly like jieba (then the ids equal ModelScope's).
The script counts the lines where it does not, on poetry test + qg dev (source and question)
lines, and on the benchmark lines the lines whose ids differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import tokenizers

from gpt3zh.tokenizer import jieba_cut, load_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def read_column(path: Path, *keys: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row[key] for key in keys for row in rows]


def bpe(tok, words: list[list[str]]) -> list[list[int]]:
    encodings = tok.backend.encode_batch_fast(words, is_pretokenized=True, add_special_tokens=True)
    return [e.ids for e in encodings]


def variants(tok, breakdown: bool) -> dict:
    """name -> fn(texts, words), words being jieba's cut of texts (used by "BPE only")."""
    out = {
        "encode loop": lambda texts, words: [tok.encode(t) for t in texts],
        "encode_batch": lambda texts, words: tok.encode_batch(texts),
    }
    if breakdown:
        out["jieba cut only"] = lambda texts, words: [jieba_cut(t) for t in texts]
        out["BPE only (pre-cut)"] = lambda texts, words: bpe(tok, words)
    try:
        import rjieba
    except ImportError:
        return out
    out["rjieba + BPE (not used)"] = lambda texts, words: bpe(tok, [list(rjieba.cut(t)) for t in texts])
    return out


def segmentation_diffs(texts: list[str]) -> int | None:
    try:
        import rjieba
    except ImportError:
        return None
    return sum(list(rjieba.cut(t)) != jieba_cut(t) for t in texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="only the first N poetry lines (quick look)")
    ap.add_argument("--breakdown", action="store_true", help="also time jieba alone and the BPE step alone")
    args = ap.parse_args()

    tok = load_tokenizer(args.data / "modelscope-gpt3-1.3B")
    texts = read_column(args.data / "poetry" / "train.jsonl", "src_txt")[: args.limit]
    chars = sum(map(len, texts))
    print(
        f"{len(texts):,} poetry train lines, {chars:,} characters; tokenizers {tokenizers.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        "# NOTE: the machine is shared (a training job and other work run on its 2 cores); "
        "compare rows, not absolute figures"
    )

    fns = variants(tok, args.breakdown)
    words = [jieba_cut(t) for t in texts] if args.breakdown else [[] for _ in texts]
    for fn in fns.values():  # warm-up: jieba's prefix dictionary, rjieba's, thread pools
        fn(texts[:200], words[:200])
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, list[list[int]]] = {}
    for _ in range(args.runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn(texts, words)
            times[name].append(time.perf_counter() - start)
            print(f"  run {len(times[name])}: {name} {times[name][-1]:.1f} s", file=sys.stderr, flush=True)

    base = statistics.median(times["encode loop"])
    print(f"\n{'variant':<26}{'median s':>10}{'chars/s':>12}{'vs loop':>9}   runs (s)")
    for name, ts in times.items():
        med = statistics.median(ts)
        runs = " ".join(f"{t:.1f}" for t in ts)
        print(f"{name:<26}{med:>10.2f}{chars / med:>12,.0f}{base / med:>8.2f}x   {runs}")

    loop = results["encode loop"]
    print(f"\nencode_batch ids == encode loop ids on all lines: {results['encode_batch'] == loop}")
    if args.breakdown:
        print(f"BPE-only ids == encode loop ids on all lines: {results['BPE only (pre-cut)'] == loop}")
    if "rjieba + BPE (not used)" in results:
        differ = sum(a != b for a, b in zip(results["rjieba + BPE (not used)"], loop))
        print(f"rjieba: ids differ from jieba's on {differ:,} of {len(texts):,} poetry train lines")
        check = read_column(args.data / "poetry" / "test.jsonl", "src_txt")
        check += read_column(args.data / "qg" / "dev.jsonl", "src_txt", "tgt_txt")
        print(
            f"rjieba: segmentation differs from jieba's on {segmentation_diffs(check):,} of {len(check):,} "
            "poetry test + qg dev lines"
        )
    else:
        print("rjieba not installed: no comparison (pip install rjieba)")


if __name__ == "__main__":
    main()
