"""Greedy decoding speed: gpt3zh vs transformers (same weights, through the HF export) vs a
full-recompute loop like ModelScope's single-process GPT3Model.generate.

    .venv/bin/python benchmarks/generate.py --preset base --batch 1 8 --runs 3

Prints the median seconds and tokens/s of each implementation side by side, the ratio to gpt3zh,
and whether every implementation produced exactly gpt3zh's tokens. `--ablate` also times gpt3zh
with the output head as F.linear(h, W) (no transposed copy) and with a KV cache of the full context.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import tempfile
import time

import torch

import gpt3zh
from gpt3zh import generation
from gpt3zh.config import PRESETS
from gpt3zh.model import GPT


def timed(fn, runs: int):
    fn()  # warm-up: allocator, thread pool, lazy inits
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def gpt3zh_greedy(model, prompts, new, cache_len=None):
    cfg = generation.GenerationConfig(max_new_tokens=new)
    rows = prompts.tolist()
    toks = [tok for tok, _ in generation.decode_steps(model, rows, cfg, cache_len=cache_len)]
    return torch.cat([prompts, torch.stack(toks, 1)], 1).tolist()


def recompute_greedy(model, prompts, new):
    """ModelScope's single-process loop: no KV cache, the whole prefix re-run every step."""
    with torch.inference_mode():
        tokens = prompts
        for _ in range(new):
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens = torch.cat([tokens, nxt], 1)
    return tokens.tolist()


def load_hf(model, tmp: str):
    import transformers

    gpt3zh.save_model(model, tmp, format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    # No stop token: both sides must generate exactly `new` tokens.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def hf_greedy(hf, prompts, new):
    with torch.inference_mode():
        out = hf.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, do_sample=False
        )
    return out.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baselines", nargs="*", default=["transformers", "recompute"],
                    choices=["transformers", "recompute"])
    ap.add_argument("--recompute-max-batch", type=int, default=8,
                    help="skip the O(n^2) recompute loop above this batch size")
    ap.add_argument("--ablate", action="store_true", help="also time gpt3zh variants (head layout, cache size)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PRESETS[args.preset].replace(dropout=0.0, attn_dropout=0.0)
    model = GPT(cfg).eval()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  {platform.processor() or platform.machine()}")
    print(f"# preset {args.preset} fp32, random init (seed 0), greedy, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, median of {args.runs} runs after a warm-up")
    print(f"{'impl':<28} {'batch':>5} {'median s':>9} {'tok/s':>8} {'vs gpt3zh':>9}  same tokens")

    with tempfile.TemporaryDirectory() as tmp:
        hf = load_hf(model, tmp) if "transformers" in args.baselines else None
        for batch in args.batch:
            prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len))
            n = batch * args.new_tokens
            ref_s, ref = timed(lambda: gpt3zh_greedy(model, prompts, args.new_tokens), args.runs)
            report("gpt3zh", batch, ref_s, n, ref_s, True)
            variants = []
            if args.ablate:
                variants += [
                    ("gpt3zh head F.linear", lambda: no_transposed_head(model, prompts, args.new_tokens)),
                    ("gpt3zh cache=full context", lambda: gpt3zh_greedy(model, prompts, args.new_tokens,
                                                                         cfg.max_seq_len)),
                ]
            if hf is not None:
                variants.append(("transformers", lambda: hf_greedy(hf, prompts, args.new_tokens)))
            if "recompute" in args.baselines and batch <= args.recompute_max_batch:
                variants.append(("full recompute (ModelScope)", lambda: recompute_greedy(model, prompts,
                                                                                           args.new_tokens)))
            for name, fn in variants:
                secs, out = timed(fn, args.runs)
                report(name, batch, secs, n, ref_s, out == ref)


def no_transposed_head(model, prompts, new):
    with patched(generation, "_output_head", lambda m: None):
        return gpt3zh_greedy(model, prompts, new)


@contextlib.contextmanager
def patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def report(name, batch, secs, n, ref_s, same) -> None:
    print(f"{name:<28} {batch:>5} {secs:>9.3f} {n / secs:>8.1f} {ref_s / secs:>8.2f}x  {'yes' if same else 'NO'}",
          flush=True)


if __name__ == "__main__":
    main()
