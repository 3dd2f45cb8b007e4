"""int8 quality: perplexity change and greedy agreement with float32, for dynamic int8 (W8A8) and
weight-only int8, on real models and real test text.

    .venv/bin/python benchmarks/int8_quality.py                        # the embedded poetry-small
    .venv/bin/python benchmarks/int8_quality.py --model work_dirs/poetry/output   # examples/poetry.yaml's model

Perplexity: next-token loss over the first --rows poems of ../shared/data/poetry/test.jsonl (each
poem + the tokenizer's end-of-document id, one poem per forward: the multi-row int8 path, as a
prefill). Greedy agreement: --prompts poems' first 8 tokens, --new tokens each, decoded through
gpt3zh.generate (the one-row int8 path of batch-1 decoding), counted as the prefix equal to fp32's.
Not a timing benchmark: it may run on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import gpt3zh
from gpt3zh import generation
from gpt3zh.inference import prepare

ROOT = Path(__file__).resolve().parents[1]
POETRY_TEST = ROOT.parent / "shared" / "data" / "poetry" / "test.jsonl"
SCHEMES = ("int8-dynamic", "int8-weight")


@torch.inference_mode()
def mean_nll(module, rows: list[torch.Tensor]) -> tuple[float, int]:
    total, n = 0.0, 0
    for idx in rows:
        logits = module(idx[:, :-1])[0].float()  # (T-1, V)
        total += torch.nn.functional.cross_entropy(logits, idx[0, 1:], reduction="sum").item()
        n += idx.shape[1] - 1
    return total / n, n


def agreement(out: list[list[int]], ref: list[list[int]], prompts: list[list[int]]) -> tuple[int, int]:
    """New tokens equal to the reference's before the first difference, summed over rows; and the total."""
    same = total = 0
    for o, r, p in zip(out, ref, prompts):
        new_o, new_r = o[len(p):], r[len(p):]
        same += next((i for i, (a, b) in enumerate(zip(new_o, new_r)) if a != b), len(new_r))
        total += len(new_r)
    return same, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "src" / "gpt3zh" / "assets" / "poetry-small"))
    ap.add_argument("--rows", type=int, default=400, help="test poems for the perplexity (default 400)")
    ap.add_argument("--prompts", type=int, default=32, help="poems whose first 8 tokens prompt greedy decoding")
    ap.add_argument("--new", type=int, default=32, help="new tokens per greedy prompt (default 32)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = gpt3zh.load_model(args.model).eval(), gpt3zh.load_tokenizer(args.model)
    texts = [json.loads(line)["src_txt"] for line in POETRY_TEST.read_text(encoding="utf-8").splitlines()]
    L = model.config.max_seq_len
    rows = [torch.tensor([(tok.encode(t) + [tok.eod_id])[:L]]) for t in texts[: args.rows]]
    rows = [r for r in rows if r.shape[1] >= 2]
    prompts = [tok.encode(t)[:8] for t in texts[args.rows: args.rows + args.prompts]]
    cfg = model.config
    print(f"# model {args.model}: {cfg.n_layer} x {cfg.d_model}, vocab {cfg.vocab_size}, tokenizer {tok.kind}, "
          f"torch {torch.__version__}")
    ref_nll, n = mean_nll(model, rows)
    ref_out = generation.generate(model, prompts, max_new_tokens=args.new)
    print(f"# perplexity over {len(rows)} test poems ({n} tokens); greedy: {len(prompts)} prompts x {args.new} tokens")
    print("| weights | perplexity | change vs fp32 | greedy tokens equal to fp32 (prefix) |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| fp32 | {math.exp(ref_nll):.3f} | - | - |")
    for name in SCHEMES:
        prepared = prepare(model, quantize=name)
        nll, _ = mean_nll(prepared.module, rows)
        same, total = agreement(generation.generate(prepared, prompts, max_new_tokens=args.new), ref_out, prompts)
        print(f"| {name} | {math.exp(nll):.3f} | {100 * (math.exp(nll - ref_nll) - 1):+.3f}% | "
              f"{same}/{total} ({same / total:.1%}) |", flush=True)


if __name__ == "__main__":
    main()
