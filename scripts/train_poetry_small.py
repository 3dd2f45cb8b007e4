"""Train and package gpt3zh's embedded default model, `src/gpt3zh/assets/poetry-small`.

    python scripts/train_poetry_small.py train      # tokenizer + `gpt3zh train examples/poetry_small.yaml`
    python scripts/train_poetry_small.py train train.resume=true   # continue an interrupted run
    python scripts/train_poetry_small.py package    # fp32 copy, eval, samples, model card -> assets

Run from the repository root with ../shared beside it. `train` is deterministic: the same command,
seed, machine, torch version and thread count (fixed to 2 here) give the same weights, and an
interrupted run resumed with `train.resume=true` ends with the same weights as an uninterrupted one.
OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE), which does not change any result but keeps
a run from collapsing when other processes share the cores.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "poetry_small.yaml"
WORK = ROOT / "work_dirs" / "poetry_small"
TRAIN = ROOT.parent / "shared" / "data" / "poetry" / "train.jsonl"
THREADS = 2


def build_tokenizer() -> None:
    from gpt3zh.tokenizer import train_char_tokenizer

    texts = [json.loads(line)["src_txt"] for line in TRAIN.open(encoding="utf-8")]
    tok = train_char_tokenizer(texts, WORK / "tokenizer", min_frequency=3)
    print(f"char tokenizer: {tok.vocab_size} ids -> {WORK / 'tokenizer'}")


def train(overrides: list[str]) -> None:
    import gpt3zh

    torch.set_num_threads(THREADS)
    if not any(o.startswith("train.resume=") and o != "train.resume=false" for o in overrides):
        build_tokenizer()
    result = gpt3zh.train(CONFIG, *overrides)
    print(json.dumps({"output": str(result.output_dir), "step": result.step, "train_loss": result.train_loss,
                      **{k: v for k, v in result.eval.items() if k != "examples"}}, ensure_ascii=False))


def main(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        train(argv[1:])
    elif argv[:1] == ["package"]:
        from poetry_small_package import package  # noqa: PLC0415 (kept beside this script)

        package(WORK, ROOT / "src" / "gpt3zh" / "assets" / "poetry-small")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
