"""The 1.3B card's finetune_poetry.py under `torchrun --nproc_per_node 4`, as the card launches it.

The model directory's configuration.json says megatron world_size 4, tensor_model_parallel_size
2 (as the card tells users to set it for their launch), so the script trains dp 2 x tp 2 on gloo.
It must equal the native gpt3zh.train in one process with the same global batch (16 rows per
data-parallel rank x 2), and write ModelScope's files: one epoch file per tensor-parallel rank and
an output/ model directory of 2 shards.
"""

import json
import subprocess
import sys

import datasets
import pytest
import torch

from conftest import require_shared
from gpt3zh.checkpoint import load_model
from gpt3zh.compat.modelscope import MsDataset
from gpt3zh.training import train
from gpt3zh.training.loop.trainer import read_log
from modelscope_cards import MODEL_1_3B, build_cache, card_scripts, write_datasets

from .launch import torchrun_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _losses(work_dir):
    return [r["loss"] for r in read_log(work_dir / "train_log.jsonl") if "loss" in r]


def _noam_lambda(current_step: int):  # the card's, num_warmup_steps = 100
    current_step += 1
    return min(current_step**(-0.5), current_step * 100**(-1.5))


def test_poetry_card_under_torchrun_dp2_tp2_equals_one_process(tmp_path, monkeypatch):
    require_shared()
    models = build_cache(tmp_path / "cache", world_size=4, tp=2)
    write_datasets(tmp_path)
    (tmp_path / "finetune_poetry.py").write_text(card_scripts()["finetune_poetry"], encoding="utf-8")
    env = torchrun_env({"MODELSCOPE_CACHE": str(tmp_path / "cache"), "GPT3ZH_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "HF_DATASETS_OFFLINE": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "finetune_poetry.py"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]

    work = tmp_path / "gpt3_poetry"
    info = read_log(work / "train_log.jsonl")[0]["info"]
    assert info["steps_per_epoch"] == 2  # 48 rows / (16 per rank x dp 2)
    for rank in (0, 1):  # one file per tensor-parallel rank, bare state dicts (MpuProcessor's)
        epoch = torch.load(work / f"epoch_1_mp_rank_{rank:02d}_model_states.pt", weights_only=True)
        shard = torch.load(work / "output" / "model" / f"mp_rank_{rank:02d}_model_states.pt", weights_only=True)
        assert all(torch.equal(v, shard["module"][k]) for k, v in epoch.items())
    assert not (work / "epoch_1_mp_rank_02_model_states.pt").exists()
    conf = json.loads((work / "output" / "configuration.json").read_text(encoding="utf-8"))
    assert conf["megatron"] == {"world_size": 2, "tensor_model_parallel_size": 2}  # as save_pretrained rewrites it

    # the native API, one process, the same global batch
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dd = MsDataset.load("chinese-poetry-collection")
    train_ds, eval_ds = (dd[s].remap_columns({"text1": "src_txt"}) for s in ("train", "test"))
    cfg = {
        "model": str(models[MODEL_1_3B]), "preprocessor": {"sequence_length": 128},
        "train": {"work_dir": str(tmp_path / "native"), "max_epochs": 1, "progress_bar": False,
                  "dataloader": {"batch_size_per_gpu": 32},
                  "optimizer": {"lr": 3e-4, "options": {"grad_clip": {"max_norm": None}}},
                  "lr_scheduler": {"type": "LambdaLR"}, "bucket_by_length": False},
        "evaluation": {"dataloader": {"batch_size_per_gpu": 8}},
    }
    try:
        result = train(cfg, train_dataset=train_ds, eval_dataset=eval_ds, lr_lambda=_noam_lambda)
    finally:
        torch.set_num_threads(threads)
    ours, native = _losses(work), _losses(tmp_path / "native")
    # fp32 on CPU; vocab-parallel cross entropy and the dp all-reduce sum in another order
    assert len(ours) == 2 and ours == pytest.approx(native, abs=1e-5)
    trained, reference = load_model(work / "output"), load_model(result.output_dir)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], value, rtol=0, atol=1e-6)
