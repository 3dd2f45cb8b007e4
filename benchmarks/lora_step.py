"""CPU optimizer-step time of LoRA fine-tuning against full fine-tuning of the same model.

The model is the embedded poetry-small (6.5 M parameters), the data the shared poetry sample;
both setups run the trainer's own step (`Trainer.train_step`: forward, backward, clip, AdamW) on
the same micro-batches, interleaved (benchmarks/_timing.py), fp32 on the CPU. LoRA: r=8 on every
block linear (train.lora's default targets), the base frozen.

    .venv/bin/python benchmarks/lora_step.py [--steps 10] [--batch 8] [--seq 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _timing import interleaved

from gpt3zh.assets import default_model_path
from gpt3zh.training import load_config
from gpt3zh.training.loop import Trainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "poetry" / "sample.jsonl"


def setup(lora: bool, batch: int, seq: int, work: Path):
    cfg = {"model": str(default_model_path()), "dataset": {"train": str(DATA)},
           "preprocessor": {"sequence_length": seq},
           "train": {"work_dir": str(work), "device": "cpu", "progress_bar": False, "max_steps": 1000,
                     "dataloader": {"batch_size_per_gpu": batch}, "optimizer": {"lr": 1e-4},
                     **({"lora": {"r": 8, "alpha": 16}} if lora else {})}}
    trainer = Trainer(load_config(cfg))
    trainer.prepare()
    torch.manual_seed(0)
    model = trainer.build_model(trainer.gpt_cfg).train()
    optimizer = trainer.build_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = {"step": 0}

    def step(warmup: bool = False):
        loss, tokens, _ = trainer.train_step(model, optimizer, scaler, trainer.micro_batches(state["step"] % 50))
        state["step"] += 1
        return tokens

    return step, trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        full, full_params = setup(False, args.batch, args.seq, Path(tmp) / "full")
        lora, lora_params = setup(True, args.batch, args.seq, Path(tmp) / "lora")
        results = interleaved({"full": full, "lora": lora}, args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x seq {args.seq}, "
          f"{args.steps} steps each (median)")
    print("| setup | trained parameters | ms / optimizer step | tokens / s |")
    print("| --- | ---: | ---: | ---: |")
    for name, params in (("full fine-tuning", full_params), ("LoRA r=8 (all block linears)", lora_params)):
        seconds, tokens, _ = results["full" if name.startswith("full") else "lora"]
        print(f"| {name} | {params:,} | {seconds * 1000:.1f} | {tokens / seconds:,.0f} |")
    print(f"LoRA / full step time: {results['lora'][0] / results['full'][0]:.2f}")


if __name__ == "__main__":
    main()
