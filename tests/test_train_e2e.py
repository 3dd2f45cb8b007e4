"""Training end to end: real config files, real tokenizers, real data files, through `cli.main`."""

import json
import math
import os
import shutil

import pytest
import torch

from conftest import ROOT, require_shared
from gpt3zh.cli import main
from gpt3zh.config import ConfigError
from gpt3zh.tokenizer import train_char_tokenizer
from gpt3zh.training import train
from gpt3zh.training.loop.trainer import TrainingError, read_log

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


# ------------------------------------------------------------------------------------- reliability
def _files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_second_run_in_a_used_work_dir_is_refused_unless_overwrite(char_setup, capsys):
    root = char_setup
    first = train(char_config(root, max_steps=4, save_interval=2))
    before = _files(root / "run" / "checkpoints") | {"output": _files(root / "run" / "output")}
    with pytest.raises(ConfigError, match=r"train.work_dir .*run already holds a run \(checkpoints, train_log.jsonl"):
        train(char_config(root, max_steps=2, save_interval=1, seed=9))
    assert _files(root / "run" / "checkpoints") | {"output": _files(root / "run" / "output")} == before
    second = train(char_config(root, max_steps=2, save_interval=1, seed=9, overwrite=True))
    assert "removed the previous run" in capsys.readouterr().err
    names = sorted(p.name for p in (root / "run" / "checkpoints").iterdir())
    assert names == ["best.json", "step-00000001", "step-00000002"]  # nothing of the first run's
    assert json.loads((root / "run" / "checkpoints" / "best.json").read_text())["step"] <= 2
    assert [s for s, *_ in _losses(root / "run")] == [1, 2] and second.train_loss != first.train_loss
    with pytest.raises(TrainingError, match="step-00000002 is at step 2, past this run's last step 1"):
        train(char_config(root, max_steps=1, resume=True))
    assert second.step == 2


def test_resume_falls_back_past_an_unreadable_checkpoint_and_checks_the_architecture(char_setup, capsys):
    root = char_setup
    train(char_config(root, max_steps=4, save_interval=2, keep_last=3))
    ckpt = root / "run" / "checkpoints"
    good = torch.load(ckpt / "step-00000004" / "state.pt", weights_only=True)["model"]
    (ckpt / "step-00000004" / "state.pt").write_bytes((ckpt / "step-00000004" / "state.pt").read_bytes()[:50_000])
    with pytest.raises(TrainingError, match=r"step-00000002/state.pt was saved for another model architecture "
                                            r"\(missing keys \(12\): blocks.2"):
        train(char_config(root, max_steps=4, save_interval=2, keep_last=3, resume=True) |
              {"model": {**char_config(root)["model"], "n_layer": 3}})
    with pytest.raises(TrainingError, match=r"step-00000002 is at step 2, past this run's last step 1"):
        train(char_config(root, max_steps=1, resume=True))
    capsys.readouterr()
    result = train(char_config(root, max_steps=4, save_interval=2, keep_last=3, resume=True))
    err = capsys.readouterr().err
    assert "step-00000004/state.pt cannot be read; falling back" in err and "resuming from" in err
    assert result.step == 4
    again = torch.load(ckpt / "step-00000004" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(again[k], v) for k, v in good.items())  # the same run, redone exactly
    for p in ckpt.glob("step-*/state.pt"):
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match=r"no checkpoint under .*checkpoints can be read \(step-00000004: "):
        train(char_config(root, max_steps=4, resume=True))


def test_resume_true_with_no_checkpoint_yet_starts_at_step_0(char_setup, capsys):
    root = char_setup
    result = train(char_config(root, max_steps=2, resume=True))
    assert result.step == 2 and "no checkpoint in" in capsys.readouterr().err


def test_a_diverging_run_stops_before_the_bad_update_and_exports_nothing(char_setup):
    root = char_setup
    with pytest.raises(TrainingError, match=r"the loss is nan at step 2 .*the last checkpoint is .*step-00000001"):
        train(char_config(root, max_steps=4, save_interval=1, optimizer={"lr": 1e30}))  # finite, absurd
    assert not (root / "run" / "output").exists()
    assert sorted(p.name for p in (root / "run" / "checkpoints").glob("step-*")) == ["step-00000001"]


def test_a_short_run_still_evaluates_at_its_last_step(char_setup):
    root = char_setup
    result = train(char_config(root, max_steps=2, eval_interval=50, save_interval=50))
    evals = [r["step"] for r in read_log(root / "run" / "train_log.jsonl") if "eval" in r]
    assert evals == [2] and "ppl" in result.eval


def test_mixed_rows_train_per_row(char_setup, capsys):
    root = char_setup
    rows = [{"src_txt": p[:5]} if i % 2 else {"src_txt": p[:5], "tgt_txt": p[5:12]} for i, p in enumerate(POEMS * 4)]
    (root / "mixed.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = char_config(root, max_steps=1)
    cfg["dataset"] = {"train": str(root / "mixed.jsonl")}
    train(cfg)
    assert "10 of 20 rows have tgt_txt" in capsys.readouterr().err
    info = next(r["info"] for r in read_log(root / "run" / "train_log.jsonl") if "info" in r)
    assert info["mode"] == "mixed" and info["rows_with_target"] == 10
    assert info["trained_tokens"] == 10 * 8 + 10 * 5  # 7 target chars + <sep>; 5 src chars + <sep> less the first


def test_a_step_checkpoint_is_a_model_directory(char_setup, tmp_path, capsys):
    from gpt3zh.checkpoint import describe, load_model
    from gpt3zh.tokenizer import load_tokenizer

    root = char_setup
    train(char_config(root, max_steps=2, save_interval=1, keep_last=2))
    step1 = root / "run" / "checkpoints" / "step-00000001"
    state = torch.load(step1 / "state.pt", weights_only=True)["model"]
    model = load_model(step1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert describe(step1).format == "train-checkpoint" and describe(step1).extra["step"] == 1
    assert describe(step1).generation.eod_id == load_tokenizer(step1).sep_id
    assert main(["export", str(step1), str(tmp_path / "exp")]) == 0
    assert "wrote" in capsys.readouterr().out
    exported = load_model(tmp_path / "exp")
    assert describe(tmp_path / "exp").format == "gpt3zh" and load_tokenizer(tmp_path / "exp").vocab_size > 0
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in state.items())
    assert main(["convert", str(step1), str(tmp_path / "ms"), "--to", "modelscope"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(step1), "--data", str(root / "eval.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    # a checkpoint written before config.json existed: read through meta.json
    legacy = tmp_path / "legacy"
    shutil.copytree(step1, legacy)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (legacy / name).unlink()
    assert describe(legacy).config == model.config
    assert all(torch.equal(load_model(legacy).state_dict()[k], v) for k, v in state.items())


def test_eval_of_empty_rows_is_clean(char_setup, tmp_path, capsys):
    root = char_setup
    (tmp_path / "empty_first.jsonl").write_text('{"src_txt": ""}\n{"src_txt": ""}\n{"src_txt": "床前明月光"}\n')
    cfg = char_config(root, max_steps=1)
    cfg["dataset"]["eval"] = str(tmp_path / "empty_first.jsonl")
    cfg["evaluation"] = {"ppl_modelscope": False, "dataloader": {"batch_size_per_gpu": 2}}
    assert train(cfg).eval["tokens"] == 5  # the trainer's eval: its first batch holds only empty rows
    out = str(root / "run" / "output")
    for extra in ([], ["--no-ppl-modelscope"]):  # batch 1 holds only empty rows: once a crash
        assert main(["eval", "--model", out, "--data", str(tmp_path / "empty_first.jsonl"), "--batch-size", "2",
                     "--json", *extra]) == 0
        result = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
        assert result["tokens"] == 5  # 4 characters after the first, and <sep>
    (tmp_path / "empty.jsonl").write_text('{"src_txt": ""}\n{"src_txt": ""}\n')
    assert main(["eval", "--model", out, "--data", str(tmp_path / "empty.jsonl"), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "empty.jsonl: no token to score" in captured.err


def test_progress_bars_only_on_a_terminal_or_when_asked(char_setup, capsys):
    root = char_setup
    cfg = char_config(root, max_steps=2)
    cfg["train"]["progress_bar"] = "auto"
    train(cfg)  # capsys's stderr is not a terminal
    assert "\r" not in capsys.readouterr().err
    cfg["train"].update(progress_bar=True, work_dir=str(root / "run2"))
    train(cfg)
    err = capsys.readouterr().err
    assert "tokenizing" in err and "2/2" in err
    assert main(["eval", "--model", str(root / "run2" / "output"), "--data", str(root / "eval.jsonl")]) == 0
    assert "\r" not in capsys.readouterr().err
    assert main(["eval", "--model", str(root / "run2" / "output"), "--data", str(root / "eval.jsonl"),
                 "--progress"]) == 0
    assert "ppl" in capsys.readouterr().err
