"""Peak memory of a full 1.3B fine-tune on one device, by training setup.

On CPU it prints the analytic estimate (`gpt3zh.training.optim.estimate_memory`) for each setup
and checks the estimate's exact parts (weights, gradients, optimizer state) against the bytes a
small model really holds after one optimizer step. On a CUDA device it also runs real steps of
the 1.3B preset (random weights: memory does not depend on their values) at sequence length 512
and prints torch.cuda.max_memory_allocated next to the estimate.

    .venv/bin/python benchmarks/train_memory.py                 # analytic + small-model check
    .venv/bin/python benchmarks/train_memory.py --measure       # + real 1.3B steps (needs CUDA)
"""

from __future__ import annotations

import argparse

import torch

from gpt3zh.config import GPTConfig
from gpt3zh.model import GPT
from gpt3zh.training.config import OptimizerConfig
from gpt3zh.training.data import Batch
from gpt3zh.training.loop import token_loss_sum
from gpt3zh.training.optim import apply_activation_checkpointing, build_optimizer, estimate_memory

GIB = 1024**3
# (name, precision, param_dtype, activation checkpointing)
SETUPS = [
    ("fp32 weights, fp32 AdamW", "fp32", "fp32", False),
    ("bf16 autocast, fp32 weights + AdamW", "bf16", "fp32", False),
    ("bf16 autocast + act. ckpt", "bf16", "fp32", True),
    ("bf16 weights + BF16AdamW + act. ckpt", "bf16", "bf16", True),
]


def held_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"weights": weights, "grads": grads, "optimizer": state}


def one_step(model, opt, batch: Batch, precision: str, device) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    with ctx:
        loss = token_loss_sum(model, batch) / batch.n_tokens
    loss.backward()
    opt.step()  # grads are kept (no zero_grad) so held_bytes sees them, as at the peak of a step


def build(cfg: GPTConfig, param_dtype: str, ckpt: bool, device) -> tuple[GPT, torch.optim.Optimizer]:
    with torch.device(device):
        model = GPT(cfg)
    if param_dtype == "bf16":
        model = model.to(torch.bfloat16)
    if ckpt:
        apply_activation_checkpointing(model)
    return model, build_optimizer(model, OptimizerConfig(lr=1e-5), torch.device(device))


def random_batch(cfg: GPTConfig, batch: int, seq: int, device) -> Batch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    return Batch(tokens, labels, torch.ones(batch, seq, dtype=torch.bool)).to(device)


def check_small_model() -> None:
    cfg = GPTConfig.from_preset("1.3B", n_layer=2, d_model=128, n_head=4, max_seq_len=64, vocab_size=512)
    print("\nexact parts of the estimate vs bytes held after one step (small model, CPU):")
    for name, precision, param_dtype, ckpt in SETUPS:
        model, opt = build(cfg, param_dtype, ckpt, "cpu")
        one_step(model, opt, random_batch(cfg, 2, 32, "cpu"), precision, torch.device("cpu"))
        held = held_bytes(model, opt)
        est = estimate_memory(cfg, 2, 32, precision, param_dtype, ckpt)
        est_b = {k: round(est[f"{k}_gib"] * GIB) for k in held}
        ok = "equal" if held == est_b else f"DIFFER est {est_b}"
        print(f"  {name:<38} weights {held['weights']:>9,} grads {held['grads']:>9,} "
              f"optimizer {held['optimizer']:>10,} bytes: {ok}")


def measure_gpu(batch: int, seq: int) -> None:
    device = torch.device("cuda")
    cfg = GPTConfig.from_preset("1.3B", dropout=0.0, attn_dropout=0.0)
    print(f"\nmeasured on {torch.cuda.get_device_name()} (1.3B preset, batch {batch}, seq {seq}, 2 steps):")
    for name, precision, param_dtype, ckpt in SETUPS:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            model, opt = build(cfg, param_dtype, ckpt, device)
            data = random_batch(cfg, batch, seq, device)
            for _ in range(2):
                one_step(model, opt, data, precision, device)
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / GIB
            est = estimate_memory(cfg, batch, seq, precision, param_dtype, ckpt)["total_gib"]
            print(f"  {name:<38} peak {peak:6.2f} GiB   estimate {est:6.2f} GiB")
        except torch.cuda.OutOfMemoryError:
            print(f"  {name:<38} out of memory")
        finally:
            model = opt = data = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--measure", action="store_true", help="run real 1.3B steps (CUDA only)")
    args = ap.parse_args()
    cfg = GPTConfig.from_preset("1.3B")
    print(f"1.3B preset ({cfg.num_params / 1e9:.3f}B params), batch {args.batch}, sequence length "
          f"{args.seq_len}; analytic peak (GiB, CUDA context and allocator slack not included):")
    cols = ("weights", "grads", "optimizer", "activations", "logits", "total")
    print(f"  {'setup':<38} " + " ".join(f"{c:>11}" for c in cols))
    for name, precision, param_dtype, ckpt in SETUPS:
        est = estimate_memory(cfg, args.batch, args.seq_len, precision, param_dtype, ckpt)
        print(f"  {name:<38} " + " ".join(f"{est[c + '_gib']:>11.2f}" for c in cols))
    print("  (logits are counted for every position; the trainer runs the head on trained positions only)")
    check_small_model()
    if args.measure:
        if not torch.cuda.is_available():
            raise SystemExit("--measure needs a CUDA device")
        measure_gpu(args.batch, args.seq_len)


if __name__ == "__main__":
    main()
