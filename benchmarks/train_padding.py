"""What padding costs in training: trained tokens/s of the same rows batched three ways.

- pad-to-L:   every row padded to sequence_length, batches in random order (ModelScope's layout)
- dynamic:    batches padded only to their longest row, random batches
- bucketed:   dynamic padding, rows of similar length batched together (gpt3zh's default)

Each way trains on exactly the same rows (one epoch over --rows rows), so the trained tokens are
equal and tokens/s compares the time alone. The three run interleaved in one process, repeated
--reps times, median reported, so a shared machine's load hits all three alike.

    .venv/bin/python benchmarks/train_padding.py                      # poetry, char vocabulary, L=128
    .venv/bin/python benchmarks/train_padding.py --data ../shared/data/qg/train.jsonl --seq-len 512 --rows 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from gpt3zh.model import GPT
from gpt3zh.tokenizer import load_tokenizer, train_char_tokenizer
from gpt3zh.training.config import load_config
from gpt3zh.training.data import collate, detect_mode, epoch_batches, read_rows, tokenize_rows
from gpt3zh.training.loop import Trainer
from gpt3zh.training.optim import build_optimizer


def layouts(data, batch: int, seq_len: int, seed: int):
    lengths = data.lengths
    random = epoch_batches(lengths, batch, seed, 0, shuffle=True, bucket=False)
    bucketed = epoch_batches(lengths, batch, seed, 0, shuffle=True, bucket=True)
    return {
        "pad-to-L": [collate(data, b, pad_to=seq_len - 1) for b in random],
        "dynamic": [collate(data, b) for b in random],
        "bucketed": [collate(data, b) for b in bucketed],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/poetry/sample.jsonl")
    ap.add_argument("--tokenizer", default="char",
                    help="a tokenizer path, or 'char': a character vocabulary built from the rows, so the "
                         "transformer body (where padding costs) dominates as in a large model, not the head")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = read_rows(args.data)[: args.rows]
    if args.tokenizer == "char":
        tok = train_char_tokenizer(r[k] for r in rows for k in ("src_txt", "tgt_txt") if k in r)
    else:
        tok = load_tokenizer(args.tokenizer)
    data = tokenize_rows(rows, tok, args.seq_len, detect_mode(rows, args.data))
    keep = np.flatnonzero(data.trained_tokens > 0)  # as the trainer does
    ways = layouts(data, args.batch, args.seq_len, seed=0)
    ways = {k: [b for b in v if b.n_tokens > 0] for k, v in ways.items()}
    model_cfg = {"preset": "1.3B", "n_layer": args.layers, "n_head": 4, "d_model": args.d_model,
                 "max_seq_len": args.seq_len, "vocab_size": tok.vocab_size, "dropout": 0.0, "attn_dropout": 0.0}
    cfg = load_config({"model": model_cfg, "tokenizer": args.tokenizer, "dataset": {"train": args.data},
                       "train": {"progress_bar": False, "device": "cpu"}})
    trainer = Trainer(cfg)
    torch.manual_seed(0)
    model = GPT(cfg.model.gpt_config())
    opt = build_optimizer(model, cfg.train.optimizer, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    trained = {k: sum(b.n_tokens for b in v) for k, v in ways.items()}
    computed = {k: sum(b.tokens.numel() for b in v) for k, v in ways.items()}
    assert len(set(trained.values())) == 1, trained
    print(f"data {args.data}: {len(data)} rows ({data.mode}, {len(data) - len(keep)} without trained tokens), "
          f"sequence_length {args.seq_len}, batch {args.batch}, model d_model {args.d_model} x {args.layers} "
          f"layers, vocab {tok.vocab_size}, {args.threads} thread(s)")
    print("machine: 2 CPU cores shared with other jobs; the three layouts run interleaved batch by batch, "
          f"median of {args.reps} epochs each")
    # Interleaved batch by batch (every layout has the same number of batches), so a burst of
    # load from other jobs lands on all three; CPU time (one thread) is reported beside wall time
    # because it is what the machine's other jobs cannot take away.
    wall: dict[str, list[float]] = {k: [] for k in ways}
    cpu: dict[str, list[float]] = {k: [] for k in ways}
    trainer.train_step(model, opt, scaler, ways["bucketed"][:1])  # warm-up
    n_batches = min(len(v) for v in ways.values())
    for _ in range(args.reps):
        w, c = dict.fromkeys(ways, 0.0), dict.fromkeys(ways, 0.0)
        for i in range(n_batches):
            for name, batches in ways.items():
                t0, c0 = time.perf_counter(), time.process_time()
                trainer.train_step(model, opt, scaler, [batches[i]])
                w[name] += time.perf_counter() - t0
                c[name] += time.process_time() - c0
        for name in ways:
            wall[name].append(w[name])
            cpu[name].append(c[name])
    base_w, base_c = statistics.median(wall["pad-to-L"]), statistics.median(cpu["pad-to-L"])
    print(f"{'layout':<10} {'positions computed':>18} {'untrained':>9} {'wall s':>7} {'tok/s (wall)':>13} "
          f"{'speed-up':>8} {'cpu s':>7} {'tok/s (cpu)':>12} {'speed-up':>8}")
    for name in ways:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        pad = 1 - trained[name] / computed[name]
        print(f"{name:<10} {computed[name]:>18,} {pad:>9.1%} {mw:>7.2f} {trained[name] / mw:>13,.0f} "
              f"{base_w / mw:>7.2f}x {mc:>7.2f} {trained[name] / mc:>12,.0f} {base_c / mc:>7.2f}x")

if __name__ == "__main__":
    main()
