"""The training config's schema: what each bad value is told, the YAML spellings it takes, its JSON schema."""

import dataclasses
import json

import pytest

from gpt3zh.config import ConfigError
from gpt3zh.training import config as train_config
from gpt3zh.training.config import config_schema, load_config

BASE = {
    "model": {"preset": "base", "n_layer": 2, "n_head": 2, "d_model": 32, "vocab_size": 64, "max_seq_len": 32},
    "tokenizer": "unused",
    "dataset": {"train": "unused.jsonl"},
}


@pytest.mark.parametrize(
    "override, message",
    [
        # strict leaves: a bool is not an int, "5" is not an int, 1 is not a bool, a number is not a string
        ("train.seed=true", "train.seed: expected int, got True"),
        ("train.seed='5'", "train.seed: expected int, got '5'"),
        ("train.seed=2.0", "train.seed: expected int, got 2.0"),
        ("train.dataloader.shuffle=1", "train.dataloader.shuffle: expected bool, got 1"),
        ("evaluation.at_start=yes please", "evaluation.at_start: expected bool, got 'yes please'"),
        ("train.work_dir=5", "train.work_dir: expected str, got 5"),
        ("tokenizer=[a]", "tokenizer: expected str or null, got ['a']"),
        ("train.optimizer.lr=abc", "train.optimizer.lr: expected float, got 'abc'"),
        ("train.optimizer.lr=true", "train.optimizer.lr: expected float, got True"),
        ("train.optimizer.options.grad_clip.max_norm=abc",
         "train.optimizer.options.grad_clip.max_norm: expected float or null, got 'abc'"),
        # lists and tuples: the index of the bad item
        ("train.optimizer.betas=[0.9]", "train.optimizer.betas: expected a list of 2 numbers, got [0.9]"),
        ("train.optimizer.betas=[0.9, 0.99, 0.999]", "train.optimizer.betas: expected a list of 2 numbers, got [0.9, "),
        ("train.optimizer.betas=0.9", "train.optimizer.betas: expected a list of 2 numbers, got 0.9"),
        ("train.optimizer.betas=[0.9, x]", "train.optimizer.betas[1]: expected float, got 'x'"),
        ("evaluation.metrics=[ppl, rouge, foo]",
         "evaluation.metrics[2]: expected one of 'ppl', 'rouge', 'bleu', got 'foo'"),
        ("evaluation.metrics=[[ppl]]", "evaluation.metrics[0]: expected one of 'ppl', 'rouge', 'bleu', got ['ppl']"),
        ("evaluation.metrics={ppl: 1}", "evaluation.metrics: expected a list, got {'ppl': 1}"),
        ("train.export_formats=[hf, 3]", "train.export_formats[1]: expected str, got 3"),
        ("train.lora.target_modules=[attn.qkv, null]", "train.lora.target_modules[1]: expected str, got None"),
        # unions and literals list what they take
        ("train.resume=5", "train.resume: expected bool or str, got 5"),
        ("train.progress_bar=maybe", "train.progress_bar: expected bool or 'auto', got 'maybe'"),
        ("train.optimizer.type=SGD", "train.optimizer.type: expected 'AdamW', got 'SGD'"),
        ("train.lr_scheduler.type=StepLR",
         "train.lr_scheduler.type: expected one of 'noam', 'cosine', 'constant', 'LambdaLR', got 'StepLR'"),
        # sections and mappings
        ("train.lr_scheduler=5", "train.lr_scheduler: expected a mapping, got 5"),
        ("dataset.remap_columns={text1: 3}", "dataset.remap_columns.text1: expected str, got 3"),
        ("dataset.remap_columns=[text1]", "dataset.remap_columns: expected a mapping, got ['text1']"),
        ("model.overrides=3", "model.overrides: expected a mapping, got 3"),
        ("model.preset=1.3", "model.preset: expected str or null, got 1.3"),
        ("model=5", "model: expected a model directory, a ModelScope id or {preset: NAME, ...}, got 5"),
        ("model.preset=basic", "unknown preset 'basic'; did you mean 'base'?"),
        # finite numbers: the right type, a wrong value
        ("train.optimizer.lr=inf", "train.optimizer.lr: expected a finite number, got inf"),
        ("train.optimizer.eps='nan'", "train.optimizer.eps: expected a finite number, got nan"),
        ("train.optimizer.betas=[0.9, .nan]", "train.optimizer.betas[1]: expected a finite number, got nan"),
        ("train.lora.alpha=-.inf", "train.lora.alpha: expected a finite number, got -inf"),
        ("train.lr_scheduler.min_lr_ratio=.inf", "train.lr_scheduler.min_lr_ratio: expected a finite number"),
    ],
)
def test_a_bad_value_is_named_with_its_key_and_what_was_expected(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, [override])
    assert str(err.value).startswith(message), str(err.value)


def test_a_python_tuple_of_the_wrong_length_is_named_as_the_tuple():
    with pytest.raises(ConfigError, match=r"^train.optimizer.betas: expected a list of 2 numbers, got \(0.9,\)$"):
        load_config({**BASE, "train": {"optimizer": {"betas": (0.9,)}}})


def test_the_yaml_spellings_of_a_value_are_taken(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(  # YAML 1.1 reads 1e-4 and 5e-5 (no dot) as strings
        "model: {preset: base, n_layer: 2, n_head: 2, d_model: 32, vocab_size: 64, max_seq_len: 32}\n"
        "tokenizer: t\ndataset: {train: a.jsonl, remap_columns: {text1: src_txt}}\n"
        "preprocessor:\nmegatron:\n"
        "train:\n  export_formats: hf\n  resume: some/dir\n  progress_bar: auto\n"
        "  optimizer: {lr: 1e-4, eps: 5e-5, weight_decay: 0, betas: [0.8, 0.9]}\n"
        "  lr_scheduler: {type: cosine, min_lr_ratio: 1}\n"
        "evaluation: {metrics: rouge}\n"
    )
    cfg = load_config(path)
    opt = cfg.train.optimizer
    assert (opt.lr, opt.eps, opt.betas) == (1e-4, 5e-5, (0.8, 0.9))
    assert type(opt.weight_decay) is float and type(cfg.train.lr_scheduler.min_lr_ratio) is float  # an int is a float
    assert cfg.train.export_formats == ["hf"] and cfg.evaluation.metrics == ["rouge"]  # one item for a list
    assert cfg.train.resume == "some/dir" and cfg.train.progress_bar == "auto"
    assert cfg.preprocessor == train_config.PreprocessorSection() and cfg.megatron == train_config.MegatronSection()
    assert cfg.dataset.remap_columns == {"text1": "src_txt"}
    assert load_config(cfg) == cfg == load_config(cfg.to_dict())  # to_dict writes betas as a list
    tuples = load_config({**BASE, "train": {"export_formats": ("gpt3zh", "hf"), "optimizer": {"betas": (0.5, 0.6)}}})
    assert tuples.train.export_formats == ["gpt3zh", "hf"] and tuples.train.optimizer.betas == (0.5, 0.6)


def test_the_model_section_takes_a_path_a_preset_and_the_overrides_shorthand():
    assert load_config({**BASE, "model": "some/dir"}).model == train_config.ModelSection(path="some/dir")
    assert load_config({**BASE, "model": {"path": "some/dir"}}).model.path == "some/dir"
    fields = {k: v for k, v in BASE["model"].items() if k != "preset"}
    via_overrides = load_config({**BASE, "model": {"preset": "base", "overrides": fields}})
    assert via_overrides.model == load_config(BASE).model == train_config.ModelSection(preset="base", overrides=fields)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"preset": "base", "n_heads": 2}, "unknown config key 'model.n_heads'; did you mean 'model.n_head'?"),
        ({"preset": "base", "overrides": {"n_layers": 2}},
         "unknown config key 'model.overrides.n_layers'; did you mean 'model.overrides.n_layer'?"),
        ({"path": "d", "preset": "base"}, "model: give either path (fine-tune) or preset (from scratch), not both"),
        ({"path": "d", "n_layer": 2}, "model: architecture overrides ['n_layer'] only apply to a preset"),
        ({"preset": "base", "n_layer": 2, "overrides": {"n_layer": 3}},
         "model: n_layer is given twice with different values (model.n_layer=2, model.overrides.n_layer=3)"),
        ({"path": 5}, "model.path: expected str or null, got 5"),
    ],
)
def test_a_bad_model_section_is_named(model, message):
    with pytest.raises(ConfigError) as err:
        load_config({**BASE, "model": model})
    assert str(err.value).startswith(message), str(err.value)


def test_an_unknown_key_deep_in_a_file_gets_the_full_key_suggested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: base}\ntokenizer: t\ntrain: {optimizer: {options: {grad_clop: {max_norm: 1}}}}\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'train.optimizer.options.grad_clop'; "
                                          r"did you mean 'train.optimizer.options.grad_clip'\?"):
        load_config(path)


def test_the_json_schema_describes_every_section_and_refuses_other_keys():
    schema = config_schema()
    json.dumps(schema)  # plain JSON
    defs = schema["$defs"]
    sections = {tp.__name__: tp for tp in vars(train_config).values()
                if isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, train_config._Section)}
    assert set(defs) == set(sections)
    for name, section in sections.items():
        assert defs[name]["additionalProperties"] is False
        assert list(defs[name]["properties"]) == [f.name for f in dataclasses.fields(section)]
    train = defs["TrainSection"]["properties"]
    assert train["precision"] == {"default": "fp32", "enum": ["fp32", "bf16", "fp16"], "title": "Precision",
                                  "type": "string"}
    assert {"type": "string"} in defs["TrainConfig"]["properties"]["model"]["anyOf"]  # model: DIR
    assert {"type": "null"} in defs["TrainConfig"]["properties"]["train"]["anyOf"]  # `train:` with nothing under it
    assert defs["OptimizerConfig"]["properties"]["betas"]["prefixItems"] == [{"type": "number"}] * 2
