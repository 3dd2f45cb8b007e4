"""The ModelScope model cards' scripts, a ModelScope-style cache of tiny models, local hub datasets.

- `card_scripts()`: the cards' Python blocks (shared/spec/model-card-gpt3-1.3B.md) as they are,
  with only their `from modelscope... import X` lines changed to `from gpt3zh.compat.modelscope
  import X` and `max_epochs = 10` to 1; the base card (model-card-gpt3-base.txt) is a text dump
  that lost its indentation, so BASE_POETRY is that script re-indented, checked line by line
  against the card by `check_base_script`.
- `build_cache(cache)`: damo/nlp_gpt3_text-generation_1.3B as a tiny Megatron directory (random
  weights saved by gpt3zh.save_model, the real configuration.json and tokenizer.json) and
  damo/nlp_gpt3_text-generation_chinese-base as a tiny single-process one (BERT vocab.txt), where
  MODELSCOPE_CACHE=cache finds them. Their config.json asks for greedy decoding (top_k 1,
  top_p 0: valid for ModelScope's sampler too), so the pipeline snippets' output is checkable.
- `write_datasets(root)`: local folders named like the hub datasets, with the hub's columns.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from conftest import DATA, SHARED

MODEL_1_3B = "damo/nlp_gpt3_text-generation_1.3B"
MODEL_BASE = "damo/nlp_gpt3_text-generation_chinese-base"
SPEC = SHARED / "spec"
TOKENS_TO_GENERATE = 16
N_POETRY, N_POETRY_TEST, N_QG, N_QG_DEV = 48, 8, 12, 4

BASE_POETRY = '''\
# 基于modelscope中文gpt3底座二次开发得到诗词生成模型代码
from gpt3zh.compat.modelscope import MsDataset
from gpt3zh.compat.modelscope import build_trainer
from gpt3zh.compat.modelscope import MsDataset
from gpt3zh.compat.modelscope import read_config
from gpt3zh.compat.modelscope import Metrics, Trainers
from datasets import Dataset
from gpt3zh.compat.modelscope import MsDataset
dataset_dict = MsDataset.load('chinese-poetry-collection')
train_dataset = dataset_dict['train'].remap_columns({'text1': 'src_txt'})
eval_dataset = dataset_dict['test'].remap_columns({'text1': 'src_txt'})
print (eval_dataset)
max_epochs = 1
tmp_dir = "./gpt3_poetry"
num_warmup_steps = 100
def noam_lambda(current_step: int):
    current_step += 1
    return min(current_step ** (-0.5), current_step * num_warmup_steps ** (-1.5))
def cfg_modify_fn(cfg):
    cfg.train.lr_scheduler = {
        "type": "LambdaLR",
        "lr_lambda": noam_lambda,
        "options": {"by_epoch": False}
    }
    cfg.train.optimizer = {
        "type": "AdamW",
        "lr": 3e-4
    }
    cfg.train.dataloader = {"batch_size_per_gpu": 16, "workers_per_gpu": 1}
    return cfg
kwargs = dict(
    model='damo/nlp_gpt3_text-generation_chinese-base',
    train_dataset=train_dataset,
    eval_datase=eval_dataset,
    max_epochs=max_epochs,
    work_dir=tmp_dir,
    cfg_modify_fn=cfg_modify_fn)
# 构造 trainer 并进行训练
trainer = build_trainer(
    name=Trainers.nlp_base_trainer, default_args=kwargs)
trainer.train()
'''

BASE_PIPELINE = '''\
from gpt3zh.compat.modelscope import pipeline
from gpt3zh.compat.modelscope import Tasks
text_generation_zh = pipeline(Tasks.text_generation, model='damo/nlp_gpt3_text-generation_chinese-base')
result_zh = text_generation_zh("随着计算机视觉的飞速发展,人脸识别技术已从简单场景发展到复杂场景,也即姿态、光照、表情、噪声、遮挡、化妆、年龄、种族、性别等差异化所呈现的复杂场景。尽管已有的人脸识别系统在特定约束环境下的识别成功率较高,")
print(result_zh['text'])
'''  # noqa: E501 (the card's prompt line, verbatim: check_base_script compares the script with the card line by line)


# --------------------------------------------------------------------------------------- scripts
def port(code: str) -> str:
    """A card's script with its modelscope imports pointed at gpt3zh and one epoch of training."""
    lines = []
    for line in code.splitlines():
        m = re.fullmatch(r"from modelscope(\.[\w.]+)? import (.+)", line)
        lines.append(f"from gpt3zh.compat.modelscope import {m.group(2)}" if m else line)
    ported, n = re.subn(r"^max_epochs = 10$", "max_epochs = 1", "\n".join(lines) + "\n", flags=re.MULTILINE)
    assert n <= 1
    return ported


def card_scripts() -> dict[str, str]:
    """{'pipeline', 'finetune_poetry', 'finetune_dureader'}: the 1.3B card's blocks, ported."""
    blocks = re.findall(r"```python\n(.*?)```", (SPEC / "model-card-gpt3-1.3B.md").read_text(encoding="utf-8"),
                        re.DOTALL)
    assert len(blocks) == 3, len(blocks)
    pipe, poetry, dureader = blocks
    assert "pipeline(Tasks.text_generation" in pipe and poetry.startswith("# finetune_poetry.py")
    assert dureader.startswith("# finetune_dureader.py")
    return {"pipeline": port(pipe), "finetune_poetry": port(poetry), "finetune_dureader": port(dureader)}


def check_base_script(script: str, card_marker: str, last_line: str) -> None:
    """`script` is the base card's text from `card_marker` to `last_line`, line for line, except
    for indentation, the import lines and max_epochs."""
    card = (SPEC / "model-card-gpt3-base.txt").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(card) if line.startswith(card_marker))
    end = next(i for i in range(start, len(card)) if card[i].strip() == last_line)
    theirs = [line.strip() for line in port("\n".join(card[start : end + 1])).splitlines()]
    ours = [line.strip() for line in script.splitlines()]
    assert ours == theirs, [(a, b) for a, b in zip(ours, theirs) if a != b][:3]


# ---------------------------------------------------------------------------------------- models
def build_cache(cache: Path, world_size: int = 1, tp: int = 1) -> dict[str, Path]:
    from gpt3zh.checkpoint import save_model
    from gpt3zh.config import GenerationDefaults, GPTConfig
    from gpt3zh.model import GPT

    greedy = GenerationDefaults(top_k=1, top_p=0.0, tokens_to_generate=TOKENS_TO_GENERATE)
    real = DATA / "modelscope-gpt3-1.3B"
    torch.manual_seed(0)
    big = cache / "models" / MODEL_1_3B
    cfg = GPTConfig(vocab_size=51200, n_layer=2, n_head=4, d_model=32, max_seq_len=512, gelu="tanh",
                    dropout=0.0, attn_dropout=0.0)  # no dropout: one process and dp x tp compute the same
    save_model(GPT(cfg), big, format="megatron", generation=greedy)
    conf = json.loads((real / "configuration.json").read_text(encoding="utf-8"))
    # as the card tells users to set it for their launch (it ships world_size 8, tp 2)
    conf["megatron"].update(world_size=world_size, tensor_model_parallel_size=tp)
    (big / "configuration.json").write_text(json.dumps(conf, indent=4, ensure_ascii=False), encoding="utf-8")
    shutil.copy2(real / "tokenizer.json", big / "tokenizer.json")

    torch.manual_seed(1)
    base = cache / "models" / MODEL_BASE
    cfg = GPTConfig(vocab_size=21128, n_layer=2, n_head=4, d_model=32, max_seq_len=512, gelu="erf",
                    dropout=0.0, attn_dropout=0.0)
    save_model(GPT(cfg), base, format="modelscope", generation=greedy)
    # the base model's configuration.json: the 1.3B one's trainer blocks, single-process kinds
    single = {k: v for k, v in conf.items() if k != "megatron"}
    single.update(preprocessor={"type": "text-gen-tokenizer"}, pipeline={"type": "text-generation"})
    (base / "configuration.json").write_text(json.dumps(single, indent=4, ensure_ascii=False), encoding="utf-8")
    shutil.copy2(DATA / "tokenizers" / "bert-base-chinese" / "vocab.txt", base / "vocab.txt")
    return {MODEL_1_3B: big, MODEL_BASE: base}


# -------------------------------------------------------------------------------------- datasets
def _read(path: Path, n: int, keep=lambda r: True) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if keep(r)][:n]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_datasets(root: Path) -> None:
    """chinese-poetry-collection (train / test, column text1) and DuReader_robust-QG (train /
    validation, text1 + text2, src without the '\\n' the card's map appends)."""
    poetry = DATA / "poetry"
    _write(root / "chinese-poetry-collection" / "train.jsonl",
           [{"text1": r["src_txt"]} for r in _read(poetry / "sample.jsonl", N_POETRY)])
    _write(root / "chinese-poetry-collection" / "test.jsonl",
           [{"text1": r["src_txt"]} for r in _read(poetry / "test.jsonl", N_POETRY_TEST)])

    def short(r: dict) -> bool:  # rows that fit sequence_length 512 whole: every target trains
        return len(r["src_txt"]) < 350

    qg = DATA / "qg"
    for split, src, n in (("train", "train.jsonl", N_QG), ("validation", "dev.jsonl", N_QG_DEV)):
        _write(root / "DuReader_robust-QG" / f"{split}.jsonl",
               [{"text1": r["src_txt"][:-1], "text2": r["tgt_txt"]} for r in _read(qg / src, n, short)])
