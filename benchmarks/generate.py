"""Greedy decoding speed: gpt3zh vs transformers (same weights, through the HF export) vs a
full-recompute loop like ModelScope's single-process GPT3Model.generate (no KV cache).

    .venv/bin/python benchmarks/generate.py --preset base --batch 1 8 --runs 3 --threads 2

All implementations run side by side in one process and their runs are interleaved (round robin,
after one short warm-up each), so load from other processes on a shared machine hits them all
alike; the median of the runs is reported. Prints seconds and tokens/s per implementation, how many
times faster gpt3zh is, and whether each produced exactly gpt3zh's tokens. `--ablate` also times
gpt3zh without the oneDNN-packed weight copies (`pack_weights=False`: chunked-GEMV layers), with
its decode steps run through the modules' forward (the layers kept, the flat step off), with the
CPU kernels off altogether (`cpu_kernels=False`: F.linear layers, module
steps) and with a KV cache of the full context, to show what those choices are worth.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch
from _timing import interleaved
from fast_cpu import gpt3zh_greedy as new_tokens

import gpt3zh
from gpt3zh import hugepages
from gpt3zh.config import PRESETS
from gpt3zh.inference import InferenceModel, prepare
from gpt3zh.model import GPT


def gpt3zh_greedy(model, prompts, new, cache_len=None):
    return [p + t for p, t in zip(prompts.tolist(), new_tokens(model, prompts, new, cache_len))]


def recompute_greedy(model, prompts, new):
    """ModelScope's single-process loop: no KV cache, the whole prefix re-run every step."""
    with torch.inference_mode():
        tokens = prompts
        for _ in range(new):
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens = torch.cat([tokens, nxt], 1)
    return tokens.tolist()


def load_hf(model, tmp: str):
    from transformers import GPT2LMHeadModel

    gpt3zh.save_model(model, tmp, format="hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp, dtype=torch.float32).eval()
    # No stop token: both sides must generate exactly `new` tokens.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def hf_greedy(hf, prompts, new):
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False)
    return out.tolist()


def module_steps(model):
    """gpt3zh's prepared module (its packed / chunked layers) with the modules' own decode step instead of
    the flat one."""
    p = prepare(model)
    return InferenceModel(p.fork().module, p.options, (*p.parts[:-1], "module decode step"), "modules")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baselines", nargs="*", default=["transformers", "recompute"],
                    choices=["transformers", "recompute"])
    ap.add_argument("--recompute-max-batch", type=int, default=1,
                    help="skip the O(n^2) recompute loop above this batch size (default 1)")
    ap.add_argument("--ablate", action="store_true", help="also time gpt3zh variants (F.linear layers, cache size)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PRESETS[args.preset].replace(dropout=0.0, attn_dropout=0.0)
    model = GPT(cfg).eval()
    hugepages.place_model(model)  # where gpt3zh.load_pretrained puts a loaded model's CPU weights
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  {platform.processor() or platform.machine()}")
    print(f"# preset {args.preset} fp32 CPU, random init (seed 0), greedy, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, median of {args.runs} interleaved runs after a warm-up")
    print("# NOTE: timings on a shared machine (other jobs running); compare rows, not absolute figures")
    print(f"{'impl':<28} {'batch':>5} {'median s':>9} {'tok/s':>8} {'gpt3zh is':>10}  same tokens")

    with tempfile.TemporaryDirectory() as tmp:
        hf = load_hf(model, tmp) if "transformers" in args.baselines else None
        for batch in args.batch:
            prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len))

            def bind(fn, prompts=prompts):
                return lambda warmup=False: fn(prompts, 4 if warmup else args.new_tokens)

            ours = prepare(model)  # held: prepare() caches one variant per model
            impls = {"gpt3zh": bind(lambda p, n, ours=ours: gpt3zh_greedy(ours, p, n))}
            if hf is not None:
                impls["transformers"] = bind(lambda p, n: hf_greedy(hf, p, n))
            if "recompute" in args.baselines and batch <= args.recompute_max_batch:
                impls["full recompute (ModelScope)"] = bind(lambda p, n: recompute_greedy(model, p, n))
            if args.ablate:
                modules = module_steps(model)
                plain = prepare(model, cpu_kernels=False)
                chunked = prepare(model, pack_weights=False)
                impls["gpt3zh pack_weights=False"] = bind(lambda p, n, m=chunked: gpt3zh_greedy(m, p, n))
                impls["gpt3zh module steps"] = bind(lambda p, n, m=modules: gpt3zh_greedy(m, p, n))
                impls["gpt3zh cpu_kernels=False"] = bind(lambda p, n, m=plain: gpt3zh_greedy(m, p, n))
                impls["gpt3zh cache=full context"] = bind(
                    lambda p, n, m=ours: gpt3zh_greedy(m, p, n, cfg.max_seq_len))
            results = interleaved(impls, args.runs)
            ref_s, ref, _ = results["gpt3zh"]
            n = batch * args.new_tokens
            for name, (secs, out, _) in results.items():
                report(name, batch, secs, n, ref_s, out == ref)


def report(name, batch, secs, n, ref_s, same) -> None:
    print(f"{name:<28} {batch:>5} {secs:>9.3f} {n / secs:>8.1f} {secs / ref_s:>8.2f}x faster  {'yes' if same else 'NO'}",
          flush=True)


if __name__ == "__main__":
    main()
