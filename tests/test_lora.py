"""LoRA through peft: training (train.lora), adapter directories, loading base + adapter everywhere,
merging, resume, and the errors for bad input.

The base is a tiny random GPT saved as a gpt3zh model directory with a character tokenizer; the
task is a few classical poems, which the base has never seen.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("peft", reason="peft is in the [lora] extra")

from gpt3zh.checkpoint import (
    CheckpointError,
    convert,
    load_model,
    load_pretrained,
    lora,
    save_model,
)
from gpt3zh.config import ConfigError, GenerationDefaults, GPTConfig
from gpt3zh.model import GPT
from gpt3zh.tokenizer import train_char_tokenizer
from gpt3zh.training import load_config, train

POEMS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
]
TOK = train_char_tokenizer(POEMS)
# init_std 0.1: a random base whose layers matter (at 0.02 the embeddings alone decide the logits)
CONFIG = GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=64, dropout=0.0,
                   attn_dropout=0.0, init_std=0.1)
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(11)
    d = tmp_path_factory.mktemp("base") / "base"
    save_model(GPT(CONFIG), d, tokenizer=TOK, generation=GenerationDefaults(eod_id=TOK.sep_id, top_k=1))
    return d


def write_data(tmp_path):
    data = tmp_path / "poems.jsonl"
    data.write_text("".join(json.dumps({"src_txt": p}, ensure_ascii=False) + "\n" for p in POEMS * 2), encoding="utf-8")
    return data


def run_config(base, tmp_path, work="work", **train_kw) -> dict:
    data = write_data(tmp_path)
    train_section = {"work_dir": str(tmp_path / work), "max_steps": 12, "device": "cpu", "progress_bar": False,
                     "dataloader": {"batch_size_per_gpu": 4}, "lr_scheduler": {"type": "constant", "warmup_steps": 0},
                     "optimizer": {"lr": 2e-2}, "lora": {"r": 4, "alpha": 8}, "eval_interval": 12, **train_kw}
    return {"model": str(base), "dataset": {"train": str(data), "eval": str(data)},
            "preprocessor": {"sequence_length": 32}, "evaluation": {"at_start": True, "ppl_modelscope": False},
            "train": train_section}


def losses(work_dir) -> tuple[dict[int, float], dict[int, float]]:
    records = [json.loads(line) for line in (work_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    train_loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: r["eval"]["loss"] for r in records if "eval" in r}
    return train_loss, evals


# ------------------------------------------------------------------------------------------ training
def test_lora_learns_the_task_and_changes_only_the_adapters(base, tmp_path):
    result = train(run_config(base, tmp_path))
    _, evals = losses(result.work_dir)
    assert evals[12] < evals[0] - 0.5, evals  # the frozen base scores evals[0]; the adapters learn
    # the export is an adapter directory in peft's format that names its base
    out = result.output_dir
    assert out == result.work_dir / "output" and lora.is_adapter_dir(out)
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                               "adapter_base.json", "tokenizer.json"}
    record = json.loads((out / "adapter_base.json").read_text())
    assert record["base"] == str(base.resolve()) and record["config"] == CONFIG.to_dict()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == sorted(TARGETS)
    # the checkpoint keeps the adapters only, and is itself an adapter directory
    step = result.work_dir / "checkpoints" / "step-00000012"
    state = torch.load(step / "state.pt", weights_only=True)
    assert state["model"] and all("lora_" in k for k in state["model"])
    assert lora.is_adapter_dir(step)
    # base + adapter, merged, scores the eval loss the run reported
    from gpt3zh.evaluation import run_eval

    merged = run_eval(str(out), str(tmp_path / "poems.jsonl"), sequence_length=32, ppl_modelscope=False)
    assert merged["loss"] == pytest.approx(evals[12], abs=1e-4)


def test_trainer_steps_move_adapters_only(base, tmp_path):
    from gpt3zh.training.loop import Trainer

    trainer = Trainer(load_config(run_config(base, tmp_path, max_steps=3)))
    trainer.prepare()
    model = trainer.build_model(trainer.gpt_cfg)
    assert "LoRA r=4 on 1 GPU (4,096 trained parameters" in trainer.lora_estimate()  # printed on CUDA
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = trainer.build_optimizer(model)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if "lora_" in n}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    for step in range(3):
        trainer.train_step(model, optimizer, scaler, trainer.micro_batches(step), step, 2e-2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero: the adapter really moved


@pytest.mark.parametrize("base_dtype", ["bf16", "fp16"])
def test_a_half_precision_base_trains_fp32_adapters(base, tmp_path, base_dtype):
    from gpt3zh.training.loop import Trainer

    trainer = Trainer(load_config(run_config(base, tmp_path, lora={"r": 4, "base_dtype": base_dtype})))
    trainer.prepare()
    model = trainer.build_model(trainer.gpt_cfg)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    half = torch.bfloat16 if base_dtype == "bf16" else torch.float16
    assert all(d == (torch.float32 if "lora_" in n else half) for n, d in dtypes.items())
    optimizer = trainer.build_optimizer(model)
    assert type(optimizer) is torch.optim.AdamW  # not the bf16-parameter AdamW: the adapters are fp32
    loss, _, _ = trainer.train_step(model.train(), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                    trainer.micro_batches(0))
    assert loss > 0 and torch.isfinite(torch.tensor(loss))


def test_resume_equals_an_uninterrupted_run(base, tmp_path):
    whole = train(run_config(base, tmp_path, "whole", max_steps=6, save_interval=3))
    first = run_config(base, tmp_path, "parts", max_steps=6, save_interval=3)
    train(first, "train.max_steps=3")
    resumed = train(first, "train.resume=true")
    from safetensors.torch import load_file

    assert losses(resumed.work_dir)[0] == losses(whole.work_dir)[0]  # every step's loss, bitwise
    a, b = (load_file(r.output_dir / "adapter_model.safetensors") for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ adapters
def lora_model(seed: int = 3) -> GPT:
    """The base plus an adapter whose B is not zero (so it changes the logits)."""
    torch.manual_seed(seed)
    model = GPT(CONFIG).eval()
    lora.add_lora(model, lora.peft_config(4, 8, 0.0, TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def test_merged_logits_equal_base_plus_adapter_and_peft_reads_the_format(tmp_path):
    import peft

    model = lora_model()
    idx = torch.tensor([TOK.encode(POEMS[0])])
    with torch.no_grad():
        adapted = model(idx)
        merged = lora.merge_lora(copy.deepcopy(model))(idx)
    assert type(merged) is torch.Tensor and not lora.has_lora(lora.merge_lora(copy.deepcopy(model)))
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    # peft's own loader reads the saved directory and computes the same logits
    torch.manual_seed(3)
    plain = GPT(CONFIG).eval()
    base_dir = tmp_path / "base"
    save_model(plain, base_dir, tokenizer=TOK)
    record = lora.describe_base(base_dir, CONFIG, GenerationDefaults(), plain)
    lora.save_adapter(model, tmp_path / "adapter", lora.peft_config(4, 8, 0.0, TARGETS), record, tokenizer=TOK)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx), adapted, atol=1e-5, rtol=0)
    # and gpt3zh's loader: base + adapter merged, a plain GPT
    loaded = load_pretrained(tmp_path / "adapter")
    assert type(loaded.model) is GPT and loaded.adapter == tmp_path / "adapter" and loaded.base == base_dir
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), adapted, atol=1e-5, rtol=0)


def test_save_load_generate_round_trip_everywhere(base, tmp_path, capsys):
    from gpt3zh.cli import main
    from gpt3zh.generation import generate
    from gpt3zh.pipelines import pipeline

    result = train(run_config(base, tmp_path))
    adapter = result.output_dir
    prompt = TOK.encode("床前")
    # the adapter, unmerged, as the trainer's model had it
    unmerged = load_model(base)
    lora.apply_adapter(unmerged, adapter, lora.read_base(adapter))
    want = generate(unmerged.eval(), [prompt], max_new_tokens=10)[0]
    assert generate(load_model(adapter), [prompt], max_new_tokens=10)[0] == want
    text = pipeline("text-generation", model=str(adapter))("床前", max_new_tokens=10, do_sample=False)["text"]
    assert text == TOK.decode(want)
    assert main(["generate", "--model", str(adapter), "--max-new-tokens", "10", "--no-do-sample", "床前"]) == 0
    assert capsys.readouterr().out.strip() == TOK.decode(want)
    # convert --merge-lora writes a plain model in any format; without the flag an adapter is refused
    assert main(["convert", str(adapter), str(tmp_path / "hf"), "--to", "hf", "--merge-lora"]) == 0
    assert generate(load_model(tmp_path / "hf"), [prompt], max_new_tokens=10)[0] == want
    assert main(["convert", str(base), str(tmp_path / "ms"), "--to", "modelscope", "--adapter", str(adapter),
                 "--merge-lora"]) == 0
    assert generate(load_model(tmp_path / "ms"), [prompt], max_new_tokens=10)[0] == want
    capsys.readouterr()
    assert main(["convert", str(adapter), str(tmp_path / "no"), "--to", "gpt3zh"]) == 2
    assert "is a LoRA adapter: pass merge_lora=True (--merge-lora)" in capsys.readouterr().err
    # info describes the base and names the adapter; an adapter is not a base to train a LoRA on
    assert main(["info", str(adapter)]) == 0
    assert f"lora_adapter {adapter}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="is a LoRA adapter: train.lora needs a plain base"):
        train(run_config(adapter, tmp_path, "again"))
    # the server: --model BASE --adapter DIR
    import argparse

    from gpt3zh.cli import _serve_args

    parser = argparse.ArgumentParser()
    _serve_args(parser)
    args = parser.parse_args(["--model", str(base), "--adapter", str(adapter)])
    assert args.adapter == str(adapter)


# ------------------------------------------------------------------------------------------ bad input
def test_an_adapter_for_another_base_is_refused(base, tmp_path):
    result = train(run_config(base, tmp_path))
    adapter = result.output_dir
    wider = tmp_path / "wider"
    save_model(GPT(CONFIG.replace(d_model=64)), wider, tokenizer=TOK)
    with pytest.raises(CheckpointError,
                       match="another base model: it was trained on d_model=32, this base has d_model=64"):
        load_pretrained(wider, adapter=adapter)
    # a peft adapter without gpt3zh's record: the shapes name the mismatch
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((adapter / name).read_bytes())
    with pytest.raises(CheckpointError, match=r"lora_A.weight has shape \(4, 32\), this base's layer needs \(4, 64\)"):
        load_pretrained(wider, adapter=bare)
    with pytest.raises(CheckpointError, match="has no adapter_base.json"):
        load_pretrained(bare)
    # the same shape, other weights: the fingerprint
    torch.manual_seed(99)
    other = tmp_path / "other"
    save_model(GPT(CONFIG), other, tokenizer=TOK)
    with pytest.raises(CheckpointError, match="not the ones this adapter was trained on"):
        load_pretrained(other, adapter=adapter)
    # converting the base to bf16 keeps it the same base
    convert(base, tmp_path / "base16", dtype="bfloat16")
    assert load_pretrained(tmp_path / "base16", adapter=adapter).model.tok_emb.weight.dtype == torch.bfloat16


def test_a_missing_base_is_a_clear_error(base, tmp_path):
    result = train(run_config(base, tmp_path))
    moved = tmp_path / "moved"
    result.output_dir.rename(moved)
    record = json.loads((moved / "adapter_base.json").read_text())
    record["base"] = str(tmp_path / "gone")
    (moved / "adapter_base.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"its base model .*gone.* does not exist; .*--model BASE --adapter"):
        load_pretrained(moved)
    assert load_pretrained(base, adapter=moved).adapter == moved  # given explicitly, it loads


@pytest.mark.parametrize(("override", "match"), [
    ("train.lora.alpha=32", "train.lora.alpha is set but train.lora.r is 0"),
    ("train.lora.r=-1", "train.lora.r must be >= 0"),
    ("train.lora.dropout=1.5", "dropout in \\[0, 1\\)"),
    ("megatron.tensor_model_parallel_size=2", "tensor parallelism .* is not supported"),
    ("train.param_dtype=bf16", "train.lora.base_dtype"),
])
def test_bad_lora_configs_fail_before_any_work(base, tmp_path, override, match):
    cfg = run_config(base, tmp_path)
    if override.startswith("train.lora.alpha"):
        cfg["train"].pop("lora")
    if override.startswith("train.param_dtype"):
        cfg["train"]["precision"] = "bf16"
    if override.startswith("megatron"):
        cfg["megatron"] = {"world_size": 2}
    with pytest.raises(ConfigError, match=match):
        load_config(cfg, [override])
    assert not (tmp_path / "work").exists()


def test_an_unknown_target_layer_is_named(base, tmp_path):
    with pytest.raises(CheckpointError, match="'attn.q' names no linear layer of this model"):
        train(run_config(base, tmp_path, lora={"r": 4, "target_modules": ["attn.q"]}))


def test_resuming_a_lora_checkpoint_on_another_base_is_refused(base, tmp_path):
    first = run_config(base, tmp_path, max_steps=4, save_interval=2)
    train(first, "train.max_steps=2")
    torch.manual_seed(5)
    other = tmp_path / "other"
    save_model(GPT(CONFIG), other, tokenizer=TOK)
    first["model"] = str(other)
    with pytest.raises(ValueError, match="trained on other base weights"):
        train(first, "train.resume=true")
    first["model"] = str(base)
    first["train"]["lora"] = {"r": 0}
    with pytest.raises(ValueError, match="holds LoRA adapters; resume it with the train.lora"):
        train(first, "train.resume=true")


# ------------------------------------------------------------------------------------------ plan
def test_plan_lora_counts_the_adapters_peft_adds_and_fits_13b_and_30b(capsys):
    from gpt3zh.cli import main
    from gpt3zh.planning import GiB, plan_lora

    model = GPT(CONFIG)
    lora.add_lora(model, lora.peft_config(4, 8, 0.0, TARGETS))
    trained = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    plan = plan_lora(CONFIG, r=4, base_dtype=torch.float32)
    assert plan.adapter_params == trained and plan.base_params == CONFIG.num_params
    assert plan.optimizer >= 8 * trained and plan.grads == plan.adapters == 4 * trained
    assert main(["plan", "--preset", "13B", "--lora", "--json"]) == 0
    p13 = json.loads(capsys.readouterr().out)
    assert p13["fits"] and 23 * GiB < p13["base"] < 25 * GiB  # 13B in bf16, no gradients or moments for it
    assert main(["plan", "--preset", "30B", "--lora", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["fits"]  # 2048 tokens of activations on top of 56 GiB
    assert main(["plan", "--preset", "30B", "--lora", "--activation-checkpointing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"]
    assert main(["plan", "--preset", "13B", "--lora", "--tp", "2"]) == 2
    assert "LoRA with tensor parallelism is not supported" in capsys.readouterr().err
