"""Training end to end: real config files, real tokenizers, real data files, through `cli.main`."""

import json
import math
import os
import shutil

import pytest
import torch

from conftest import ROOT, require_shared
from gpt3zh.cli import main
from gpt3zh.tokenizer import train_char_tokenizer
from gpt3zh.training import train
from gpt3zh.training.loop.trainer import read_log

POEMS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "红豆生南国，春来发几枝。愿君多采撷，此物最相思。",
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: OpenMP hand-offs cost more than they give on a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture
def char_setup(tmp_path):
    """A char tokenizer and small continuation / prompt->target files of varied lengths."""
    train_char_tokenizer(POEMS + ["问答：？"], tmp_path / "tok")
    rows = [{"src_txt": POEMS[i % 5][: 6 + (7 * i) % 19]} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"src_txt": p}, ensure_ascii=False) + "\n" for p in POEMS))
    return tmp_path


def char_config(root, **train):
    return {
        "model": {"preset": "base", "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 32,
                  "vocab_size": 128, "dropout": 0.1, "attn_dropout": 0.1},
        "tokenizer": str(root / "tok"),
        "dataset": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl")},
        "preprocessor": {"sequence_length": 24},
        "train": {"work_dir": str(root / "run"), "progress_bar": False, "seed": 3,
                  "dataloader": {"batch_size_per_gpu": 8}, "gradient_accumulation_steps": 2,
                  "optimizer": {"lr": 3e-3}, "lr_scheduler": {"type": "cosine", "warmup_steps": 2},
                  **train},
    }


def _losses(work_dir, first_step=1):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_log(work_dir / "train_log.jsonl")
            if "loss" in r and r["step"] >= first_step]


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(char_setup):
    # 40 rows, batch 8, accumulation 2: 3 optimizer steps per epoch, so step 4 is inside epoch 2;
    # dropout is on, so the RNG state has to come back too.
    root = char_setup
    full = char_config(root, max_steps=8, save_interval=4, eval_interval=4, keep_last=5)
    result = train(full)
    assert result.step == 8
    ckpt = root / "run" / "checkpoints" / "step-00000004"
    assert (ckpt / "state.pt").is_file()
    resumed = char_config(root, max_steps=8, save_interval=4, eval_interval=4, work_dir=str(root / "resumed"),
                          resume=str(ckpt))
    train(resumed)
    a, b = _losses(root / "run", 5), _losses(root / "resumed", 5)
    assert [s for s, *_ in b] == [5, 6, 7, 8]
    assert a == b  # exact float equality: the same computation, not merely close
    sa = torch.load(root / "run" / "checkpoints" / "step-00000008" / "state.pt", weights_only=True)
    sb = torch.load(root / "resumed" / "checkpoints" / "step-00000008" / "state.pt", weights_only=True)
    for name, value in sa["model"].items():
        assert torch.equal(value, sb["model"][name]), name
    # an interrupted run in the same work_dir: resume=true picks its latest checkpoint
    shutil.rmtree(root / "run" / "checkpoints" / "step-00000008")
    again = train(char_config(root, max_steps=8, save_interval=4, eval_interval=4, keep_last=5, resume=True))
    assert again.step == 8
    assert [s for s, *_ in _losses(root / "run")] == list(range(1, 9))  # log rewritten after step 4
    assert _losses(root / "run", 5) == a


def test_bad_inputs_fail_before_training(char_setup, tmp_path, capsys):
    root = char_setup
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps(char_config(root, max_steps=2)))
    run_dir = root / "run"

    def fails(*overrides, match):
        assert main(["train", str(cfg_path), *overrides]) == 2
        err = capsys.readouterr().err
        assert match in err, err
        assert not (run_dir / "checkpoints").exists()  # nothing was trained

    fails("preprocessor.sequence_length=64",
          match="preprocessor.sequence_length=64 exceeds the model's context (max_seq_len=32)")
    fails("train.optimizer.learning_rate=1", match="unknown config key 'train.optimizer.learning_rate'")
    (root / "empty.jsonl").write_text("")
    fails(f"dataset.train={root / 'empty.jsonl'}", match="empty.jsonl: no rows")
    (root / "bad.jsonl").write_text('{"src_txt": "床前明月光"}\n{"src_txt": "疑是\n')
    fails(f"dataset.train={root / 'bad.jsonl'}", match="bad.jsonl line 2: malformed JSON")
    (root / "cols.jsonl").write_text('{"text1": "床前明月光"}\n')
    fails(f"dataset.train={root / 'cols.jsonl'}", match="row 1 has no column 'src_txt' (columns: text1)")
    fails(f"dataset.eval={root / 'cols.jsonl'}", match="row 1 has no column 'src_txt'")
    # the same file with remap_columns trains
    assert main(["train", str(cfg_path), f"dataset.train={root / 'cols.jsonl'}", "dataset.eval=null",
                 "dataset.remap_columns.text1=src_txt", "train.max_steps=1"]) == 0


@pytest.mark.slow
def test_poetry_example_trains_resumes_and_evaluates(tmp_path, capsys):
    """`gpt3zh train examples/poetry.yaml` (smaller model and data file), resume, then `gpt3zh eval`."""
    require_shared()
    work = tmp_path / "poetry"
    small = ["model.d_model=32", "model.n_layer=1", "dataset.train=../shared/data/poetry/sample.jsonl",
             "train.dataloader.batch_size_per_gpu=4", "evaluation.max_examples=16",
             f"train.work_dir={work}", "train.progress_bar=false",
             "train.save_interval=10", "train.eval_interval=10"]
    cwd = os.getcwd()
    os.chdir(ROOT)  # the example's paths are relative to the repository root
    try:
        assert main(["train", "examples/poetry.yaml", "train.max_steps=20", *small]) == 0
        first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert first["step"] == 20 and math.isfinite(first["train_loss"])
        assert list((work / "tb").glob("events.out.tfevents.*"))
        assert (work / "checkpoints" / "step-00000020" / "state.pt").is_file()
        assert (work / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
        assert (work / "output" / "config.json").is_file() and (work / "output" / "tokenizer.json").is_file()

        assert main(["train", "examples/poetry.yaml", "train.max_steps=30", "train.resume=true", *small]) == 0
        second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert second["step"] == 30
        steps = [r["step"] for r in read_log(work / "train_log.jsonl") if "loss" in r]
        assert steps == list(range(1, 31))
        assert (work / "checkpoints" / "step-00000030").is_dir()

        # the CLI's eval of the exported model reproduces the trainer's last eval exactly
        assert main(["eval", "--model", str(work / "output"), "--data", "../shared/data/poetry/test.jsonl",
                     "--sequence-length", "128", "--limit", "16", "--batch-size", "64", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
    finally:
        os.chdir(cwd)
    for key in ("loss", "ppl", "tokens", "chars", "ppl_modelscope"):
        assert key in out
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]))
    last_eval = [r["eval"] for r in read_log(work / "train_log.jsonl") if "eval" in r][-1]
    assert out["tokens"] == last_eval["tokens"]
    assert out["loss"] == pytest.approx(last_eval["loss"], rel=1e-5)  # fp32 sums in another order


def test_eval_cli_scores_generation_on_prompt_data(char_setup, tmp_path, capsys):
    root = char_setup
    train(char_config(root, max_steps=2, export_formats=["gpt3zh", "modelscope"]))
    assert (root / "run" / "output_modelscope").is_dir()
    qa = [{"src_txt": "床前明月光", "tgt_txt": "疑是地上霜"}, {"src_txt": "白日依山尽", "tgt_txt": "黄河入海流"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in qa))
    assert main(["eval", "--model", str(root / "run" / "output"), "--data", str(tmp_path / "qa.jsonl"),
                 "--metric", "rouge", "--metric", "bleu", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "prompt" and out["chars"] == 10 and out["tokens"] == 12  # 5 chars + <sep>, twice
    assert 0.0 <= out["rouge_l"] <= 1.0 and 0.0 <= out["bleu4"] <= 1.0 and len(out["examples"]) == 2
    assert main(["eval", "--model", str(root / "run" / "output"), "--data", str(root / "eval.jsonl"),
                 "--metric", "rouge"]) == 2
    assert "needs prompt->target data" in capsys.readouterr().err
