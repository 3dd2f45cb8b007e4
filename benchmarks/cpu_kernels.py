"""CPU matmul kernels for decoding: every weight matrix of a preset once (a decode step's weight
reads), per kernel, fp32 / bf16 / int8, to choose what gpt3zh's CPU paths run.

    .venv/bin/python benchmarks/cpu_kernels.py --preset base --rows 1 8 --threads 2

All of a preset's matrices (4 per block + the head) in sequence, so they stream from memory as in
a real step (one matrix alone may sit in L3). Kernels, each on its own copy of the weights:

- fp32: `F.linear`; `chunked` (`fast.ChunkedLinear` without the C kernel: bmm over per-thread row
  blocks); oneDNN `torch.ops.mkldnn._linear_pointwise` with a prepacked weight; gpt3zh's C kernel
  (`gpt3zh.ckernel`, 1-3 rows) on these weights and on huge-page copies (`gpt3zh.hugepages`, as
  `load_pretrained` places them), with a plain `sum` over those copies as their read reference;
- bf16 (weights and activations): `F.linear` (oneDNN, AVX512-BF16 where the CPU has it); chunked;
  gpt3zh's C kernel on huge-page copies;
- int8 weight-only: `torch._weight_int8pack_mm` with fp32 and with bf16 activations;
- int8 weights and activations, quantized at run time: fbgemm `quantized::linear_dynamic` (what
  `quantize.Int8DynamicLinear` runs; a per-row wrapper for several rows), oneDNN
  `onednn::qlinear_pointwise` (the x86 inductor quantizer's kernel; activations quantized in torch
  ops), `torch._int_mm` with per-row quantization in torch ops (torchao's eager CPU int8-dynamic);
  torchao's `Int8DynamicActivationInt8WeightConfig` layers when torchao is installed.

A "memory read" entry (`sum` over 512 MiB) runs in the same interleaved loop; every kernel's
weight bytes per second is shown as a share of it. Median of --runs interleaved passes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from gpt3zh import ckernel, fast, hugepages
from gpt3zh.config import PRESETS
from gpt3zh.quantize import Int8DynamicLinear, quantize_per_channel

READ_BYTES = 512 * 2**20


def matrices(preset: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    c = PRESETS[preset]
    d, f = c.d_model, c.ffn_dim
    shapes = [(3 * d, d), (d, d), (f, d), (d, f)]
    g = torch.Generator().manual_seed(0)
    out = [(torch.randn(s, generator=g) * 0.02, torch.zeros(s[0])) for _ in range(c.n_layer) for s in shapes]
    return out + [(torch.randn(c.vocab_size, d, generator=g) * 0.02, torch.zeros(c.vocab_size))]


def fp32_kernels(ws, threads):
    chunked = [fast.ChunkedLinear(w, b, threads, max_rows=1 << 30) for w, b in ws]
    packed = [(torch.ops.mkldnn._reorder_linear_weight(w, None), b) for w, b in ws]
    out = {
        "fp32 F.linear": (lambda x: [F.linear(x[w.shape[1]], w, b) for w, b in ws], 4),
        "fp32 chunked": (lambda x: [m(x[m.weight.shape[1]]) for m in chunked], 4),
        "fp32 oneDNN packed": (lambda x: [torch.ops.mkldnn._linear_pointwise(x[w0.shape[1]], p, b, "none", [], "")
                                          for (p, b), (w0, _) in zip(packed, ws)], 4),
    }
    kernel = ckernel.load()
    if kernel is None:
        print(f"# gpt3zh's C kernel: unavailable ({ckernel.unavailable()})")
        return out
    # the C kernel on these tensors (4 KiB pages), and on copies placed as load_pretrained places them
    flat = {f"w{i}": w for i, (w, _) in enumerate(ws)}
    huge = [(hugepages.place(dict(flat))[f"w{i}"], b) for i, (_, b) in enumerate(ws)] if hugepages.enabled() else []
    out[CK + ", 4 KiB pages"] = (lambda x: [kernel.run(x[w.shape[1]], w, b) for w, b in ws], 4)
    if huge:
        out[CK + ", huge pages (gpt3zh)"] = (lambda x: [kernel.run(x[w.shape[1]], w, b) for w, b in huge], 4)
        out["(sum over the same huge-page weights)"] = (lambda x: [w.sum() for w, _ in huge], 4)
    return out


CK = "fp32 gpt3zh C kernel"  # 1-ckernel.MAX_ROWS rows only
CK_BF16 = "bf16 gpt3zh C kernel, huge pages (gpt3zh)"


def bf16_kernels(ws, threads):
    half = [(w.bfloat16(), b.bfloat16()) for w, b in ws]
    chunked = [fast.ChunkedLinear(w, b, threads, max_rows=1 << 30) for w, b in half]
    out = {
        "bf16 F.linear": (lambda x: [F.linear(x[("bf16", w.shape[1])], w, b) for w, b in half], 2),
        "bf16 chunked": (lambda x: [m(x[("bf16", m.weight.shape[1])]) for m in chunked], 2),
    }
    kernel = ckernel.load()
    if kernel is not None and hugepages.enabled():
        flat = hugepages.place({f"w{i}": w for i, (w, _) in enumerate(half)})
        huge = [(flat[f"w{i}"], b) for i, (_, b) in enumerate(half)]
        out[CK_BF16] = (lambda x: [kernel.run(x[("bf16", w.shape[1])], w, b) for w, b in huge], 2)
    return out


def int8_kernels(ws):
    qs = [(*quantize_per_channel(w), b) for w, b in ws]
    dyn = [Int8DynamicLinear(w, b) for w, b in ws]
    onednn = [(torch.ops.onednn.qlinear_prepack(q, None), s, torch.zeros_like(s, dtype=torch.long), b) for q, s, b in qs]
    qts = [(q.t().contiguous(), s, b) for q, s, b in qs]
    out = {
        "int8 weight-only, fp32 act (int8pack)": (lambda x: [torch._weight_int8pack_mm(x[q.shape[1]], q, s) + b
                                                             for q, s, b in qs], 1),
        "int8 weight-only, bf16 act (int8pack)": (lambda x: [torch._weight_int8pack_mm(x[("bf16", q.shape[1])], q,
                                                             s.bfloat16()) for q, s, b in qs], 1),
        "int8 dynamic, fbgemm (gpt3zh)": (lambda x: [m(x[m.in_features]) for m in dyn], 1),
        "int8 dynamic, oneDNN qlinear": (lambda x: [_onednn(x[q.shape[1]], p, s, z, b)
                                                    for (p, s, z, b), (q, _, _) in zip(onednn, qs)], 1),
        "int8 dynamic, torch._int_mm": (lambda x: [_int_mm(x[qt.shape[0]], qt, s, b) for qt, s, b in qts], 1),
    }
    ao = _torchao(ws)
    if ao is not None:
        out["int8 dynamic, torchao"] = (lambda x: [m(x[m.in_features]) for m in ao], 1)
    return out


def _onednn(x, packed, w_scale, w_zero, bias):
    s = x.abs().amax().clamp(min=1e-12) / 127  # one scale per call: the kernel takes a per-tensor grid
    qx = torch.round(x / s).add_(128).clamp_(0, 255).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(qx, float(s), 128, packed, w_scale, w_zero, bias, 1.0, 0,
                                              torch.float32, "none", [], "")


def _int_mm(x, qt, w_scale, bias):
    s = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127  # (M, 1) per row
    return torch._int_mm(torch.round(x / s).to(torch.int8), qt) * s * w_scale + bias


def _torchao(ws):
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    layers = []
    for w, b in ws:
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        seq = torch.nn.Sequential(lin)
        quantize_(seq, Int8DynamicActivationInt8WeightConfig())
        layers.append(seq[0])
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base", choices=list(PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--skip", nargs="*", default=[], help="kernels whose name contains one of these are left out")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
    torch.set_num_threads(args.threads)
    ws = matrices(args.preset)
    params = sum(w.numel() for w, _ in ws)
    kernels = {**fp32_kernels(ws, args.threads), **bf16_kernels(ws, args.threads), **int8_kernels(ws)}
    kernels = {k: v for k, v in kernels.items() if not any(s in k for s in args.skip)}
    buf = torch.ones(READ_BYTES // 4)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  "
          f"{platform.processor() or platform.machine()}  cpu capability {torch.backends.cpu.get_cpu_capability()}  "
          f"threads {args.threads}  preset {args.preset}: {len(ws)} matrices, {params / 1e6:.0f}M weights")
    for rows in args.rows:
        todo = {k: v for k, v in kernels.items() if rows <= ckernel.MAX_ROWS or not k.startswith((CK, CK_BF16))}
        g = torch.Generator().manual_seed(1)
        xs = {n: torch.randn(rows, n, generator=g) for n in {w.shape[1] for w, _ in ws}}
        xs.update({("bf16", n): x.bfloat16() for n, x in list(xs.items())})
        times = time_all({**{k: lambda fn=fn, xs=xs: fn(xs) for k, (fn, _) in todo.items()},
                          "memory read": lambda: buf.sum()}, args.runs)
        bandwidth = READ_BYTES / times.pop("memory read")
        print(f"\n## rows {rows}: memory read {bandwidth / 1e9:.1f} GB/s (sum over 512 MiB, same loop)")
        print("| kernel | ms per pass | weight GB/s | share of read bandwidth | vs fp32 chunked |")
        print("| --- | ---: | ---: | ---: | ---: |")
        ref = times.get("fp32 chunked")
        for name, secs in times.items():
            gbs = params * kernels[name][1] / secs
            rel = f"{ref / secs:.2f}x" if ref else "-"
            print(f"| {name} | {secs * 1e3:.2f} | {gbs / 1e9:.1f} | {gbs / bandwidth:.0%} | {rel} |", flush=True)


def time_all(fns: dict, runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(runs):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    main()
