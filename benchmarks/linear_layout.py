"""CPU linear layers for decoding: which weight layout and kernel reads the weights fastest.

    .venv/bin/python benchmarks/linear_layout.py --preset base --threads 2 --rows 1 8 32 64 128 256

A decode step multiplies one row per sequence by every weight matrix of the model, once. This
script times exactly that, for all of a preset's matrices (4 per block + the tied head, fp32), and
prints milliseconds per pass and the weight bytes streamed per second, for:

- `F.linear`: `F.linear(x, W)` with W (out, in), what nn.Linear does;
- `x @ Wt copy`: `x @ Wt` with a contiguous transposed copy Wt (in, out), transformers' Conv1D layout;
- `chunked` (gpt3zh's decode layout, `fast.ChunkedLinear`): `torch.bmm` of the input against k =
  threads contiguous row blocks of W, a view with no copy, so each thread streams its own block.

Variants are interleaved round-robin, median of `--runs`. The crossover row count where F.linear
catches up is what `fast.CHUNKED_MAX_ROWS` is set from.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from gpt3zh import fast
from gpt3zh.config import PRESETS


def matrices(preset: str) -> list[torch.Tensor]:
    c = PRESETS[preset]
    shapes = [(3 * c.d_model, c.d_model), (c.d_model, c.d_model), (c.ffn_dim, c.d_model), (c.d_model, c.ffn_dim)]
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=g) * 0.02 for _ in range(c.n_layer) for s in shapes]
    return ws + [torch.randn(c.vocab_size, c.d_model, generator=g) * 0.02]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base", choices=list(PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ws = matrices(args.preset)
    wts = [w.t().contiguous() for w in ws]
    chunked = [fast.ChunkedLinear(w, None, args.threads, max_rows=1 << 30) for w in ws]
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  threads "
          f"{args.threads}  {platform.machine()}  preset {args.preset}: {len(ws)} matrices, {nbytes / 1e6:.0f} MB fp32")
    print(f"{'rows':>5}  {'F.linear ms':>11}  {'x @ Wt copy ms':>14}  {'chunked ms':>10}  "
          f"{'chunked GB/s':>12}  {'F.linear / chunked':>18}")
    for rows in args.rows:
        xs = {n: torch.randn(rows, n) for n in {w.shape[1] for w in ws}}
        variants = {
            "linear": lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in ws],
            "copy": lambda xs=xs: [xs[wt.shape[0]] @ wt for wt in wts],
            "chunked": lambda xs=xs: [m(xs[m.weight.shape[1]]) for m in chunked],
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.inference_mode():
            for fn in variants.values():
                fn()
            for _ in range(args.runs):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{rows:5d}  {med['linear']:11.2f}  {med['copy']:14.2f}  {med['chunked']:10.2f}  "
              f"{nbytes / med['chunked'] / 1e6:12.1f}  {med['linear'] / med['chunked']:17.2f}x")


if __name__ == "__main__":
    main()
