"""load_model / save_model / convert / describe / inspect_weights: the public entry points of gpt3zh.checkpoint."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import hugepages
from ..config import GenerationDefaults, GPTConfig
from ..hub import resolve_model
from ..model import GPT
from . import formats, lora, tables
from .errors import CheckpointError
from .files import atomic_output_dir, read_json

PathLike = str | os.PathLike


@dataclass(frozen=True)
class ModelDirInfo:
    """What `describe` finds in a model directory, without reading the weights."""

    format: str  # "gpt3zh" | "modelscope" | "megatron" | "hf"
    config: GPTConfig
    generation: GenerationDefaults
    extra: dict[str, Any] = field(default_factory=dict)  # dtype, tp (Megatron), tokenizer kind


def describe(path: PathLike) -> ModelDirInfo:
    """Format, config and generation defaults of a model directory (or ModelScope id); for a LoRA
    adapter directory, its base's, with the adapter named in `extra`."""
    d = resolve_model(path)
    if lora.is_adapter_dir(d):
        return _describe_adapter(d)
    fmt = formats.detect(d)
    cfg, gen = fmt.read_config(d)
    return ModelDirInfo(fmt.name, cfg, gen, {**fmt.extra(d), "tokenizer": _tokenizer_kind(d)})


def _describe_adapter(d: Path) -> ModelDirInfo:
    record = lora.read_base(d)
    base = resolve_model(lora.base_location(d, record))
    info = describe(base)
    config = read_json(d / lora.ADAPTER_CONFIG, "peft adapter config")
    generation = info.generation
    if record is not None and "generation" in record:
        generation = GenerationDefaults.from_dict(record["generation"], f"{d / lora.BASE_FILE} generation")
    extra = {**info.extra, "lora_adapter": str(d), "lora_r": config.get("r"), "lora_base": str(base),
             "tokenizer": _tokenizer_kind(d)}
    return ModelDirInfo(info.format, info.config, generation, extra)


def _tokenizer_kind(d: Path) -> str:
    """What `load_tokenizer(d)` would load, in words (the same detection, not a guess from names;
    an HF export holds tokenizer.json for every kind)."""
    from ..tokenizer import detect_kind

    if not ((d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file()):
        return "none"
    try:
        kind = detect_kind(d)
    except ValueError as err:  # TokenizerError: files that do not say which kind they are
        return f"unknown ({str(err).splitlines()[0]})"
    if kind == "jieba_bpe":
        return "tokenizer.json (jieba + BPE)"
    if kind == "bert":
        return "vocab.txt (BERT WordPiece)"
    return f"tokenizer.json ({_plain_tokenizer_model(d / 'tokenizer.json')}, no jieba)"


def _plain_tokenizer_model(path: Path) -> str:
    try:
        model = read_json(path, "tokenizer").get("model") or {}
    except CheckpointError:
        return "unreadable"
    kind = model.get("type", "unknown model")
    vocab = model.get("vocab")
    if kind == "WordLevel" and isinstance(vocab, dict):
        tokens = [t for t in vocab if not (t.startswith("<") and t.endswith(">"))]
        if tokens and all(len(t) == 1 for t in tokens):  # train_char_tokenizer's: one id per character
            return "character-level WordLevel"
    return kind


@dataclass(frozen=True)
class WeightsReport:
    """What the weight files of a model directory hold, compared with its config (headers only)."""

    files: list[str]
    tensors: int
    params: int  # of the tensors found (a TP-split tensor counted once)
    dtype: str
    problems: list[str]  # one line each; empty when every name and shape matches the config

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect_weights(path: PathLike) -> WeightsReport:
    """Names and shapes of the real tensors (safetensors headers, memory-mapped torch files; no
    tensor data is read), checked against the directory's config."""
    d = resolve_model(path)
    if lora.is_adapter_dir(d):  # the base's weights (the adapter's are checked when it is loaded)
        d = resolve_model(lora.base_location(d, lora.read_base(d)))
    fmt = formats.detect(d)
    cfg, _ = fmt.read_config(d)
    files = fmt.weight_shapes(d)
    expected = fmt.expected_shapes(d, cfg)
    problems = []
    for file, found in files:
        problems += [f"{file.name}: {line}" for line in tables.compare_keys(found, expected)]
    params = _count_found(files, fmt.name == "megatron")
    return WeightsReport([str(f) for f, _ in files], sum(len(f) for _, f in files), params,
                         fmt.extra(d).get("dtype", "unknown"), problems)


def _count_found(files: list[tuple[Path, dict]], tp_split: bool) -> int:
    """Parameters in the files; with TP shards a replicated tensor is counted once (from rank 0)."""
    total = 0
    for rank, (_, found) in enumerate(files):
        for name, shape in found.items():
            try:
                split = tp_split and tables.partition_dim(name) is not None
            except CheckpointError:  # a name no table knows (reported as unexpected)
                split = False
            if rank == 0 or split:
                total += math.prod(shape)
    return total


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise CheckpointError(f"dtype={dtype!r} is not a torch floating dtype (e.g. 'float32', 'bfloat16')")
    return value


@dataclass(frozen=True)
class Pretrained:
    """What a model directory holds: the model and, beside it, its generation defaults.

    path: where its tokenizer is. With a LoRA adapter merged in: `adapter` is its directory and
    `base` the base model's (format is the base's)."""

    model: GPT
    generation: GenerationDefaults
    path: Path
    format: str
    adapter: Path | None = None
    base: Path | None = None


def load_pretrained(path: PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None, adapter: PathLike | None = None) -> Pretrained:
    """Load any supported model directory (format detected): the GPT, in eval mode, and its
    generation defaults (ModelScope's config.json eod_id, top_k, top_p, ...).

    path may also be a ModelScope id (`damo/nlp_gpt3_text-generation_1.3B`, see gpt3zh.hub), or a
    LoRA adapter directory that names its base (gpt3zh.checkpoint.lora); adapter: a LoRA adapter
    for the model at `path`. An adapter is merged into its base: the result is a plain GPT.
    dtype=None keeps the stored dtype. The model is built on the meta device and the checked
    tensors are assigned in place, so no memory is spent on a throwaway random init.
    """
    d = resolve_model(path)
    if adapter is not None or lora.is_adapter_dir(d):
        return _load_adapted(d, None if adapter is None else Path(adapter), device, dtype)
    fmt = formats.detect(d)
    cfg, gen = fmt.read_config(d)
    sd = fmt.read_weights(d, cfg, as_dtype(dtype))  # names and shapes checked against cfg
    if torch.device(device).type == "cpu":  # the weights CPU decoding streams: on huge pages where there are any
        hugepages.place(sd)
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return Pretrained(model.to(device).eval(), gen, d, fmt.name)


def _load_adapted(d: Path, adapter: Path | None, device, dtype) -> Pretrained:
    """Base + LoRA adapter, merged. d is the adapter directory (adapter None) or the base's."""
    where = adapter or d
    if not lora.is_adapter_dir(where):
        raise CheckpointError(f"{where}: not a LoRA adapter directory (no {lora.ADAPTER_CONFIG})")
    record = lora.read_base(where)
    base = d if adapter is not None else resolve_model(lora.base_location(where, record))
    if lora.is_adapter_dir(base):
        raise CheckpointError(f"{where}: its base {base} is itself a LoRA adapter; merge that one first "
                              f"(gpt3zh convert --merge-lora)")
    plain = load_pretrained(base, device, dtype)
    model = lora.merge_lora(lora.apply_adapter(plain.model, where, record)).eval()
    generation = plain.generation
    if adapter is None and record is not None and "generation" in record:
        generation = GenerationDefaults.from_dict(record["generation"], f"{where / lora.BASE_FILE} generation")
    has_tokenizer = any((where / name).is_file() for name in ("tokenizer.json", "vocab.txt"))
    return Pretrained(model, generation, where if has_tokenizer else plain.path, plain.format, where, plain.path)


def load_model(path: PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> GPT:
    """Load any supported model directory (format detected) as a GPT in eval mode (see
    load_pretrained for its generation defaults)."""
    return load_pretrained(path, device, dtype).model


def load_generation_defaults(path: PathLike) -> GenerationDefaults:
    """A model directory's generation defaults, read from its config files (no weights)."""
    d = resolve_model(path)
    return formats.detect(d).read_config(d)[1]


def save_model(
    model: GPT,
    out_dir: PathLike,
    format: str = "gpt3zh",
    tp: int = 1,
    tokenizer: Any = None,
    overwrite: bool = False,
    generation: GenerationDefaults | None = None,
) -> Path:
    """Write `model` as a model directory in `format`; tp > 1 only for "megatron".

    tokenizer: an object with .save(dir) (its files go next to the weights); a gpt3zh Tokenizer
    saved as "hf" is written as transformers loads it (checkpoint/hf_tokenizer.py). generation: the
    defaults written beside the config (default GenerationDefaults()). The directory is written to
    a temp dir and renamed into place, so a failure never damages an existing out_dir.
    """
    return _write(model, Path(out_dir), format, tp, overwrite, generation or GenerationDefaults(), tokenizer=tokenizer)


def convert(
    src: PathLike,
    dst: PathLike,
    to: str = "gpt3zh",
    tp: int = 1,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
    merge_lora: bool = False,
    adapter: PathLike | None = None,
) -> Path:
    """Convert a model directory (or ModelScope id) to another format, carrying its tokenizer along
    (see _carried_tokenizer).

    A ModelScope source's configuration.json is the base of the written one (pipeline and
    megatron blocks rewritten as ModelScope's own save_pretrained does). A LoRA adapter (src an
    adapter directory, or `adapter` for the model at src) is written merged into its base, as a
    plain model: merge_lora=True says so (without it an adapter is refused, so nobody takes a
    26 GB merged model for the 50 MB adapter they meant to copy).
    """
    src = resolve_model(src)
    _check_target(to, tp)  # before the (possibly large) load
    adapted = adapter is not None or lora.is_adapter_dir(src)
    if adapted and not merge_lora:
        raise CheckpointError(f"{adapter or src} is a LoRA adapter: pass merge_lora=True (--merge-lora) to write "
                              f"it merged into its base as a plain model")
    if merge_lora and not adapted:
        raise CheckpointError(f"--merge-lora: {src} is not a LoRA adapter directory (no {lora.ADAPTER_CONFIG}) and "
                              f"no adapter was given")
    loaded = load_pretrained(src, dtype=dtype, adapter=adapter)
    conf = (loaded.base or src) / "configuration.json"
    base = read_json(conf, "ModelScope configuration") if conf.is_file() else None
    tokenizer, copies = _carried_tokenizer(loaded.path, to)
    return _write(loaded.model, Path(dst), to, tp, overwrite, loaded.generation, tokenizer=tokenizer, base=base,
                  copies=copies)


def _carried_tokenizer(src: Path, to: str) -> tuple[Any, list[Path]]:
    """(a tokenizer to write, files to copy byte for byte): how the source's tokenizer travels.

    Files are copied as they are, except where the HF format needs its own layout: a gpt3zh or
    ModelScope tokenizer going to "hf" is written as transformers loads it, and one that gpt3zh wrote
    into an HF export goes back to gpt3zh's own layout when it leaves "hf". A transformers tokenizer
    that gpt3zh did not write is copied as is (gpt3zh cannot re-express it).
    """
    from ..tokenizer import load_tokenizer, written_by_gpt3zh_for_hf

    files = [src / name for name in formats.TOKENIZER_FILES if (src / name).is_file()]
    if not any(p.name != "tokenizer_config.json" for p in files):
        return None, files
    ours_in_hf = written_by_gpt3zh_for_hf(src)
    if not lora.is_adapter_dir(src) and formats.detect(src).name == "hf" and not ours_in_hf:
        return None, files
    if to == "hf" or ours_in_hf:
        return load_tokenizer(src), []
    return None, files


def _check_target(format: str, tp: int) -> None:
    if format not in formats.FORMATS:
        raise CheckpointError(f"unknown format {format!r} (expected one of: {', '.join(formats.FORMATS)})")
    if tp != 1 and format != "megatron":
        raise CheckpointError(f"tp={tp}: only the 'megatron' format is written as tensor-parallel shards")


def _write(model, out: Path, format: str, tp: int, overwrite: bool, generation: GenerationDefaults,
           tokenizer=None, base=None, copies=()) -> Path:
    _check_target(format, tp)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_output_dir(out, overwrite, formats.is_model_dir) as tmp:
        formats.FORMATS[format].write(sd, model.config, generation, tmp, tp, base, tokenizer)
        for path in copies:
            shutil.copy2(path, tmp / path.name)
    return out
