"""gpt3zh.compat.modelscope: the model cards' scripts, with only their imports changed, on gpt3zh.

The scripts come from shared/spec (see tests/modelscope_cards.py) and run as files (runpy, in a
work directory holding the hub datasets' names as local folders); the `damo/...` ids resolve
through MODELSCOPE_CACHE to tiny models in ModelScope's layout. Each run must equal the native
gpt3zh.train with the same settings spelled out (the same losses, to the bit), and leave in the
work_dir what ModelScope leaves. Sockets are refused: nothing may reach the network.
"""

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

import gpt3zh
from conftest import require_shared
from gpt3zh.checkpoint import load_model
from gpt3zh.compat.modelscope import (
    ConfigDict,
    MsDataset,
    Tasks,
    Trainers,
    build_trainer,
    pipeline,
    read_config,
    snapshot_download,
)
from gpt3zh.config import ConfigError
from gpt3zh.generation import generate
from gpt3zh.hub import ModelNotFoundError
from gpt3zh.pipelines import pipeline as gpt3zh_pipeline
from gpt3zh.tokenizer import load_tokenizer
from gpt3zh.training import train
from gpt3zh.training.data import DataError
from gpt3zh.training.loop.trainer import read_log
from modelscope_cards import (
    BASE_PIPELINE,
    BASE_POETRY,
    MODEL_1_3B,
    MODEL_BASE,
    TOKENS_TO_GENERATE,
    build_cache,
    card_scripts,
    check_base_script,
    write_datasets,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    require_shared()
    root = tmp_path_factory.mktemp("modelscope-cache")
    return root, build_cache(root)


@pytest.fixture
def card(tmp_path, monkeypatch, cache):
    """A work directory with the hub datasets as local folders; ids resolve in the tiny cache."""
    def refuse(*args, **kwargs):
        raise OSError("test_compat_modelscope: network access is not allowed in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache[0]))
    monkeypatch.setenv("GPT3ZH_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine
    write_datasets(tmp_path)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    torch.set_num_threads(n)


def run_script(root, name, code):
    path = root / f"{name}.py"
    path.write_text(code, encoding="utf-8")
    return runpy.run_path(str(path), run_name="__main__")


def losses(work_dir):
    return [r["loss"] for r in read_log(work_dir / "train_log.jsonl") if "loss" in r]


def evals(work_dir):
    return [r["eval"] for r in read_log(work_dir / "train_log.jsonl") if "eval" in r]


def noam(warmup):
    def noam_lambda(current_step: int):
        current_step += 1
        return min(current_step**(-0.5), current_step * warmup**(-1.5))

    return noam_lambda


def native(model_dir, work_dir, lr, batch, eval_batch, metrics=("ppl",), sequence_length=128, max_new_tokens=None):
    """The cards' settings as a gpt3zh config, written out (ModelScope's defaults where they differ)."""
    return {
        "model": str(model_dir),
        "preprocessor": {"sequence_length": sequence_length},
        "train": {"work_dir": str(work_dir), "max_epochs": 1, "seed": 42, "progress_bar": False,
                  "dataloader": {"batch_size_per_gpu": batch},
                  "optimizer": {"type": "AdamW", "lr": lr, "options": {"grad_clip": {"max_norm": None}}},
                  "lr_scheduler": {"type": "LambdaLR", "options": {"by_epoch": False}},
                  "bucket_by_length": False, "export_formats": []},
        "evaluation": {"metrics": list(metrics), "dataloader": {"batch_size_per_gpu": eval_batch},
                       **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})},
    }


def same_weights(a, b):
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# ------------------------------------------------------------------------------ the scripts as is
def test_the_names_import_without_torch_or_datasets():
    code = ("import sys; from gpt3zh.compat.modelscope import Metrics, Tasks, Trainers; "
            "assert (Tasks.text_generation, Trainers.gpt3_trainer) == ('text-generation', 'nlp-gpt3-trainer'); "
            "print(sorted(m for m in ('torch', 'datasets', 'tokenizers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(gpt3zh.__file__).parents[1])}  # this checkout's package
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_the_scripts_are_the_cards_own():
    require_shared()
    scripts = card_scripts()
    for code in scripts.values():
        assert "modelscope." not in code and "from gpt3zh.compat.modelscope import" in code
    assert "max_epochs = 1\n" in scripts["finetune_poetry"] and "max_epochs = 1\n" in scripts["finetune_dureader"]
    check_base_script(BASE_POETRY, "# 基于modelscope中文gpt3底座二次开发得到诗词生成模型代码", "trainer.train()")
    check_base_script(BASE_PIPELINE, "from modelscope.pipelines import pipeline", "print(result_zh['text'])")


@pytest.mark.slow
def test_poetry_card_trains_as_the_native_api_and_leaves_modelscopes_files(card, cache):
    run_script(card, "finetune_poetry", card_scripts()["finetune_poetry"])
    work = card / "gpt3_poetry"
    # ModelScope's files: the epoch's Megatron weights, and output/ as a model directory
    epoch = torch.load(work / "epoch_1_mp_rank_00_model_states.pt", weights_only=True)
    shard = torch.load(work / "output" / "model" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert epoch.keys() == shard.keys() and all(torch.equal(v, shard[k]) for k, v in epoch.items())
    conf = json.loads((work / "output" / "configuration.json").read_text(encoding="utf-8"))
    assert conf["pipeline"]["type"] == "gpt3-generation" and conf["megatron"]["world_size"] == 1
    assert conf["train"]["lr_scheduler"]["lr_lambda"] == "<python noam_lambda>"
    assert conf["train"]["max_epochs"] == 1 and conf["evaluation"]["metrics"] == "ppl"
    assert {"MegatronHook"} <= {h["type"] for h in conf["train"]["hooks"]}
    trained = load_model(work / "output")
    assert not same_weights(trained, load_model(cache[1][MODEL_1_3B]))
    text = pipeline(Tasks.text_generation, model=str(work / "output"))("床前明月光")["text"]
    assert text.startswith("床前明月光")
    # gpt3zh's own run beside them, and the same run through the native API
    assert (work / "checkpoints").is_dir() and (work / "loss_curve.png").is_file()
    dd = MsDataset.load("chinese-poetry-collection")
    train_ds, eval_ds = (dd[s].remap_columns({"text1": "src_txt"}) for s in ("train", "test"))
    cfg = native(cache[1][MODEL_1_3B], card / "native", lr=3e-4, batch=16, eval_batch=8)
    result = train(cfg, train_dataset=train_ds, eval_dataset=eval_ds, lr_lambda=noam(100))
    assert losses(work) == losses(card / "native") and len(losses(work)) == 3  # 48 rows / 16
    assert evals(work) == evals(card / "native") and "ppl_modelscope" in evals(work)[0]
    assert result.step == 3


def test_dureader_card_prompt_to_target_with_modelscopes_default_metric(card, cache):
    run_script(card, "finetune_dureader", card_scripts()["finetune_dureader"])
    work = card / "gpt3_dureader"
    assert (work / "epoch_1_mp_rank_00_model_states.pt").is_file()
    [ev] = evals(work)
    assert {"rouge_l", "bleu4", "ppl_modelscope"} <= set(ev)  # text-gen-metric: greedy answers scored
    dd = MsDataset.load("DuReader_robust-QG")
    train_ds, eval_ds = (dd[s].remap_columns({"text1": "src_txt", "text2": "tgt_txt"})
                         .map(lambda example: {"src_txt": example["src_txt"] + "\n"}) for s in ("train", "validation"))
    cfg = native(cache[1][MODEL_1_3B], card / "native", lr=1e-4, batch=4, eval_batch=1, metrics=("rouge", "bleu"),
                 sequence_length=512, max_new_tokens=TOKENS_TO_GENERATE)
    train(cfg, train_dataset=train_ds, eval_dataset=eval_ds, lr_lambda=noam(200))
    assert losses(work) == losses(card / "native") and len(losses(work)) == 3  # 12 rows / 4
    assert evals(work) == evals(card / "native")
    info = read_log(work / "train_log.jsonl")[0]["info"]
    assert info["mode"] == "prompt" and info["rows_without_trained_tokens"] == 0


def test_base_card_single_process_model_and_its_typo(card, cache):
    with pytest.warns(UserWarning, match=r"default_args\['eval_datase'\] is not an argument.*ignored, as ModelScope "
                                         r"ignores it \(did you mean 'eval_dataset'\?\)"):
        run_script(card, "finetune_base", BASE_POETRY)
    work = card / "gpt3_poetry"
    assert evals(work) == []  # no eval dataset reached the trainer, as in ModelScope
    epoch = torch.load(work / "epoch_1.pth", weights_only=True)
    output = torch.load(work / "output" / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(v, output[k]) for k, v in epoch.items()) and "language_model.word_embeddings.weight" in epoch
    conf = json.loads((work / "output" / "configuration.json").read_text(encoding="utf-8"))
    assert "megatron" not in conf and conf["pipeline"]["type"] == "text-generation"
    train_ds = MsDataset.load("chinese-poetry-collection")["train"].remap_columns({"text1": "src_txt"})
    train(native(cache[1][MODEL_BASE], card / "native", lr=3e-4, batch=16, eval_batch=1), train_dataset=train_ds,
          lr_lambda=noam(100))
    assert losses(work) == losses(card / "native") and len(losses(work)) == 3


# ---------------------------------------------------------------------------- pipeline snippets
def expected_text(model_dir, prompt, max_new_tokens):
    """What ModelScope returns: detokenize(prompt ids + greedy continuation), stopping at eod_id."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    ids = tok.encode_prompt(prompt)
    [out] = generate(model, [ids], max_new_tokens=max_new_tokens, eos_token_id=1)  # config eod_id: 1
    return tok.detokenize(out)


def test_the_1_3b_pipeline_snippet(card, cache, capsys):
    run_script(card, "pipeline_1_3B", card_scripts()["pipeline"])
    expected = expected_text(cache[1][MODEL_1_3B], "程序员脱发用什么洗发水", TOKENS_TO_GENERATE)
    assert capsys.readouterr().out == f"{ {'text': expected} }\n"


def test_the_base_pipeline_snippet(card, cache, capsys):
    run_script(card, "pipeline_base", BASE_PIPELINE)
    prompt = BASE_PIPELINE.split('text_generation_zh("')[1].split('")')[0]
    tok = load_tokenizer(cache[1][MODEL_BASE])
    # single-process models: max_length = the prompt padded to sequence_length (128) + 100
    expected = expected_text(cache[1][MODEL_BASE], prompt, 228 - len(tok.encode_prompt(prompt)))
    assert capsys.readouterr().out == expected + "\n"
    assert expected.startswith("随着计算机视觉") and len(expected) > len(prompt)


@pytest.fixture
def pipes(card, cache):
    path = cache[1][MODEL_1_3B]
    return pipeline(Tasks.text_generation, model=MODEL_1_3B), load_model(path), load_tokenizer(path)


def test_the_prompt_comes_back_re_decoded_as_modelscope_returns_it(pipes, cache):
    pipe, _model, tok = pipes
    prompt = "问：ＡＢＣ，你好？"  # full-width forms: the JiebaBPE tokenizer's NFKC folds them
    ours = pipe(prompt)["text"]
    assert ours.startswith(tok.detokenize(tok.encode(prompt))) and not ours.startswith(prompt)
    assert ours == expected_text(cache[1][MODEL_1_3B], prompt, TOKENS_TO_GENERATE)
    native_text = gpt3zh_pipeline("text-generation", model=cache[1][MODEL_1_3B])(prompt)["text"]
    assert native_text.startswith(prompt)  # gpt3zh's own pipeline returns the prompt as typed
    assert pipe({"src_txt": prompt}) == pipe(prompt)


def test_modelscopes_call_options(pipes):
    pipe, model, tok = pipes
    prompt = "床前明月光"
    ids = tok.encode_prompt(prompt)

    def sampled(**options):
        [out] = generate(model, [ids], do_sample=True, eos_token_id=1, **options)
        return tok.detokenize(out)

    # top_p=0 is "off" in ModelScope's sampler (gpt3zh's 0 would be greedy); top_k=0 is off in both
    assert pipe(prompt, top_k=0, top_p=0, seed=7)["text"] == sampled(top_k=0, top_p=1.0, seed=7,
                                                                    max_new_tokens=TOKENS_TO_GENERATE)
    assert pipe(prompt, top_k=0, top_p=0.5, temperature=0.7, seed=7)["text"] == sampled(
        top_k=0, top_p=0.5, temperature=0.7, seed=7, max_new_tokens=TOKENS_TO_GENERATE)
    # top_k=1 is greedy; max_length counts the prompt
    greedy = pipe(prompt, top_k=1, max_length=len(ids) + 3)["text"]
    [out] = generate(model, [ids], max_new_tokens=3, eos_token_id=1)
    assert greedy == tok.detokenize(out)
    with pytest.raises(ConfigError, match=r"do_sample=False is beam search .* pass top_k=1 for greedy"):
        pipe(prompt, do_sample=False)
    with pytest.raises(ConfigError, match=r"unknown option 'topk'; did you mean 'top_k'"):
        pipe(prompt, topk=3)
    with pytest.raises(ConfigError, match=r"stop_on_eol=True stops at GPT-2's newline ids"):
        pipe(prompt, stop_on_eol=True)
    batch = pipe(["床前明月光", "白日依山尽"], batch_size=1)
    assert batch == [pipe("床前明月光"), pipe("白日依山尽")]


def test_stream_generate_yields_the_whole_text_after_every_token(pipes):
    pipe, model, tok = pipes
    prompt = "白日依山尽"
    steps = list(pipe.stream_generate(prompt))
    assert steps[-1] == pipe(prompt) and len(steps) == TOKENS_TO_GENERATE  # greedy; no eod on this tiny model
    ids = tok.encode_prompt(prompt)
    [out] = generate(model, [ids], max_new_tokens=TOKENS_TO_GENERATE, eos_token_id=1)
    assert [s["text"] for s in steps] == [tok.detokenize(out[: len(ids) + k]) for k in range(1, len(steps) + 1)]
    prompts = ["白日依山尽", "春眠不觉晓"]
    streams = pipe.stream_generate(prompts)  # a list: one generator per prompt
    assert [list(s)[-1] for s in streams] == pipe(prompts)
    batched = list(pipe.stream_generate(prompts, batch_size=2))  # with batch_size: one generator of lists
    assert batched[-1] == pipe(prompts) and all(len(step) == 2 for step in batched)


# ---------------------------------------------------------------------------------- hub, config
def test_snapshot_download_and_read_config_resolve_through_the_cache(card, cache):
    assert snapshot_download(MODEL_1_3B) == str(cache[1][MODEL_1_3B])
    with pytest.raises(ModelNotFoundError, match=r"'damo/no-such-model' is not a local directory.*tried:"):
        snapshot_download("damo/no-such-model")
    with pytest.raises(ValueError, match=r"revision='v1.0.1'"):
        snapshot_download(MODEL_1_3B, revision="v1.0.1")
    cfg = read_config(MODEL_1_3B)
    assert isinstance(cfg, ConfigDict) and cfg.megatron.tensor_model_parallel_size == 1
    assert cfg.train.optimizer.options.grad_clip.max_norm == 2.0
    with pytest.raises(AttributeError, match=r"unknown config key 'optimiser'; did you mean 'optimizer'"):
        cfg.train.optimiser  # noqa: B018
    cfg.train.lr_scheduler = {"type": "LambdaLR", "options": {"by_epoch": False}}
    assert cfg.train.lr_scheduler.options.by_epoch is False  # an assigned dict reads by attribute too
    cfg.merge_from_dict({"train.max_epochs": 9, "train.work_dir": "w"}, force=False)
    assert cfg.train.max_epochs == 3 and cfg.safe_get("train.work_dir") == "/tmp" and cfg.safe_get("a.b", 5) == 5


# ----------------------------------------------------------------------------------- bad inputs
def poetry_kwargs(**changes):
    dd = MsDataset.load("chinese-poetry-collection")

    def cfg_modify_fn(cfg):
        cfg.train.lr_scheduler = {"type": "LambdaLR", "lr_lambda": changes.pop("lr_lambda", noam(100)),
                                  "options": {"by_epoch": False}}
        cfg.train.optimizer = {"type": "AdamW", "lr": 3e-4}
        cfg.train.dataloader = {"batch_size_per_gpu": 16, "workers_per_gpu": 1}
        cfg.train.hooks.append({"type": "MegatronHook"})
        cfg.evaluation.dataloader = {"batch_size_per_gpu": 8, "workers_per_gpu": 1}
        cfg.evaluation.metrics = "ppl"
        changes.pop("modify", lambda c: None)(cfg)
        return cfg

    kwargs = {"model": MODEL_1_3B, "train_dataset": dd["train"].remap_columns({"text1": "src_txt"}),
              "eval_dataset": dd["test"].remap_columns({"text1": "src_txt"}), "max_epochs": 1, "work_dir": "./run",
              "cfg_modify_fn": cfg_modify_fn}
    kwargs.update(changes.pop("kwargs", {}))
    return kwargs


def _set(path, value):
    def modify(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value

    return modify


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"modify": _set("train.optimizer", {"type": "SGD", "lr": 0.1})},
         r"cfg.train.optimizer.type = 'SGD': gpt3zh's optimizer is AdamW"),
        ({"modify": _set("train.optimizer.momentum", 0.9)},
         r"cfg.train.optimizer: unknown setting 'momentum'.*refuses others, which would otherwise be silently ignored"),
        ({"modify": lambda cfg: cfg.train.hooks.append({"type": "EarlyStopHook"})},
         r"cfg.train.hooks\[5\]: gpt3zh does not implement ModelScope's EarlyStopHook"),
        ({"modify": _set("model.model_parallel_size", 2)},
         r"cfg.model.model_parallel_size = 2: ModelScope does not read it"),
        ({"modify": _set("model.checkpoint_model_parallel_size", 2)},
         r"cfg.model.checkpoint_model_parallel_size = 2: the weights in .* are 1 tensor-parallel shard"),
        ({"modify": _set("megatron.pipeline_model_parallel_size", 2)},
         r"cfg.megatron.pipeline_model_parallel_size = 2: gpt3zh has no pipeline parallelism"),
        ({"modify": _set("evaluation.metrics", "bleu")}, r"cfg.evaluation.metrics: 'bleu' is not a metric"),
        ({"modify": _set("train.dataloader.drop_last", True)}, r"cfg.train.dataloader.drop_last = True"),
        ({"kwargs": {"data_collator": list}}, r"default_args\['data_collator'\]: not supported by gpt3zh"),
        ({"kwargs": {"train_dataset": None}}, r"default_args has no train_dataset"),
    ],
)
def test_a_setting_gpt3zh_cannot_honour_is_refused_by_name_before_anything_is_written(card, changes, message):
    with pytest.raises(ConfigError, match=message):
        build_trainer(name=Trainers.gpt3_trainer, default_args=poetry_kwargs(**changes))
    assert not (card / "run").exists()


def test_the_shipped_lr_scheduler_is_refused_unless_the_script_sets_one(card):
    def keep_shipped(cfg):  # configuration.json ships StepLR + LinearWarmup, which gpt3zh does not run
        return cfg

    kwargs = {**poetry_kwargs(), "cfg_modify_fn": keep_shipped}
    with pytest.raises(ConfigError, match=r"cfg.train.lr_scheduler.type = 'StepLR': gpt3zh runs LambdaLR"):
        build_trainer(name=Trainers.gpt3_trainer, default_args=kwargs)


def test_a_dataset_without_src_txt_is_refused_before_anything_is_written(card):
    raw = MsDataset.load("chinese-poetry-collection")["train"]  # the card's remap_columns forgotten
    with pytest.raises(DataError, match=r"train_dataset: no column 'src_txt' \(columns: text1\).*remap_columns"):
        build_trainer(name=Trainers.gpt3_trainer, default_args={**poetry_kwargs(), "train_dataset": raw})
    assert not (card / "run").exists()


@pytest.mark.parametrize(
    "lr_lambda,message",
    [
        (noam(0), r"lr_lambda \(.*noam_lambda\) raised ZeroDivisionError at 0"),  # num_warmup_steps = 0
        (lambda step: None, r"lr_lambda \(.*<lambda>\) returned None at 0; expected a finite number >= 0"),
        (lambda step: "3e-4", r"returned '3e-4' at 0"),
    ],
)
def test_a_bad_lr_lambda_fails_train_before_anything_is_written(card, lr_lambda, message):
    trainer = build_trainer(name=Trainers.gpt3_trainer, default_args=poetry_kwargs(lr_lambda=lr_lambda))
    with pytest.raises(ConfigError, match=message):
        trainer.train()
    assert not (card / "run").exists()


@pytest.mark.slow
def test_evaluate_reports_modelscopes_ppl_before_and_after_training(card):
    trainer = build_trainer(name=Trainers.gpt3_trainer, default_args=poetry_kwargs())
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    [logged] = evals(card / "run")
    assert set(after) == {"ppl"} and after["ppl"] == pytest.approx(logged["ppl_modelscope"], rel=1e-6)
    assert before["ppl"] != after["ppl"]
    with pytest.raises(ConfigError, match=r"already holds"):  # the same work_dir again: refused, not mixed
        build_trainer(name=Trainers.gpt3_trainer, default_args=poetry_kwargs()).train()


def test_the_poetry_cards_settings_as_a_gpt3zh_config(card, cache):
    trainer = build_trainer(name=Trainers.gpt3_trainer, default_args=poetry_kwargs())
    assert trainer.plan.config == {
        "model": str(cache[1][MODEL_1_3B]),
        "preprocessor": {"sequence_length": 128},
        "train": {"work_dir": "./run", "max_epochs": 1, "seed": 42, "device": "auto", "precision": "fp32",
                  "dataloader": {"batch_size_per_gpu": 16, "workers_per_gpu": 1, "shuffle": True},
                  "optimizer": {"type": "AdamW", "lr": 3e-4, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8,
                                "options": {"grad_clip": {"max_norm": None}}},  # the card's dict has no options
                  "lr_scheduler": {"type": "LambdaLR", "options": {"by_epoch": False}},
                  "gradient_accumulation_steps": 1, "eval_interval": None, "log_interval": 1,  # TextLoggerHook 1
                  "export_formats": ["megatron"], "bucket_by_length": False},
        "evaluation": {"metrics": ["ppl"], "dataloader": {"batch_size_per_gpu": 8, "workers_per_gpu": 1,
                                                          "shuffle": False},  # ModelScope's eval default
                       "max_new_tokens": TOKENS_TO_GENERATE, "ppl_modelscope": True},
        "megatron": {"world_size": 1, "tensor_model_parallel_size": 1},
    }
    assert (trainer.plan.checkpoint_every, trainer.plan.evaluate) == (1, True)


def test_accumulation_reads_a_per_iteration_lambda_at_each_steps_last_iteration(card):
    seen = []

    def lr_lambda(i):
        seen.append(i)
        return 1.0

    def accumulate(cfg):
        cfg.train.optimizer["options"] = {"cumulative_iters": 2, "grad_clip": {"max_norm": 1.5}}

    trainer = build_trainer(name=Trainers.gpt3_trainer,
                            default_args=poetry_kwargs(lr_lambda=lr_lambda, modify=accumulate))
    t = trainer.plan.config["train"]
    assert t["gradient_accumulation_steps"] == 2 and t["optimizer"]["options"]["grad_clip"]["max_norm"] == 1.5
    assert [trainer.plan.lr_lambda(s) for s in range(3)] == [1.0] * 3 and seen == [1, 3, 5]
