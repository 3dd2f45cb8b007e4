"""CPU decoding against its peers: gpt3zh (fp32, int8) vs transformers fp32 vs CTranslate2 (fp32, int8),
on the same random weights.

    .venv/bin/python benchmarks/cpu_peers.py --preset base --batch 1 8 --runs 5
    .venv/bin/python benchmarks/cpu_peers.py --preset 1.3B --batch 1 --new-tokens 32 --runs 5
    .venv/bin/python benchmarks/cpu_peers.py --preset base --batch 1 --ablate   # what the C kernel and huge pages give

Greedy, random prompts of --prompt-len tokens (equal lengths), exactly --new-tokens new tokens (no
stop id) per sequence. transformers runs gpt3zh's HF layout (`GPT2LMHeadModel`, built in memory from
the HF name table with the model's own tensors); CTranslate2 runs that model converted with its
Python converter API (the `GPT2LMHeadModel` loader of `ct2-transformers-converter`), once, loaded
twice: compute_type float32 and int8. Every engine runs in its own worker process (spawned; the
weights travel as a safetensors file) with --threads threads, as a user runs one engine: in one
process, two OpenMP runtimes slow each other (after one CTranslate2 call, gpt3zh's fp32 decode in
the same process stayed ~25% slower). One invocation drives them all, interleaved (run r of each
before run r+1 of any) after a short warm-up, so load from other processes hits them all alike;
medians are reported. A "memory read" entry in the same
interleaved loop (`sum` over 512 MiB, the best of 4 after a 0.2 s pause) measures the read
bandwidth the engines had: each engine's
weight bytes per decode step x steps per second is shown as a share of it (KV cache and activations
not counted: a few percent at these lengths). Token agreement: fp32 engines against gpt3zh fp32
(random weights have near-tied logits, so a single float rounding can flip a token: the prefix
length that agrees is shown), int8 engines against their own fp32.

Needs the `bench` extra (ctranslate2). Memory, all workers alive at once: gpt3zh fp32 (its weights
and, when it fits in half the memory then available, their oneDNN-packed copy; started last for
that), gpt3zh int8, CTranslate2 fp32 and int8, transformers (its own float copy). 1.3B shape: use
`--no-transformers` (about 13-19 GB without it).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _timing import interleaved
from fast_cpu import agreement, gpt3zh_greedy, hf_from_model, hf_greedy

from gpt3zh import hugepages
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


# ------------------------------------------------------------------ one process per engine
# Engines share nothing but the weights' file: two OpenMP runtimes in one process slow each other
# (after one CTranslate2 call in the same process, gpt3zh's fp32 decode ran ~25% slower for the rest
# of the process: SDPA 32 -> 117 us, GELU 48 -> 128 us per call), and a user runs one engine anyway.
ENGINES = {  # name: (bytes per weight, the reference its tokens are compared with)
    "gpt3zh fp32": (4, "gpt3zh fp32"),
    "gpt3zh int8": (1, "gpt3zh fp32"),
    "gpt3zh bf16": (2, "gpt3zh fp32"),
    "CTranslate2 fp32": (4, "gpt3zh fp32"),
    "CTranslate2 int8": (1, "CTranslate2 fp32"),
    "transformers fp32": (4, "gpt3zh fp32"),
    # ablations (--ablate): gpt3zh fp32 without its C kernel (torch's kernels, as on a machine
    # without a C compiler), and with the C kernel but the weights on 4 KiB pages
    "gpt3zh fp32, torch kernels": (4, "gpt3zh fp32"),
    "gpt3zh fp32, 4 KiB pages": (4, "gpt3zh fp32"),
}
ABLATIONS = ("gpt3zh fp32, torch kernels", "gpt3zh fp32, 4 KiB pages")


def _load_gpt(cfg: GPTConfig, weights: str, huge_pages: bool = False) -> GPT:
    """The model from the safetensors file; huge_pages: its weights placed as gpt3zh's
    load_pretrained places them for the CPU (gpt3zh.hugepages)."""
    from safetensors.torch import load_file

    tensors = load_file(weights)
    if huge_pages:
        hugepages.place(tensors)
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(tensors, assign=True)
    return model.eval()


def _engine(name: str, cfg: GPTConfig, weights: str, ct2_dirs: dict, threads: int):
    """greedy(prompts, new) for `name`, built in this (worker) process."""
    torch.set_num_threads(threads)
    if name.startswith("CTranslate2"):
        import ctranslate2

        ct = "float32" if name.endswith("fp32") else "int8"
        gen = ctranslate2.Generator(ct2_dirs[ct], device="cpu", compute_type=ct, intra_threads=threads)
        return lambda p, n: ct2_greedy(gen, p, n), ""
    if name == "gpt3zh fp32, torch kernels":
        os.environ["GPT3ZH_CKERNEL"] = "0"  # (this worker process only)
    model = _load_gpt(cfg, weights, huge_pages=name.startswith("gpt3zh") and name != "gpt3zh fp32, 4 KiB pages")
    if name == "transformers fp32":
        hf = hf_from_model(model)
        del model
        return lambda p, n: hf_greedy(hf, p, n), ""
    options = {"gpt3zh int8": {"quantize": "int8"}, "gpt3zh bf16": {"dtype": "bfloat16"}}.get(name, {})
    prepared = prepare(model, **options)
    del model  # the int8 / bf16 copies do not need the float32 linear weights (the fp32 view holds them)
    gc.collect()
    return lambda p, n: gpt3zh_greedy(prepared, p, n), repr(prepared)


def _worker(conn, name: str, cfg: GPTConfig, weights: str, ct2_dirs: dict, threads: int) -> None:
    try:
        fn, desc = _engine(name, cfg, weights, ct2_dirs, threads)
        conn.send(("ready", desc))
        while True:
            msg = conn.recv()
            if msg is None:
                return
            prompts, new = msg
            t0 = time.perf_counter()
            out = fn(prompts, new)
            conn.send((time.perf_counter() - t0, out))
    except Exception as err:  # report, do not hang the parent
        conn.send(("error", f"{name}: {type(err).__name__}: {err}"))


class Worker:
    """An engine in its own process (spawned: a fresh interpreter, its own thread pools)."""

    def __init__(self, name: str, cfg: GPTConfig, weights: str, ct2_dirs: dict, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, name, cfg, weights, ct2_dirs, threads), daemon=True)
        self.proc.start()
        kind, self.description = self.conn.recv()
        if kind == "error":
            raise RuntimeError(self.description)

    def __call__(self, prompts: torch.Tensor, new: int) -> tuple[float, list[list[int]]]:
        self.conn.send((prompts, new))
        secs, out = self.conn.recv()
        if secs == "error":
            raise RuntimeError(out)
        return secs, out

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


def prepare_files(model: GPT, tmp: str) -> tuple[str, dict]:
    """The weights as safetensors (every engine's worker loads them) and the two CTranslate2 models."""
    from safetensors.torch import save_file

    weights = f"{tmp}/model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, weights)
    dirs = {ct: ct2_convert(model, f"{tmp}/{ct}", ct) for ct in ("float32", "int8")}
    return weights, dirs


def mem_read(buf: torch.Tensor, passes: int = 4):
    """The read-bandwidth probe: each round, after a pause that lets the engine just run go idle
    (its threads spin for a while after a call), the fastest of `passes` sums over `buf`; returns
    the list of those seconds, one per round (the median of it is reported)."""
    best: list[float] = []

    def read(warmup=False):
        time.sleep(0.2)
        secs = []
        for _ in range(1 if warmup else passes):
            t0 = time.perf_counter()
            buf.sum()
            secs.append(time.perf_counter() - t0)
        if not warmup:
            best.append(min(secs))
        return best
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
    ap.add_argument("--ablate", action="store_true",
                    help="also gpt3zh fp32 without its C kernel and with its weights on 4 KiB pages")
    ap.add_argument("--engines", nargs="+", choices=list(ENGINES),
                    help="only these (default: all but bf16 and the ablations)")
    args = ap.parse_args()

    import ctranslate2
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PRESETS[args.preset].replace(dropout=0.0, attn_dropout=0.0)
    names = args.engines or [n for n in ENGINES if (args.bf16 or n != "gpt3zh bf16") and
                             (args.ablate or n not in ABLATIONS) and
                             not (args.no_transformers and n.startswith("transformers"))]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.processor() or platform.machine()}  "
          f"threads {args.threads}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"ctranslate2 {ctranslate2.__version__}")
    print(f"# preset {args.preset}, random init (seed 0), greedy, prompt {args.prompt_len} tokens, {args.new_tokens} "
          f"new tokens, median of {args.runs} interleaved runs after a warm-up; each engine in its own process")
    with tempfile.TemporaryDirectory() as tmp:
        model = GPT(cfg).eval()
        weights, ct2_dirs = prepare_files(model, tmp)
        del model
        gc.collect()
        # started one at a time, CTranslate2 first: gpt3zh's fp32 packs its weights only if the
        # copy fits in what the others left (half the available memory)
        workers = {}
        for name in sorted(names, key=lambda n: (not n.startswith("CTranslate2"), n == "gpt3zh fp32")):
            workers[name] = Worker(name, cfg, weights, ct2_dirs, args.threads)
            if workers[name].description:
                print(f"# {name}: {workers[name].description}")
        workers = {n: workers[n] for n in names}
        buf = torch.ones(READ_BYTES // 4)
        try:
            for batch in args.batch:
                prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len))
                timed = {name: bind(w, prompts, args.new_tokens) for name, w in workers.items()}
                timed["memory read"] = mem_read(buf)
                results = interleaved(timed, args.runs)
                report(results, cfg, batch, args.new_tokens)
        finally:
            for w in workers.values():
                w.close()


def bind(worker: Worker, prompts: torch.Tensor, new: int):
    """worker(prompts, new) as `interleaved` calls it (4 tokens for the warm-up)."""
    return lambda warmup=False: worker(prompts, 4 if warmup else new)


def report(results: dict, cfg: GPTConfig, batch: int, new: int) -> None:
    read_s = statistics.median(results.pop("memory read")[1])  # the probe's own best-of-passes times
    # (median seconds, last tokens); the time is interleaved()'s around the call to the worker (the
    # pipe adds well under a millisecond to runs of seconds)
    results = {name: (secs, out[1]) for name, (secs, out, _) in results.items()}
    bandwidth = READ_BYTES / read_s
    print(f"# batch {batch}: memory read {bandwidth / 1e9:.1f} GB/s (sum over {READ_BYTES >> 20} MiB, same loop)")
    print("| impl | batch | median s | tok/s | vs CTranslate2 (same precision) | weight GB/s | share of read bandwidth "
          "| tokens equal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, (secs, out) in results.items():
        per_weight, ref = ENGINES[name]
        peer = "CTranslate2 int8" if per_weight == 1 else "CTranslate2 fp32"
        rel = f"{results[peer][0] / secs:.2f}x" if peer in results else "-"
        gbs = weight_bytes(cfg, per_weight) * new / secs  # one weight read per decode step, all rows together
        same = ("(reference)" if ref == name else f"{agreement(out, results[ref][1])} vs {ref}" if ref in results
                else "-")
        print(f"| {name} | {batch} | {secs:.3f} | {batch * new / secs:.1f} | {rel} | {gbs / 1e9:.1f} | "
              f"{gbs / bandwidth:.0%} | {same} |", flush=True)


if __name__ == "__main__":
    main()
