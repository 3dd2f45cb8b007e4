"""`torchrun -m gpt3zh train` end to end: a 2x2 (dp x tp) run, resumed at 1x2 and at 4x1.

The global batch is kept at 4 rows (batch_size_per_gpu x dp), so every layout reads the same rows
at each step and the losses must agree; the first run's own step 3 is the uninterrupted reference.
"""

import json
import subprocess
import sys

import pytest
import torch

from .launch import torchrun_env

pytestmark = pytest.mark.distributed

TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "红豆生南国，春来发几枝。愿君多采撷，此物最相思。",
    "空山不见人，但闻人语响。返景入深林，复照青苔上。",
    "松下问童子，言师采药去。只在此山中，云深不知处。",
    "鹅鹅鹅，曲项向天歌。白毛浮绿水，红掌拨清波。",
]


def _setup(tmp_path):
    from gpt3zh.tokenizer import train_char_tokenizer

    train_char_tokenizer(TEXTS, tmp_path / "tok")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"src_txt": t}, ensure_ascii=False) + "\n" for t in TEXTS * 2), encoding="utf-8")
    config = {
        "model": {"preset": "base", "n_layer": 2, "n_head": 4, "d_model": 32, "vocab_size": 256, "max_seq_len": 32,
                  "dropout": 0.0, "attn_dropout": 0.0},
        "tokenizer": str(tmp_path / "tok"),
        "dataset": {"train": str(data)},
        "preprocessor": {"sequence_length": 32},
        "train": {"max_steps": 3, "save_interval": 2, "keep_last": 3, "progress_bar": False, "device": "cpu",
                  # a large lr and no warmup: the steps move the weights, so a wrong resume shows
                  "optimizer": {"lr": 1e-2}, "lr_scheduler": {"type": "constant", "warmup_steps": 0},
                  "export_formats": ["gpt3zh", "megatron"]},
        "megatron": {"world_size": 4, "tensor_model_parallel_size": 2, "checkpoint_tensor_model_parallel_size": 4},
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config, ensure_ascii=False))
    return path


def _torchrun(nproc: int, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "gpt3zh", "train", *args]
    return subprocess.run(cmd, check=False, env=torchrun_env(), capture_output=True, text=True, timeout=timeout)


def _losses(work_dir) -> dict[int, float]:
    lines = (work_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_2x2_run_resumes_at_1x2_and_4x1_with_the_same_next_loss(tmp_path):
    from gpt3zh.checkpoint import describe, load_model

    config = _setup(tmp_path)
    first = tmp_path / "run_2x2"
    done = _torchrun(4, str(config), f"train.work_dir={first}", "train.dataloader.batch_size_per_gpu=2")
    assert done.returncode == 0, done.stderr[-4000:]
    step2 = first / "checkpoints" / "step-00000002"
    assert (step2 / "dcp" / ".metadata").is_file()
    reference = _losses(first)
    assert sorted(reference) == [1, 2, 3]
    # the export: the whole model, and 4 Megatron shards (checkpoint_tensor_model_parallel_size)
    assert describe(first / "output_megatron").extra["tp"] == 4
    assert load_model(first / "output").config.n_head == 4
    # a parallel run's checkpoint is a model directory too: its DCP shards, read in one process
    last, exported = load_model(first / "checkpoints" / "step-00000003"), load_model(first / "output")
    assert all(torch.equal(last.state_dict()[k], v) for k, v in exported.state_dict().items())

    for nproc, tp, batch in ((2, 2, 4), (4, 1, 1)):
        work = tmp_path / f"resume_{nproc // tp}x{tp}"
        run = _torchrun(
            nproc, str(config), f"train.work_dir={work}", f"train.resume={step2}",
            f"train.dataloader.batch_size_per_gpu={batch}", f"megatron.world_size={nproc}",
            f"megatron.tensor_model_parallel_size={tp}", "train.export_formats=[gpt3zh]",
        )
        assert run.returncode == 0, run.stderr[-4000:]
        assert abs(_losses(work)[3] - reference[3]) <= 1e-5, (nproc, tp, _losses(work), reference)


@pytest.mark.parametrize(
    "nproc,overrides,message",
    [
        (3, ["megatron.world_size=2"], "world size 3 is not divisible by tensor-parallel size tp=2"),
    ],
)
def test_impossible_layouts_exit_nonzero_with_one_clear_message(tmp_path, nproc, overrides, message):
    config = _setup(tmp_path)
    run = _torchrun(nproc, str(config), f"train.work_dir={tmp_path / 'w'}", *overrides, timeout=90)
    assert run.returncode != 0
    # Every rank finds the same problem before any collective, so none hangs; torchrun stops the
    # others as soon as the first exits, so how many got to print it is a race.
    assert message in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("gpt3zh train: error:")]
    assert errors and all(message in line for line in errors), run.stderr[-3000:]


def test_layout_checks_run_before_any_process_group(tmp_path):
    # The check torchrun's ranks run first (no collective involved), with an 8-rank world.
    from gpt3zh.config import GPTConfig
    from gpt3zh.parallel import ParallelError
    from gpt3zh.training.config import load_config
    from gpt3zh.training.distributed import layout

    path = _setup(tmp_path)
    gpt = GPTConfig(vocab_size=256, n_layer=2, n_head=12, d_model=48, max_seq_len=32)
    with pytest.raises(ParallelError, match="megatron.world_size=8 does not match the launched world size 2"):
        layout(load_config(path, ["megatron.world_size=8"]), 2, gpt)  # tp=2 from the file
    cfg = load_config(path, ["megatron.world_size=8", "megatron.tensor_model_parallel_size=8"])
    with pytest.raises(ParallelError,
                       match=r"n_head=12 is not divisible by tp=8.*tp values that fit this model: \[1, 2, 4\]"):
        layout(cfg, 8, gpt)
