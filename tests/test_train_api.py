"""gpt3zh.train's Python arguments: in-memory datasets beside data files, a Python LambdaLR schedule.

The same rows given every way (a list of dicts, a datasets.Dataset, an MsDataset, .jsonl, .json,
.csv, .parquet files) must train identically: the same losses, to the bit. Bad inputs fail with
one clear message before anything is written.
"""

import csv
import json
import logging

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gpt3zh.compat.modelscope import MsDataset
from gpt3zh.config import ConfigError
from gpt3zh.tokenizer import train_char_tokenizer
from gpt3zh.training import train
from gpt3zh.training.data import DataError
from gpt3zh.training.loop.trainer import read_log

POEMS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
]
ROWS = [{"src_txt": POEMS[i % 4][: 5 + (3 * i) % 11], "tgt_txt": POEMS[(i + 1) % 4][:6]} for i in range(12)]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    train_char_tokenizer(POEMS, tmp_path / "tok")
    return tmp_path


def config(root, work="run", **train_section):
    return {
        "model": {"preset": "base", "n_layer": 1, "n_head": 2, "d_model": 16, "max_seq_len": 32,
                  "vocab_size": 96, "dropout": 0.0, "attn_dropout": 0.0},
        "tokenizer": str(root / "tok"),
        "preprocessor": {"sequence_length": 24},
        "train": {"work_dir": str(root / work), "progress_bar": False, "max_steps": 3, "export_formats": [],
                  "dataloader": {"batch_size_per_gpu": 4}, "optimizer": {"lr": 1e-2}, **train_section},
    }


def losses(work_dir):
    return [r["loss"] for r in read_log(work_dir / "train_log.jsonl") if "loss" in r]


def write_files(root):
    paths = {"jsonl": root / "d.jsonl", "json": root / "d.json", "csv": root / "d.csv", "parquet": root / "d.parquet"}
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    paths["json"].write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    with paths["csv"].open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, ["src_txt", "tgt_txt"])
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
    return paths


def test_every_form_of_the_same_rows_trains_identically(root):
    hf = datasets.Dataset.from_list(ROWS)
    forms = {"list": ROWS, "dataset": hf, "msdataset": MsDataset(hf), **write_files(root)}
    results = {}
    for name, data in forms.items():
        out = train(config(root, work=f"run-{name}"), train_dataset=data, eval_dataset=data)
        results[name] = (losses(root / f"run-{name}"), out.eval["loss"])
    reference = results.pop("list")
    assert len(reference[0]) == 3 and all(v == reference for v in results.values()), results
    # file paths as dataset.train / dataset.eval in the config: the same run again
    cfg = config(root, work="run-config")
    cfg["dataset"] = {"train": str(root / "d.jsonl"), "eval": str(root / "d.csv")}
    out = train(cfg)
    assert (losses(root / "run-config"), out.eval["loss"]) == reference


def test_remap_columns_applies_to_in_memory_rows(root):
    hub_form = [{"text1": r["src_txt"], "text2": r["tgt_txt"]} for r in ROWS]
    cfg = config(root, work="remapped")
    cfg["dataset"] = {"remap_columns": {"text1": "src_txt", "text2": "tgt_txt"}}
    train(cfg, train_dataset=datasets.Dataset.from_list(hub_form))
    train(config(root, work="plain"), train_dataset=ROWS)
    assert losses(root / "remapped") == losses(root / "plain")


def test_lambda_lr_is_torchs_rule_per_step_and_per_epoch(root):
    seen = []

    def lr_lambda(i):
        seen.append(i)
        return 1.0 / (i + 1)

    cfg = config(root, max_steps=None, max_epochs=2, lr_scheduler={"type": "LambdaLR"})
    train(cfg, train_dataset=ROWS, lr_lambda=lr_lambda)  # 12 rows / batch 4: 3 steps per epoch
    lrs = [r["lr"] for r in read_log(root / "run" / "train_log.jsonl") if "lr" in r]
    assert lrs == pytest.approx([1e-2 / (s + 1) for s in range(6)], rel=1e-12)
    seen.clear()
    cfg = config(root, work="by_epoch", max_steps=None, max_epochs=2,
                 lr_scheduler={"type": "LambdaLR", "options": {"by_epoch": True}})
    train(cfg, train_dataset=ROWS, lr_lambda=lr_lambda)
    lrs = [r["lr"] for r in read_log(root / "by_epoch" / "train_log.jsonl") if "lr" in r]
    assert lrs == pytest.approx([1e-2] * 3 + [5e-3] * 3, rel=1e-12)
    assert set(seen) == {0, 1}  # the epoch, not the step


SCHEDULE = {"lr_scheduler": {"type": "LambdaLR"}}


@pytest.mark.parametrize(
    "kwargs,cfg_train,message",
    [
        ({"lr_lambda": lambda s: 1 / s}, SCHEDULE,
         r"lr_lambda \(.*<lambda>\) raised ZeroDivisionError at 0: division by zero"),
        ({"lr_lambda": lambda s: "fast"}, SCHEDULE,
         r"lr_lambda \(.*<lambda>\) returned 'fast' at 0; expected a finite number"),
        ({"lr_lambda": lambda s: float("nan")}, SCHEDULE, r"returned nan at 0"),
        ({"lr_lambda": lambda s: -1}, SCHEDULE, r"returned -1 at 0; expected a finite number >= 0"),
        ({}, SCHEDULE, r"LambdaLR takes its schedule from Python: pass lr_lambda="),
        ({"lr_lambda": lambda s: 1.0}, {}, r"lr_lambda= was given but train.lr_scheduler.type is 'noam'"),
        ({"train_dataset": [{"text1": "床前明月光"}]}, {}, r"train_dataset: row 1 has no column 'src_txt'"),
        ({"train_dataset": datasets.Dataset.from_dict({"text1": ["床前"]})}, {},
         r"train_dataset: no column 'src_txt' \(columns: text1\)"),
        ({"train_dataset": [{"src_txt": 3}]}, {}, r"train_dataset: row 1 column 'src_txt' must be a string"),
        ({"eval_dataset": "missing.jsonl"}, {}, r"data file not found: missing.jsonl"),
        ({"train_dataset": None}, {},
         r"dataset.train: no training data given \(a data file, or train_dataset= in gpt3zh.train\)"),
    ],
)
def test_bad_inputs_fail_before_anything_is_written(root, kwargs, cfg_train, message):
    with pytest.raises((ConfigError, DataError, FileNotFoundError), match=message):
        train(config(root, **cfg_train), **{"train_dataset": ROWS, **kwargs})
    assert not (root / "run").exists()


def test_a_data_file_and_a_dataset_for_one_split_is_an_error(root):
    cfg = config(root)
    cfg["dataset"] = {"train": str(write_files(root)["jsonl"])}
    with pytest.raises(ConfigError, match=r"dataset.train=.*d.jsonl and train_dataset= are both given"):
        train(cfg, train_dataset=ROWS)


def test_on_epoch_end_sees_each_epoch_after_its_checkpoint(root):
    calls = []

    def on_epoch_end(trainer, model, epoch):
        ckpt = sorted((trainer.work_dir / "checkpoints").glob("step-*"))
        calls.append((epoch, ckpt[-1].name, model.training))

    train(config(root, max_steps=None, max_epochs=2), train_dataset=ROWS, on_epoch_end=on_epoch_end)
    assert calls == [(1, "step-00000003", True), (2, "step-00000006", True)]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_notes_go_through_logging(root, capsys):
    mixed = ROWS[:6] + [{"src_txt": r["src_txt"]} for r in ROWS[6:]]
    train(config(root, work="stderr"), train_dataset=mixed)
    assert "gpt3zh train: train_dataset: 6 of 12 rows have tgt_txt" in capsys.readouterr().err  # no handler set up
    handler = _Records()
    logger = logging.getLogger("gpt3zh.train")
    saved = logger.handlers[:], logger.propagate
    logger.handlers[:] = [handler]  # the application's own handler: the notes go there instead
    try:
        train(config(root, work="handled"), train_dataset=mixed)
    finally:
        logger.handlers[:], logger.propagate = saved
    assert any("6 of 12 rows have tgt_txt" in r.getMessage() for r in handler.records)
    assert "rows have tgt_txt" not in capsys.readouterr().err
