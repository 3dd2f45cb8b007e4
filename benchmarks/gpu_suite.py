"""One-command GPU decoding suite: presets base, 1.3B, 2.7B, 13B with random weights of the right
shapes, in bf16 (eager, compiled) and int8 (compiled), side by side with transformers
GPT2LMHeadModel.generate on the same weights (built in memory from the HF name table).

    python benchmarks/gpu_suite.py                      # one H100: < 10 min, appends to docs/benchmarks.md
    python benchmarks/gpu_suite.py --smoke --device cpu # tiny shapes, end to end on CPU (tests run this)

Per preset: batch-1 decode tok/s (32-token prompt, 128 new tokens, median of --runs interleaved runs)
and its share of the memory roofline (bytes read per token = weights + the KV cache slots a step
attends over, divided by the time per token and by the copy bandwidth measured in this run with a
large device-to-device copy); prefill latency of 512 tokens; compiled throughput at batch 8 and 32;
compile time (the compiled warm-up). For 13B: seconds to write 128 Chinese characters in bf16 and
int8, from the characters per token of the real 1.3B tokenizer on poetry and qg text
(../shared/data; pass --chars-per-token where that is not reachable).

Models are built on the meta device, cast, then materialized on the device (no fp32 copy of 13B).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from gpt3zh.config import PRESETS, GPTConfig
from gpt3zh.inference import DTYPES, prepare
from gpt3zh.model import GPT, TiedHead
from gpt3zh.quantize import quantize_int8

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_cpu import agreement, bucketed, gpt3zh_greedy, hf_from_model, hf_greedy

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SMOKE_CFG = GPTConfig(vocab_size=512, n_layer=2, n_head=4, d_model=64, max_seq_len=640, dropout=0.0, attn_dropout=0.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, nbytes: int, runs: int = 5) -> float:
    """Bytes/s of a large device-to-device copy (each byte is read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(runs))
    return 2 * nbytes / best


def build(cfg: GPTConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model.eval()


def decode_bytes(model: GPT, batch: int, cache_len: int) -> int:
    """Bytes one decode step reads: weights (the embedding tables only through the head) + KV slots."""
    skip = {"tok_emb.weight", "pos_emb.weight"}
    tensors = [t for n, t in model.named_parameters() if n not in skip]
    tensors += [b for n, b in model.named_buffers() if "kv_cache" not in n]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    if isinstance(model.head, TiedHead):  # tied fp head: the whole embedding is read by the head
        weights += model.tok_emb.weight.numel() * model.tok_emb.weight.element_size()
    cfg = model.config
    kv = 2 * cfg.n_layer * batch * cache_len * cfg.d_model * model.tok_emb.weight.element_size()
    return weights + kv


def chars_per_token(path_1p3b: Path, max_rows: int = 500) -> float | None:
    """Characters per token of the real 1.3B tokenizer over poetry test and qg dev text."""
    import gpt3zh

    files = [SHARED / "poetry" / "test.jsonl", SHARED / "qg" / "dev.jsonl"]
    if not path_1p3b.is_dir() or not all(f.is_file() for f in files):
        return None
    tok = gpt3zh.load_tokenizer(path_1p3b)
    chars = tokens = 0
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines()[:max_rows]:
            row = json.loads(line)
            text = "".join(str(row[k]) for k in ("src_txt", "tgt_txt") if k in row).replace("<sep>", "")
            chars += len(text)
            tokens += len(tok.encode(text))
    return chars / tokens


def interleave(impls: dict, runs: int, device) -> dict[str, tuple[float, list, float]]:
    """{name: (median s, last output, warm-up s)}; run r of every impl before run r+1 of any."""
    warm, times, outs = {}, {n: [] for n in impls}, {}
    for name, fn in impls.items():
        warm[name] = timed(lambda fn=fn: fn(True), device)
    for _ in range(runs):
        for name, fn in impls.items():
            box: list = []
            times[name].append(timed(lambda fn=fn, box=box: box.append(fn(False)), device))
            outs[name] = box[0]
    return {n: (statistics.median(t), outs[n], warm[n]) for n, t in times.items()}


def decode_impls(model, prompts, new, cache_len, compile_variants, hf=None, int8=False) -> dict:
    tag = "int8" if int8 else str(model.tok_emb.weight.dtype).removeprefix("torch.")

    def ours(compile_):
        prepared = prepare(model, compile=compile_)  # held here: prepare() caches one variant per model
        return lambda warm: gpt3zh_greedy(prepared, prompts, 4 if warm else new,
                                          cache_len if warm and compile_ else None)

    impls = {f"gpt3zh {tag} eager": ours(False)}
    if compile_variants:
        impls[f"gpt3zh {tag} compiled"] = ours(True)
    if hf is not None:
        impls[f"transformers {tag}"] = lambda warm: hf_greedy(hf, prompts, 4 if warm else new)
    return impls


def run_preset(name: str, cfg: GPTConfig, args, device, dtype, bandwidth: float, cpt: float | None, rows: list) -> None:
    model = build(cfg, device, dtype)
    B1, P, new = 1, args.prompt_len, args.new_tokens
    prompts = torch.randint(0, cfg.vocab_size, (B1, P), device=device)
    cache_c = bucketed(P + new - 1, cfg.max_seq_len)
    hf = hf_from_model(model, dtype) if not args.no_hf else None
    res = interleave(decode_impls(model, prompts, new, cache_c, True, hf), args.runs, device)
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    prefill = prefill_latency(model, args.prefill_len, args.runs, device)
    thr = {b: throughput(model, b, P, new, args.runs, device) for b in args.batches}
    quantize_int8(model)  # in place: the bf16 linears are freed as they are replaced
    res8 = interleave(decode_impls(model, prompts, new, cache_c, True, int8=True), args.runs, device)
    ref = res[next(iter(res))][1]
    for impl, (secs, out, warm) in {**res, **res8}.items():
        per_tok = secs / new
        is_int8 = "int8" in impl
        cache = cache_c if "compiled" in impl else P + new - 1
        nbytes = decode_bytes(model, B1, cache) if is_int8 else decode_bytes_fp(cfg, dtype, B1, cache)
        roof = nbytes / per_tok / bandwidth
        row = {"preset": name, "impl": impl, "tok/s": new / secs, "roofline": roof,
               "compile s": warm if "compiled" in impl else None, "same": agreement(out, ref)}
        if cpt and name == args.chars_preset and impl.startswith("gpt3zh") and "compiled" in impl:
            row["s/128 chars"] = 128 / cpt * per_tok
        rows.append(row)
    rows.append({"preset": name, "impl": f"prefill {args.prefill_len} tokens (eager)", "ms": prefill * 1e3})
    for b, (tps, same) in thr.items():
        rows.append({"preset": name, "impl": f"gpt3zh compiled batch {b}", "tok/s": tps})
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_bytes_fp(cfg: GPTConfig, dtype, batch: int, cache_len: int) -> int:
    """decode_bytes of the unquantized model, from the config (the model is int8 by the time rows are made)."""
    elt = torch.empty((), dtype=dtype).element_size()
    H, F, L = cfg.d_model, cfg.ffn_dim, cfg.n_layer
    per_layer = (3 * H * H + 3 * H) + (H * H + H) + (F * H + F) + (H * F + H) + 4 * H
    weights = (L * per_layer + 2 * H + cfg.vocab_size * H) * elt
    return weights + 2 * L * batch * cache_len * H * elt


def prefill_latency(model: GPT, T: int, runs: int, device) -> float:
    idx = torch.randint(0, model.config.vocab_size, (1, T), device=device)
    with torch.inference_mode():
        model(idx[:, :8])
        return statistics.median(timed(lambda: model(idx), device) for _ in range(runs))


def throughput(model: GPT, batch: int, P: int, new: int, runs: int, device) -> tuple[float, bool]:
    prompts = torch.randint(0, model.config.vocab_size, (batch, P), device=device)
    cache_c = bucketed(P + new - 1, model.config.max_seq_len)
    compiled = prepare(model, compile=True)
    gpt3zh_greedy(compiled, prompts, 4, cache_c)
    secs = statistics.median(timed(lambda: gpt3zh_greedy(compiled, prompts, new), device) for _ in range(runs))
    return batch * new / secs, True


def print_rows(rows: list[dict]) -> list[str]:
    cols = ["preset", "impl", "tok/s", "roofline", "ms", "s/128 chars", "compile s", "same"]
    fmt = {"tok/s": "{:.1f}", "roofline": "{:.0%}", "ms": "{:.1f}", "s/128 chars": "{:.2f}", "compile s": "{:.1f}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [fmt.get(c, "{}").format(r[c]) if r.get(c) is not None else "" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["base", "1.3B", "2.7B", "13B"], choices=list(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--chars-preset", default="13B", help="preset whose s/128 chars is reported")
    ap.add_argument("--chars-per-token", type=float, default=None, help="use this instead of measuring it")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 run, 8 new tokens, no docs row")
    ap.add_argument("--docs", default=None, help="append the table here (default docs/benchmarks.md, not with --smoke)")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.smoke:
        args.presets, args.chars_preset = ["smoke"], "smoke"
        args.runs, args.prompt_len, args.new_tokens, args.prefill_len, args.batches = 1, 8, 8, 32, [2]
    docs = Path(args.docs) if args.docs else (None if args.smoke else ROOT / "docs" / "benchmarks.md")

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    bandwidth = copy_bandwidth(device, 2**30 if not args.smoke else 2**24)
    cpt = args.chars_per_token or chars_per_token(SHARED / "modelscope-gpt3-1.3B", 20 if args.smoke else 500)
    command = "python benchmarks/gpu_suite.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {gpu}, torch {torch.__version__}, "
            f"{args.dtype}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, chars/token "
            f"{'n/a' if cpt is None else f'{cpt:.3f}'}, `{command}`")
    print("# " + head, flush=True)
    rows: list[dict] = []
    for name in args.presets:
        cfg = SMOKE_CFG if name == "smoke" else PRESETS[name].replace(dropout=0.0, attn_dropout=0.0)
        run_preset(name, cfg, args, device, dtype, bandwidth, cpt, rows)
    lines = print_rows(rows)
    if docs is not None:
        with docs.open("a", encoding="utf-8") as f:
            f.write("\n#### GPU suite: " + head + "\n\n" + "\n".join(lines) + "\n")
        print(f"# appended to {docs}")


if __name__ == "__main__":
    main()
