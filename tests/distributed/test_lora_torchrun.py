"""LoRA under `torchrun -m gpt3zh train`: data parallel (FSDP2 over a frozen base with fp32 adapters)
equals one process, resumes from its own checkpoint, and exports an adapter directory; tensor
parallelism is refused before any process group starts.

The global batch is 4 rows in every layout (batch_size_per_gpu x dp), so each step reads the
same rows and the losses must agree with the one-process run.
"""

import json
import subprocess
import sys

import pytest
import torch

from .launch import torchrun_env

pytestmark = pytest.mark.distributed
pytest.importorskip("peft", reason="peft is in the [lora] extra")

TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
]


def _setup(tmp_path):
    from gpt3zh.checkpoint import save_model
    from gpt3zh.config import GPTConfig
    from gpt3zh.model import GPT
    from gpt3zh.tokenizer import train_char_tokenizer

    tok = train_char_tokenizer(TEXTS)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=32, dropout=0.0,
                    attn_dropout=0.0, init_std=0.1)
    save_model(GPT(cfg), tmp_path / "base", tokenizer=tok)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"src_txt": t}, ensure_ascii=False) + "\n" for t in TEXTS * 2), encoding="utf-8")
    config = {
        "model": str(tmp_path / "base"),
        "dataset": {"train": str(data)},
        "preprocessor": {"sequence_length": 32},
        "train": {"max_steps": 3, "save_interval": 2, "keep_last": 3, "progress_bar": False, "device": "cpu",
                  "optimizer": {"lr": 2e-2}, "lr_scheduler": {"type": "constant", "warmup_steps": 0},
                  "lora": {"r": 4, "alpha": 8}, "export_formats": ["gpt3zh", "hf"]},
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config, ensure_ascii=False))
    return path


def _torchrun(nproc: int, *args: str, timeout: float = 200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "gpt3zh", "train", *args]
    return subprocess.run(cmd, check=False, env=torchrun_env(), capture_output=True, text=True, timeout=timeout)


def _losses(work_dir) -> dict[int, float]:
    lines = (work_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_lora_data_parallel_equals_one_process_and_resumes(tmp_path):
    from gpt3zh.checkpoint import load_model, lora
    from gpt3zh.training import train

    config = _setup(tmp_path)
    one = train(str(config), f"train.work_dir={tmp_path / 'one'}", "train.dataloader.batch_size_per_gpu=4")
    reference = _losses(one.work_dir)
    dp = tmp_path / "dp"
    run = _torchrun(2, str(config), f"train.work_dir={dp}", "train.dataloader.batch_size_per_gpu=2",
                    "megatron.world_size=2")
    assert run.returncode == 0, run.stderr[-4000:]
    got = _losses(dp)
    assert sorted(got) == [1, 2, 3] and all(abs(got[s] - reference[s]) <= 1e-5 for s in got), (got, reference)
    # the export: the adapter directory, and base + adapter merged in the other format
    assert lora.is_adapter_dir(dp / "output")
    idx = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a, b, c = (load_model(p)(idx) for p in (dp / "output", dp / "output_hf", one.output_dir))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-4, rtol=0)  # two processes' reductions vs one: float sums
    # the DCP checkpoint holds the adapters only, and is an adapter directory too
    step2 = dp / "checkpoints" / "step-00000002"
    assert lora.is_adapter_dir(step2) and (step2 / "dcp" / ".metadata").is_file()
    resumed = tmp_path / "resumed"
    run = _torchrun(2, str(config), f"train.work_dir={resumed}", f"train.resume={step2}",
                    "train.dataloader.batch_size_per_gpu=2", "megatron.world_size=2", "train.export_formats=[gpt3zh]")
    assert run.returncode == 0, run.stderr[-4000:]
    assert abs(_losses(resumed)[3] - got[3]) <= 1e-6, (_losses(resumed), got)


def test_lora_with_tensor_parallelism_is_refused_before_any_work(tmp_path):
    config = _setup(tmp_path)
    run = _torchrun(2, str(config), f"train.work_dir={tmp_path / 'w'}", "megatron.world_size=2",
                    "megatron.tensor_model_parallel_size=2", timeout=90)
    assert run.returncode != 0
    assert "train.lora with tensor parallelism" in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "w").exists()
