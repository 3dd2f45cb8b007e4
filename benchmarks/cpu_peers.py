"""CPU decoding against its peers: gpt3zh (fp32, int8) vs transformers fp32 vs CTranslate2 (fp32, int8),
on the same random weights.

    .venv/bin/python benchmarks/cpu_peers.py --preset base --batch 1 8 --runs 5
    .venv/bin/python benchmarks/cpu_peers.py --preset 1.3B --batch 1 --new-tokens 32 --runs 5

Greedy, random prompts of --prompt-len tokens (equal lengths), exactly --new-tokens new tokens (no
stop id) per sequence. transformers runs gpt3zh's HF layout (`GPT2LMHeadModel`, built in memory from
the HF name table with the model's own tensors); CTranslate2 runs that model converted with its
Python converter API (the `GPT2LMHeadModel` loader of `ct2-transformers-converter`), once, loaded
twice: compute_type float32 and int8. Every engine runs in this one process with --threads threads,
and the runs are interleaved (run r of each before run r+1 of any) after a short warm-up, so load
from other processes hits them all alike; medians are reported. A "memory read" entry in the same
interleaved loop (`sum` over 512 MiB) measures the read bandwidth the engines had: each engine's
weight bytes per decode step x steps per second is shown as a share of it (KV cache and activations
not counted: a few percent at these lengths). Token agreement: fp32 engines against gpt3zh fp32
(random weights have near-tied logits, so a single float rounding can flip a token: the prefix
length that agrees is shown), int8 engines against their own fp32.

Needs the `bench` extra (ctranslate2). Memory: the fp32 model once (gpt3zh fp32 is a view of it),
transformers' Conv1D copy of the block weights, CTranslate2 fp32 once, and the int8 weights (1.3B
shape: about 15 GB without transformers, `--no-transformers`; with it about 20 GB).
"""

from __future__ import annotations

import argparse
import gc
import platform
import tempfile
import time
from pathlib import Path

import torch
from _timing import interleaved
from fast_cpu import agreement, gpt3zh_greedy, hf_from_model, hf_greedy

from gpt3zh.config import PRESETS, GPTConfig
from gpt3zh.inference import prepare
from gpt3zh.model import GPT

READ_BYTES = 512 * 2**20


class _IdVocab:
    """Token names for CTranslate2's vocabulary file: random weights have no tokenizer, and the
    benchmark feeds and reads ids only (names "<i>")."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bos_token = self.eos_token = self.unk_token = "<0>"

    def get_vocab(self) -> dict[str, int]:
        return {f"<{i}>": i for i in range(self.size)}


def ct2_convert(model: GPT, out_dir: str, quantization: str) -> str:
    """`model` converted to a CTranslate2 model directory, as `ct2-transformers-converter
    --quantization ...` does: its GPT2LMHeadModel loader on gpt3zh's HF layout, then validate /
    optimize / save. The HF model is built here and dropped after: CTranslate2's int8 `optimize`
    quantizes the tensors it was given in place, so it gets a copy of the (otherwise shared) embedding."""
    from ctranslate2.converters.transformers import GPT2Loader

    hf = hf_from_model(model)
    own = torch.nn.Parameter(hf.transformer.wte.weight.detach().clone(), requires_grad=False)
    hf.transformer.wte.weight = hf.lm_head.weight = own  # tied, as before
    spec = GPT2Loader()(hf, _IdVocab(hf.config.vocab_size))
    # The GPT-2 loader leaves CTranslate2's default epsilon (1e-5); the base preset's is 1e-12 (the
    # 1.3B's 1e-5): set the model's own, so both engines compute the same function.
    spec.config.layer_norm_epsilon = hf.config.layer_norm_epsilon
    spec.validate()
    spec.optimize(quantization=quantization)
    Path(out_dir).mkdir(parents=True)
    spec.save(out_dir)
    return out_dir


def ct2_greedy(generator, prompts: torch.Tensor, new: int) -> list[list[int]]:
    tokens = [[f"<{i}>" for i in row] for row in prompts.tolist()]
    results = generator.generate_batch(tokens, max_length=new, min_length=new, sampling_topk=1, beam_size=1,
                                       include_prompt_in_result=False, end_token=[])
    return [r.sequences_ids[0] for r in results]


def weight_bytes(cfg: GPTConfig, per_weight: float) -> float:
    """Bytes of the linear layers and the head read by one decode step."""
    d, f = cfg.d_model, cfg.ffn_dim
    return per_weight * (cfg.n_layer * (4 * d * d + 2 * d * f) + cfg.vocab_size * d)


def engines(model: GPT, tmp: str, threads: int, bf16: bool, with_hf: bool) -> dict:
    """{name: (greedy fn(prompts, new), bytes per weight, reference name)}. CTranslate2 is converted
    first, while nothing else holds a copy, and loads each precision from its own directory (int8
    converted with quantization="int8", so loading it never holds the float32 weights)."""
    import ctranslate2

    paths = {}
    for ct in ("float32", "int8"):
        paths[ct] = ct2_convert(model, f"{tmp}/{ct}", ct)
        gc.collect()
    # transformers' block weights transposed to Conv1D's layout are a copy; the rest is shared
    hf = hf_from_model(model) if with_hf else None
    ct2 = {ct: ctranslate2.Generator(path, device="cpu", compute_type=ct, intra_threads=threads)
           for ct, path in paths.items()}
    fp32, int8 = prepare(model), prepare(model, quantize="int8")
    out = {
        "gpt3zh fp32": (lambda p, n: gpt3zh_greedy(fp32, p, n), 4, "gpt3zh fp32"),
        "gpt3zh int8": (lambda p, n: gpt3zh_greedy(int8, p, n), 1, "gpt3zh fp32"),
        "CTranslate2 fp32": (lambda p, n: ct2_greedy(ct2["float32"], p, n), 4, "gpt3zh fp32"),
        "CTranslate2 int8": (lambda p, n: ct2_greedy(ct2["int8"], p, n), 1, "CTranslate2 fp32"),
    }
    if with_hf:
        out["transformers fp32"] = (lambda p, n: hf_greedy(hf, p, n), 4, "gpt3zh fp32")
    if bf16:
        half = prepare(model, dtype="bfloat16")  # held here: prepare() caches one variant per model
        out["gpt3zh bf16"] = (lambda p, n: gpt3zh_greedy(half, p, n), 2, "gpt3zh fp32")
    print(f"# {fp32!r} | {int8!r}")
    return out


def mem_read(buf: torch.Tensor, passes: int = 4):
    def read(warmup=False):
        for _ in range(1 if warmup else passes):
            buf.sum()
    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    ap.add_argument("--bf16", action="store_true", help="also gpt3zh with dtype=bfloat16 (a cast copy)")
    ap.add_argument("--no-transformers", action="store_true",
                    help="leave transformers out (its Conv1D layout is a second float copy: for the 1.3B shape)")
    args = ap.parse_args()

    import ctranslate2
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PRESETS[args.preset].replace(dropout=0.0, attn_dropout=0.0)
    model = GPT(cfg).eval()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.processor() or platform.machine()}  "
          f"threads {torch.get_num_threads()}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"ctranslate2 {ctranslate2.__version__}")
    print(f"# preset {args.preset}, random init (seed 0), greedy, prompt {args.prompt_len} tokens, {args.new_tokens} "
          f"new tokens, median of {args.runs} interleaved runs after a warm-up")
    buf = torch.ones(READ_BYTES // 4)
    with tempfile.TemporaryDirectory() as tmp:
        impls = engines(model, tmp, args.threads, args.bf16, not args.no_transformers)
        for batch in args.batch:
            prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len))
            timed = {name: bind(fn, prompts, args.new_tokens) for name, (fn, _, _) in impls.items()}
            timed["memory read"] = mem_read(buf)
            results = interleaved(timed, args.runs)
            report(results, impls, cfg, batch, args.new_tokens)


def bind(fn, prompts: torch.Tensor, new: int):
    """fn(prompts, new) as `interleaved` calls it (4 tokens for the warm-up)."""
    return lambda warmup=False: fn(prompts, 4 if warmup else new)


def report(results: dict, impls: dict, cfg: GPTConfig, batch: int, new: int) -> None:
    read_s = results.pop("memory read")[0]
    bandwidth = 4 * READ_BYTES / read_s
    print(f"# batch {batch}: memory read {bandwidth / 1e9:.1f} GB/s (sum over {READ_BYTES >> 20} MiB, same loop)")
    print("| impl | batch | median s | tok/s | vs CTranslate2 (same precision) | weight GB/s | share of read bandwidth "
          "| tokens equal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, (secs, out, _) in results.items():
        _, per_weight, ref = impls[name]
        peer = "CTranslate2 int8" if per_weight == 1 else "CTranslate2 fp32"
        rel = results[peer][0] / secs
        gbs = weight_bytes(cfg, per_weight) * new / secs  # one weight read per decode step, all rows together
        same = "(reference)" if ref == name else f"{agreement(out, results[ref][1])} vs {ref}"
        print(f"| {name} | {batch} | {secs:.3f} | {batch * new / secs:.1f} | {rel:.2f}x | {gbs / 1e9:.1f} | "
              f"{gbs / bandwidth:.0%} | {same} |", flush=True)


if __name__ == "__main__":
    main()
