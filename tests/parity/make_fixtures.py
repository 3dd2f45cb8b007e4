"""Write the reference-parity fixtures in tests/parity/fixtures/ with ModelScope's OWN code.

This script is not part of gpt3zh and never imports it: every expected value comes from the
installed `modelscope` package (GPT3Model, GPT3Config, JiebaBPETokenizer, split_into_partitions,
pre_load, TextGenerationTransformersPreprocessor, remove_space_between_chinese_chars), so the
gpt3zh tests compare against the reference, not against themselves.

It runs in a throwaway venv outside the repository (spec section 11):

    python3 -m venv /tmp/msvenv
    /tmp/msvenv/bin/pip install torch==2.13.0 modelscope==1.40.2 jieba==0.42.1 tokenizers==0.22.2 \
        transformers==4.57.6 datasets==4.8.4 einops simplejson sortedcontainers scipy Pillow attrs addict
    # tokenizers >= 0.19 rejects the real 1.3B tokenizer.json; 0.15.2 is the newest release that loads
    # it unmodified. It goes to a side directory because transformers 4.57.6 refuses tokenizers < 0.22.
    /tmp/msvenv/bin/pip install --no-deps --only-binary :all: \
        --target /tmp/msvenv/tokenizers-0.15.2 tokenizers==0.15.2
    /tmp/msvenv/bin/python tests/parity/make_fixtures.py

The JiebaBPE stage re-runs this file in a child process with the side directory first on
PYTHONPATH, and loads ModelScope's gpt3/tokenizer.py by file path (importing it through the
`modelscope.models` package would import transformers, whose version check rejects tokenizers
0.15.2). Everything else runs in the parent with tokenizers 0.22.2.

ModelScope's gpt3 package cannot be imported as shipped: backbone.py imports `sample` from
distributed_gpt3.py, which imports `megatron_util` (only on ModelScope's own wheel index). An inert
stub is put into sys.modules first; only `mpu.utils.divide` (used by split_into_partitions) does
anything, everything else raises if called. DistributedGPT3 itself stays unusable (CUDA + Megatron).

Output (see tests/parity/README.md): single/, megatron_tp{1,2,4}/, tokenizer/, generation.json,
meta.json. The script is deterministic: two runs give identical files (meta.json differs only in
its date).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_OUT = HERE / "fixtures"
DEFAULT_DATA = Path(os.environ.get("GPT3ZH_SHARED", ROOT.parent / "shared")) / "data"
DEFAULT_OLD_TOKENIZERS = Path("/tmp/msvenv/tokenizers-0.15.2")

SEED = 1234
TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, layernorm_epsilon=1e-5, eod_id=7)
# Row 0 holds ids 0/1/2/7 (pad, <sep>-like, eod) and 999 (last vocab row); row 1 is regular.
# The first 5 / 3 ids are the spec's ragged greedy prompts.
INPUT_IDS = [[5, 17, 256, 999, 3, 42, 7, 100, 500, 1, 2, 0],
             [11, 22, 33, 44, 55, 66, 77, 88, 99, 110, 121, 132]]
TP_SIZES = (1, 2, 4)
TP_WRAPPED = {1: True, 2: True, 4: False}          # {'module': sd} vs bare dict: both hub layouts
TP_BIAS_GELU_FUSION = {1: None, 2: True, 4: None}  # None: key absent (default True), like the 1.3B file


# ----------------------------------------------------------------------------- helpers

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n"
    _atomic_write_bytes(path, text.encode("utf-8"))


def _write_jsonl(path: Path, rows) -> None:
    lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in rows]
    _atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _torch_save(obj, path: Path) -> None:
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- megatron_util stub

class _Inert:
    """Stands in for any megatron_util object; fails loudly if actually used."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"megatron_util stub: {self._name} is not available")

    def __getattr__(self, item):
        return _Inert(f"{self._name}.{item}")


class _StubModule(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Inert(f"{self.__name__}.{item}")


def _divide(numerator: int, denominator: int) -> int:
    # Megatron-LM mpu.utils.divide: exact division or an error.
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def install_megatron_util_stub() -> None:
    names = ["megatron_util", "megatron_util.mpu", "megatron_util.mpu.utils",
             "megatron_util.global_vars", "megatron_util.model", "megatron_util.model.fused_softmax"]
    mods = {n: _StubModule(n) for n in names}
    mods["megatron_util.mpu.utils"].divide = _divide
    for name, mod in mods.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
        sys.modules.setdefault(name, mod)


# ----------------------------------------------------------------------------- a. single model

def megatron_tanh_gelu(x):
    # Megatron-LM bias_gelu (fused_bias_gelu.py) with the bias already added by nn.Linear.
    import torch
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def build_tiny_model():
    """Spec section 11: seed, build, redraw every parameter in named_parameters() order, eval."""
    import torch
    from modelscope.models.nlp.gpt3 import GPT3Config, GPT3Model

    torch.manual_seed(SEED)
    model = GPT3Model(GPT3Config(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embeddings" in name:
                p.normal_(0.0, 0.5)
            elif "layernorm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif "layernorm" in name:
                p.normal_(0.0, 0.1)
            elif name.endswith("weight"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def config_json(cfg, **overrides) -> dict:
    """GPT3Config constructor fields (what GPT3Config.from_pretrained reads back).

    Not cfg.save_pretrained(): it writes layer_norm_eps, which GPT3Config.from_pretrained then
    rejects (spec section 2). kv_channels is written as null because a non-null value is never
    stored by GPT3Config (spec section 2 bug).
    """
    import inspect
    fields = [p for p in inspect.signature(type(cfg).__init__).parameters if p not in ("self", "kwargs")]
    out = {"model_type": "gpt3"}
    for name in fields:
        out[name] = None if name == "kv_channels" else getattr(cfg, name)
    for name, value in overrides.items():  # None removes the key (field left to its default)
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def set_tanh_gelu(model, on: bool) -> None:
    import torch.nn.functional as F
    for layer in model.language_model.transformer.layers:
        layer.mlp.activation_func = megatron_tanh_gelu if on else F.gelu


def write_single(out: Path, model) -> dict:
    import torch
    from modelscope.models.nlp.gpt3 import GPT3Model

    d = out / "single"
    _write_json(d / "config.json", config_json(model.config))
    _write_json(d / "configuration.json", {
        "framework": "pytorch", "task": "text-generation",
        "model": {"type": "gpt3"}, "pipeline": {"type": "text-generation"},
        "preprocessor": {"type": "text-gen-tokenizer"}})
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _torch_save(sd, d / "pytorch_model.bin")

    ids = torch.tensor(INPUT_IDS, dtype=torch.long)  # (B, T) = (2, 12)
    with torch.no_grad():
        logits = model(ids).logits  # (B, T, V)
        set_tanh_gelu(model, True)
        logits_tanh = model(ids).logits
        set_tanh_gelu(model, False)
        labels = torch.roll(ids, shifts=-1, dims=1)
        loss = model(ids, labels=labels).loss
    _torch_save(ids.clone(), d / "input_ids.pt")
    _torch_save(logits.clone(), d / "logits.pt")
    _torch_save(logits_tanh.clone(), d / "logits_tanh.pt")
    _torch_save({"labels": labels.clone(), "loss": loss.clone()}, d / "extras.pt")

    reloaded = GPT3Model.from_pretrained(str(d)).eval()
    with torch.no_grad():
        reload_diff = (reloaded(ids).logits - logits).abs().max().item()
    if reload_diff != 0.0:
        raise RuntimeError(f"GPT3Model.from_pretrained reload differs by {reload_diff}")
    return {
        "num_tensors": len(sd),
        "logits_abs_max": logits.abs().max().item(),
        "logits_sum": logits.sum().item(),
        "logits_tanh_abs_max": logits_tanh.abs().max().item(),
        "logits_tanh_sum": logits_tanh.sum().item(),
        "tanh_vs_erf_max_abs_diff": (logits_tanh - logits).abs().max().item(),
        "loss_rolled_labels": loss.item(),
        "reload_max_abs_diff": reload_diff,
    }


# ----------------------------------------------------------------------------- c. megatron shards

def single_to_megatron(sd: dict, heads: int) -> dict:
    """Spec 4.3: rename keys and reorder qkv rows from [3, heads, hn] to [heads, 3, hn]."""
    out = {}
    for k, v in sd.items():
        nk = (k.replace("language_model.word_embeddings", "language_model.embedding.word_embeddings")
               .replace("language_model.position_embeddings", "language_model.embedding.position_embeddings")
               .replace("language_model.transformer.", "language_model.encoder.")
               .replace(".attention.", ".self_attention."))
        if "query_key_value" in k:
            rest = v.shape[1:]  # (H,) for the weight, () for the bias
            v = v.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(v.shape[0], *rest)
        out[nk] = v.contiguous()
    return out


def megatron_to_single(sd: dict, heads: int) -> dict:
    out = {}
    for k, v in sd.items():
        nk = (k.replace("language_model.embedding.", "language_model.")
               .replace("language_model.encoder.", "language_model.transformer.")
               .replace(".self_attention.", ".attention."))
        if "query_key_value" in k:
            rest = v.shape[1:]
            v = v.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(v.shape[0], *rest)
        out[nk] = v.contiguous()
    return out


def partition_dim(name: str) -> int:
    """Spec 4.2: column-parallel (+bias) and vocab rows split dim 0, row-parallel weights dim 1."""
    if name.endswith("word_embeddings.weight") or "query_key_value" in name or "dense_h_to_4h" in name:
        return 0
    if name.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
        return 1
    return -1


def write_megatron(out: Path, data: Path, model, expected_logits) -> dict:
    import torch
    from modelscope.models.nlp.gpt3 import GPT3Model
    from modelscope.models.nlp.gpt3.distributed_gpt3 import split_into_partitions
    from modelscope.utils.nlp.load_checkpoint import pre_load

    heads = model.config.num_attention_heads
    full = single_to_megatron(model.state_dict(), heads)
    src_cfg = json.loads((data / "modelscope-gpt3-1.3B" / "configuration.json").read_text())
    report = {}
    for t in TP_SIZES:
        d = out / f"megatron_tp{t}"
        shards = [{} for _ in range(t)]
        for name, tensor in full.items():
            dim = partition_dim(name)
            parts = [tensor] * t if dim < 0 else split_into_partitions(tensor, t, dim, 1)
            for r in range(t):
                shards[r][name] = parts[r].clone().contiguous()
        for r, shard in enumerate(shards):
            obj = {"module": shard} if TP_WRAPPED[t] else shard
            _torch_save(obj, d / "model" / f"mp_rank_{r:02d}_model_states.pt")
        _write_json(d / "config.json", config_json(model.config, bias_gelu_fusion=TP_BIAS_GELU_FUSION[t]))
        _write_json(d / "configuration.json", megatron_configuration(src_cfg, t))

        # Check: read back with ModelScope's pre_load, merge, and run ModelScope's single model
        # with tanh GELU; it must reproduce logits_tanh exactly.
        loaded = [pre_load(r, str(d), tag="model") for r in range(t)]
        merged = {n: (loaded[0][n] if partition_dim(n) < 0 else
                      torch.cat([s[n] for s in loaded], dim=partition_dim(n))) for n in loaded[0]}
        m = GPT3Model(model.config).eval()
        m.load_state_dict(megatron_to_single(merged, heads), strict=True)
        set_tanh_gelu(m, True)
        with torch.no_grad():
            diff = (m(torch.tensor(INPUT_IDS)).logits - expected_logits).abs().max().item()
        if diff != 0.0:
            raise RuntimeError(f"megatron_tp{t}: merged shards differ from logits_tanh by {diff}")
        report[f"tp{t}"] = {"wrapped_in_module": TP_WRAPPED[t], "bias_gelu_fusion": TP_BIAS_GELU_FUSION[t],
                            "merged_vs_logits_tanh_max_abs_diff": diff}
    return report


def megatron_configuration(src: dict, t: int) -> dict:
    cfg = json.loads(json.dumps(src))  # deep copy of the real 1.3B configuration.json
    cfg["megatron"] = {"world_size": t, "tensor_model_parallel_size": t,
                       "checkpoint_tensor_model_parallel_size": t}
    cfg["model"] = {"type": "gpt3"}
    cfg["pipeline"] = {"type": "gpt3-generation"}
    cfg["preprocessor"] = {"type": "text-gen-jieba-tokenizer"}
    return cfg


# ----------------------------------------------------------------------------- d. JiebaBPE tokenizer

EDGE_TEXTS = [
    "", " ", "  ", "     ", "\n", "\n\n", "\t", "a\tb", "Hello world", "hello  world   again",
    "The quick brown fox jumps over the lazy dog.", "GPT-3 is a language model; ModelScope hosts it.",
    "0123456789", "3.14159 + 2.71828 = 5.85987", "2023年10月1日", "价格是99.5元，折扣20%",
    "ＡＢＣ１２３，。！", "ａｂｃ　全角空格", "（全角括号）【方括号】《书名号》「引号」",
    "“中文引号”‘单引号’…—·、；：？！", "emoji 😀🎉👍 测试", "中文😀混合", "<sep>", "前文<sep>后文",
    "答案<sep>上下文内容\n", "<|endoftext|>", "结束<|endoftext|>开始", "<pad><unk><cls><mask>",
    "第一行\n第二行\n\n第四行", "  前导空格", "尾随空格  ", "制表\t符号", "English与中文mixed混排123",
    "Ⅰ Ⅱ Ⅲ ① ② ③ ㈠ ㊀", "ﬁ ﬂ ㎏ ㎡ ℃ №", "한국어 日本語 かな カナ", "Ελληνικά русский",
    "\u3000", "a\u00a0b", "中国的首都是北京。", "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
]


def jieba_texts(data: Path, max_chars: int = 120) -> list[str]:
    """Deterministic selection: every 3rd poetry test body, every 2nd qg dev src and tgt."""
    def rows(path: Path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    texts = [r["src_txt"] for r in rows(data / "poetry" / "test.jsonl")[::3]]
    qg = rows(data / "qg" / "dev.jsonl")[::2]
    texts += [r["src_txt"] for r in qg] + [r["tgt_txt"] for r in qg]
    return [t[:max_chars] for t in texts] + EDGE_TEXTS


def load_modelscope_tokenizer_module():
    """ModelScope's gpt3/tokenizer.py by path, without importing the modelscope.models package."""
    spec = importlib.util.find_spec("modelscope")
    path = Path(spec.submodule_search_locations[0]) / "models" / "nlp" / "gpt3" / "tokenizer.py"
    mspec = importlib.util.spec_from_file_location("modelscope_gpt3_tokenizer", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


def jiebabpe_worker(out: Path, data: Path) -> None:
    """Runs in the child process that has tokenizers 0.15.2 first on sys.path."""
    import jieba
    import tokenizers

    tok_mod = load_modelscope_tokenizer_module()
    tok = tok_mod.JiebaBPETokenizer(str(data / "modelscope-gpt3-1.3B" / "tokenizer.json"))
    rows = []
    for text in jieba_texts(data):
        ids = tok.tokenize(text)
        rows.append({"text": text, "ids": ids, "detok": tok.detokenize(ids), "jieba": list(jieba.cut(text))})
    _write_jsonl(out / "tokenizer" / "jiebabpe.jsonl", rows)
    meta = {
        "eod_id": tok.eod_id, "sep_id": tok.sep_token, "newline_id": tok.new_line,
        "vocab_size": tok.vocab_size,
        "vocab_size_without_added": tok.tokenizer.get_vocab_size(with_added_tokens=False),
        "tokenizers_version": tokenizers.__version__, "jieba_version": jieba.__version__,
        "tokenizer_json_sha256": _sha256(data / "modelscope-gpt3-1.3B" / "tokenizer.json"),
        "num_texts": len(rows),
    }
    _write_json(out / "tokenizer" / ".jiebabpe_worker.json", meta)


def write_jiebabpe(out: Path, data: Path, old_tokenizers: Path) -> dict:
    from tokenizers import Tokenizer
    from tokenizers import __version__ as tok_version

    # The error the venv's (new) tokenizers gives on the unmodified file, recorded live.
    try:
        Tokenizer.from_file(str(data / "modelscope-gpt3-1.3B" / "tokenizer.json"))
        new_error = None
    except Exception as e:  # noqa: BLE001 - the exception type is what we record
        new_error = f"{type(e).__name__}: {e}"
    if not (old_tokenizers / "tokenizers").is_dir():
        raise SystemExit(f"{old_tokenizers} has no tokenizers package; see the install recipe in the docstring")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(old_tokenizers), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, __file__, "--out", str(out), "--data", str(data), "--jiebabpe-worker"],
                   env=env, check=True)
    side = out / "tokenizer" / ".jiebabpe_worker.json"
    meta = json.loads(side.read_text())
    side.unlink()
    meta["load_error_with_newer_tokenizers"] = {"version": tok_version, "error": new_error}
    meta["note"] = ("tokenizers >= 0.19 rejects this tokenizer.json as is (0.19-0.20: untagged enum error, "
                    ">= 0.21: add_prefix_space vs prepend_scheme); 0.15.2 is the newest release that loads it.")
    _write_json(out / "tokenizer" / "meta.json", meta)
    return meta


# ----------------------------------------------------------------------------- b. generation

def _gen(model, prompts: list[list[int]], seed: int | None = None, eod_id: int | None = None, **kw) -> dict:
    import torch

    lengths = [len(p) for p in prompts]
    width = max(lengths)
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts], dtype=torch.long)  # (B, T0)
    call = dict(kw, prompt_length=torch.tensor(lengths))
    old_eod = model.config.eod_id
    if eod_id is not None:
        model.config.eod_id = eod_id
    try:
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(tokens, **call)
    finally:
        model.config.eod_id = old_eod
    record = {
        "prompts": prompts, "prompt_length": lengths, "input_tokens": tokens.tolist(),
        "call": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in call.items()},
        "config_eod_id": model.config.eod_id if eod_id is None else eod_id,
        "sequences": out.sequences.tolist(),
    }
    if seed is not None:
        record["torch_manual_seed"] = seed
    return record


def write_generation(out: Path, model) -> dict:
    single = [[5, 17, 256, 999, 3]]
    ragged = [[5, 17, 256, 999, 3], [11, 22, 33]]
    cases = {
        "single_greedy": _gen(model, single, top_k=1, top_p=0.0, max_length=16),
        "single_greedy_default_max_length": _gen(model, single, top_k=1, top_p=0.0),
        "ragged_greedy": _gen(model, ragged, top_k=1, top_p=0.0, max_length=16),
        # eod_id set to 711: row 1 emits it first (step 3) and keeps generating; the loop stops
        # once row 0 emits it too, so the output is shorter than max_length.
        "ragged_greedy_early_eod": _gen(model, ragged, eod_id=711, top_k=1, top_p=0.0, max_length=32),
        "single_greedy_eod_stop": _gen(model, single, eod_id=345, top_k=1, top_p=0.0, max_length=32),
    }
    informational = {
        "ragged_top_k5_seed0": _gen(model, ragged, seed=0, top_k=5, top_p=0.0, max_length=16),
        "ragged_top_p0.9_seed0": _gen(model, ragged, seed=0, top_k=0, top_p=0.9, max_length=16),
        "single_top_p0.9_temp0.7_seed7": _gen(model, single, seed=7, top_k=0, top_p=0.9,
                                              temperature=0.7, max_length=16),
    }
    doc = {
        "reference": "modelscope.models.nlp.gpt3.backbone.GPT3Model.generate on single/ (erf GELU), eval mode",
        "how_called": ("model.generate(tokens, temperature=1.0, **call): tokens is the prompts right-padded "
                       "with 0 to the longest prompt (input_tokens); prompt_length is a LongTensor of per-row "
                       "lengths; max_length is the total length including the prompt (default "
                       "tokens.size(1) + 100, capped at max_position_embeddings); greedy needs top_k=1 AND "
                       "top_p=0.0. Output: sequences (B, last_context_length + 1)."),
        "after_eod": ("Generation starts at min(prompt_length); a row is written only once its prompt is "
                      "consumed (prompt_length <= context length), so short rows' pad slots are overwritten. "
                      "A row that sampled config.eod_id keeps being extended with further samples (nothing "
                      "masks it); the loop stops at the first step after which every row has sampled eod_id "
                      "at least once, or at max_length. Sequences are returned including the eod token and "
                      "whatever finished rows generated afterwards."),
        "spec_expected_ragged_greedy": [[5, 17, 256, 999, 3, 978, 666, 655, 855, 345, 345, 345, 379, 711, 299, 62],
                                        [11, 22, 33, 711, 871, 871, 871, 290, 489, 711, 711, 732, 69, 935, 472, 472]],
        "cases": cases,
        "informational": {
            "note": ("Seeded sampling: torch.manual_seed(seed) immediately before generate(); draws come from "
                     "torch.multinomial on CPU with torch 2.13.0. Exact tokens depend on the RNG stream, so "
                     "these are informational, not a parity target."),
            **informational,
        },
    }
    if cases["ragged_greedy"]["sequences"] != doc["spec_expected_ragged_greedy"]:
        raise RuntimeError(f"ragged greedy deviates from the spec: {cases['ragged_greedy']['sequences']}")
    _write_json(out / "generation.json", doc)
    return {k: v["sequences"] for k, v in cases.items()}


# ----------------------------------------------------------------------------- e. BERT tokenizer

BERT_EXTRA = [
    "今天天气很好。", "你好，世界！", "GPT-3模型在2020年发布", "iPhone 15 Pro Max售价7999元",
    "Hello World", "hello, world! How are you?", "ＡＢＣ１２３，。！", "价格：99.5%（含税）",
    "《红楼梦》是中国古典小说", "邮箱 test@example.com 网址 https://modelscope.cn", "a b  c   d",
    "第一行\n第二行\t制表", "3.1415926535", "emoji😀测试", "中文English混合mixed123", "",
    "“引号”‘单引’…—", "unaffable running jumped", "COVID-19疫情", "北京大学与清华大学",
]


def bert_texts(data: Path) -> list[str]:
    with open(data / "poetry" / "test.jsonl", encoding="utf-8") as f:
        poetry = [json.loads(line)["src_txt"] for line in f if line.strip()][::100][:15]
    with open(data / "qg" / "dev.jsonl", encoding="utf-8") as f:
        qg = [json.loads(line) for line in f if line.strip()][::100][:8]
    texts = [t[:60] for t in poetry] + [r["tgt_txt"][:60] for r in qg] + [r["src_txt"][:60] for r in qg]
    return texts + BERT_EXTRA


def write_bert(out: Path, data: Path) -> dict:
    from modelscope.preprocessors.nlp.text_generation_preprocessor import TextGenerationTransformersPreprocessor
    from modelscope.utils.chinese_utils import remove_space_between_chinese_chars

    vocab = data / "tokenizers" / "bert-base-chinese" / "vocab.txt"
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        # A single-process GPT-3 model dir as far as the preprocessor reads it (spec section 5).
        shutil.copy(vocab, Path(model_dir) / "vocab.txt")
        Path(model_dir, "configuration.json").write_text(json.dumps({
            "framework": "pytorch", "task": "text-generation", "model": {"type": "gpt3"},
            "pipeline": {"type": "text-generation"}, "preprocessor": {"type": "text-gen-tokenizer"}}))
        pre = TextGenerationTransformersPreprocessor(model_dir, sequence_length=128)
        tokenizer_class = type(pre.nlp_tokenizer.tokenizer).__name__
        for text in bert_texts(data):
            enc = pre({"sentence": text})
            mask = enc["attention_mask"][0].bool()
            ids = enc["input_ids"][0][mask].tolist()
            decoded = pre.decode(ids, skip_special_tokens=True)
            rows.append({"text": text, "ids": ids, "prompt_length": int(mask.sum()) - 1,
                         "decode": decoded, "decode_clean": remove_space_between_chinese_chars(decoded)})
    _write_jsonl(out / "tokenizer" / "bert.jsonl", rows)
    return {"num_texts": len(rows), "tokenizer_class": tokenizer_class, "sequence_length": 128,
            "vocab_sha256": _sha256(vocab)}


# ----------------------------------------------------------------------------- f. meta

PACKAGES = ["torch", "modelscope", "jieba", "tokenizers", "transformers", "datasets", "numpy", "addict",
            "einops", "simplejson", "sortedcontainers", "scipy", "Pillow", "attrs"]


def write_meta(out: Path, summary: dict) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p != out / "meta.json")
    meta = {
        "generated_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "jiebabpe_tokenizers": summary.get("tokenizer", {}).get("tokenizers_version"),
        "seeds": {"model": SEED, "sampling": "see generation.json informational"},
        "tiny_config": TINY,
        "input_ids": INPUT_IDS,
        "summary": summary,
        "sha256": {str(p.relative_to(out)): _sha256(p) for p in files},
    }
    _write_json(out / "meta.json", meta)


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--old-tokenizers", type=Path, default=DEFAULT_OLD_TOKENIZERS,
                    help="pip --target dir holding tokenizers 0.15.2 (for the JiebaBPE stage)")
    ap.add_argument("--jiebabpe-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.jiebabpe_worker:
        jiebabpe_worker(args.out, args.data)
        return

    install_megatron_util_stub()
    import torch
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one summation order for every run

    summary = {}
    model = build_tiny_model()
    summary["single"] = write_single(args.out, model)
    print("single:", summary["single"], flush=True)
    logits_tanh = torch.load(args.out / "single" / "logits_tanh.pt", weights_only=True)
    summary["megatron"] = write_megatron(args.out, args.data, model, logits_tanh)
    print("megatron:", summary["megatron"], flush=True)
    summary["tokenizer"] = write_jiebabpe(args.out, args.data, args.old_tokenizers)
    print("tokenizer:", summary["tokenizer"], flush=True)
    summary["generation"] = write_generation(args.out, model)
    print("generation:", summary["generation"], flush=True)
    summary["bert"] = write_bert(args.out, args.data)
    print("bert:", summary["bert"], flush=True)
    write_meta(args.out, summary)
    print("meta: written", flush=True)


if __name__ == "__main__":
    main()
