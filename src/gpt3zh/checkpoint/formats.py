"""The four on-disk formats: how each is detected, read and written.

Every reader returns gpt3zh-named tensors that already passed a name-and-shape check against the
config, so a wrong file fails here with the file's own key names, not deep inside load_state_dict.

  gpt3zh      config.json {"format": "gpt3zh", "model", "generation"} + model.safetensors
  modelscope  config.json + pytorch_model.bin (+ configuration.json without a megatron block)
  megatron    config.json + configuration.json with a megatron block + model/mp_rank_XX_model_states.pt
  hf          config.json (model_type gpt2) + generation_config.json + model.safetensors
  and, read-only, a training checkpoint: config.json {"format": "gpt3zh-train"} + state.pt
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, GenerationDefaults, GPTConfig
from . import configs, tables
from .errors import CheckpointError
from .files import (
    SafetensorsFile,
    dcp_tensor_entries,
    load_dcp_tensors,
    load_torch,
    read_json,
    require_file,
    save_safetensors,
    save_torch,
    write_json,
)
from .tp import merge_state_dicts, split_state_dict

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected tensors only, but these keys hold other values: "
                              f"{', '.join(map(str, bad[:8]))}")
    return obj


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _why(cfg: GPTConfig, config_path: Path, tp: int = 1) -> str:
    shards = f", split over {tp} TP shards" if tp > 1 else ""
    return (
        f"{config_path.name} says vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, n_layer={cfg.n_layer}, "
        f"n_head={cfg.n_head}, ffn={cfg.ffn_dim}, max_seq_len={cfg.max_seq_len}{shards}"
    )


# ----------------------------------------------------------------------------------------------- gpt3zh
class Gpt3zhFormat:
    name = "gpt3zh"
    weights = "model.safetensors"

    @staticmethod
    def matches(d: Path, config: dict) -> bool:
        return config.get("format") == "gpt3zh"

    @classmethod
    def read_config(cls, d: Path) -> tuple[GPTConfig, GenerationDefaults]:
        return _own_config(read_json(d / "config.json"), d / "config.json")

    @classmethod
    def extra(cls, d: Path) -> dict[str, Any]:
        return {"dtype": _safetensors_dtype(d / cls.weights)}

    @classmethod
    def weight_shapes(cls, d: Path) -> list[tuple[Path, dict[str, tuple]]]:
        st = SafetensorsFile(d / cls.weights, "model weights")  # the header only: no tensor is read
        return [(st.path, st.shapes())]

    @classmethod
    def expected_shapes(cls, d: Path, cfg: GPTConfig) -> dict[str, torch.Size]:
        return tables.foreign_shapes(tables.GPT3ZH, cfg)

    @classmethod
    def read_weights(cls, d: Path, cfg: GPTConfig, dtype) -> dict[str, torch.Tensor]:
        st = SafetensorsFile(d / cls.weights, "model weights")
        tables.check_keys(st.shapes(), cls.expected_shapes(d, cfg), str(st.path), _why(cfg, d / "config.json"))
        return tables.from_foreign(st, tables.GPT3ZH, cfg, dtype)

    @classmethod
    def write(cls, sd, cfg, gen, out: Path, tp: int, base: dict | None, tokenizer=None) -> None:
        write_json(out / "config.json", {"format": "gpt3zh", "model": cfg.to_dict(), "generation": gen.to_dict()})
        save_safetensors(sd, out / cls.weights)
        _save_tokenizer(tokenizer, out)


def _own_config(data: dict, path: Path) -> tuple[GPTConfig, GenerationDefaults]:
    """(model, generation) of a gpt3zh config.json: {"format", "model": {...}, "generation": {...}}."""
    for key in ("model", "generation"):
        if not isinstance(data.get(key), dict):
            raise CheckpointError(f"{path}: expected an object under {key!r} (a gpt3zh config.json)")
    try:
        cfg = GPTConfig.from_dict(data["model"], where=f"{path} [model]")
        gen = GenerationDefaults.from_dict(data["generation"], where=f"{path} [generation]")
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    return cfg, gen


# ------------------------------------------------------------------------------- training checkpoint
class TrainCheckpointFormat:
    """A training checkpoint, work_dir/checkpoints/step-N: config.json {"format": "gpt3zh-train"},
    state.pt (the model's and optimizer's state dicts, ...), meta.json, the tokenizer files.

    Read-only: load_model / eval / info / convert (and `gpt3zh export`) take one as they take a
    model directory. Checkpoints written before config.json was added are read through meta.json.
    A parallel run's checkpoint keeps its weights in dcp/ (torch.distributed.checkpoint), read here
    in one process through a restricted reader (files.load_dcp_tensors).
    """

    name = "train-checkpoint"
    state = "state.pt"
    tag = "gpt3zh-train"

    @classmethod
    def matches(cls, d: Path, config: dict) -> bool:
        return config.get("format") == cls.tag

    @classmethod
    def is_legacy(cls, d: Path) -> bool:
        return not (d / "config.json").exists() and (d / cls.state).is_file() and (d / "meta.json").is_file()

    @classmethod
    def read_config(cls, d: Path) -> tuple[GPTConfig, GenerationDefaults]:
        if not cls.is_legacy(d):
            return _own_config(read_json(d / "config.json"), d / "config.json")
        return _legacy_train_config(read_json(d / "meta.json", "training checkpoint metadata"), d / "meta.json")

    @classmethod
    def extra(cls, d: Path) -> dict[str, Any]:
        meta = read_json(d / "meta.json", "training checkpoint metadata") if (d / "meta.json").is_file() else {}
        if (d / "dcp").is_dir():
            first = next(iter(dcp_tensor_entries(d / "dcp", "model").values()))
            return {"step": meta.get("step"), "dtype": _dtype_name(first.properties.dtype),
                    "parallel": meta.get("parallel")}
        t = next(iter(cls.model_state(d).values()), None)
        return {"step": meta.get("step"), "dtype": _dtype_name(t.dtype) if t is not None else "unknown"}

    @classmethod
    def model_state(cls, d: Path) -> dict[str, torch.Tensor]:
        path = d / cls.state
        if (d / "dcp").is_dir():
            return load_dcp_tensors(d / "dcp", "model")
        state = load_torch(path, "training checkpoint")  # memory-mapped: the optimizer state is never read
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointError(f"{path}: expected a training state with a 'model' state dict")
        return _tensor_dict(state["model"], path)

    @classmethod
    def weight_shapes(cls, d: Path) -> list[tuple[Path, dict[str, tuple]]]:
        if (d / "dcp").is_dir():  # the metadata alone
            return [(d / "dcp", {k: tuple(v.size) for k, v in dcp_tensor_entries(d / "dcp", "model").items()})]
        return [(d / cls.state, _shapes(cls.model_state(d)))]

    @classmethod
    def expected_shapes(cls, d: Path, cfg: GPTConfig) -> dict[str, torch.Size]:
        return tables.foreign_shapes(tables.GPT3ZH, cfg)

    @classmethod
    def read_weights(cls, d: Path, cfg: GPTConfig, dtype) -> dict[str, torch.Tensor]:
        why = _why(cfg, d / ("meta.json" if cls.is_legacy(d) else "config.json"))
        [(where, shapes)] = cls.weight_shapes(d)
        tables.check_keys(shapes, cls.expected_shapes(d, cfg), str(where), why)  # before any tensor is read
        sd = cls.model_state(d)
        return tables.from_foreign(sd, tables.GPT3ZH, cfg, dtype)

    @classmethod
    def write(cls, sd, cfg, gen, out: Path, tp: int, base: dict | None) -> None:
        raise CheckpointError("training checkpoints are written by the trainer; convert to 'gpt3zh' instead")


def _legacy_train_config(meta: dict, path: Path) -> tuple[GPTConfig, GenerationDefaults]:
    """The model of a checkpoint without config.json, from the run's config kept in meta.json."""
    model = (meta.get("config") or {}).get("model") or {}
    if model.get("preset"):
        try:
            cfg = GPTConfig.from_preset(model["preset"], **(model.get("overrides") or {}))
        except (ConfigError, TypeError) as err:
            raise CheckpointError(f"{path}: {err}") from None
        # as the trainer saved such runs: generation stops at the tokenizer's <sep>
        return cfg, GenerationDefaults(eod_id=_legacy_sep_id(meta["config"].get("tokenizer"), path))
    source = Path(model.get("path") or "")
    if not model.get("path") or not source.is_dir():
        raise CheckpointError(
            f"{path}: an old checkpoint without config.json whose model came from {model.get('path')!r}, "
            f"which is not found from here; run from the directory the training ran in"
        )
    return detect(source).read_config(source)


def _legacy_sep_id(tokenizer: str | None, path: Path) -> int:
    from ..tokenizer import load_tokenizer

    try:
        return load_tokenizer(tokenizer).sep_id
    except (OSError, ValueError, TypeError):
        raise CheckpointError(
            f"{path}: an old checkpoint without config.json; its tokenizer {tokenizer!r} (for the stop id) "
            f"is not found from here; run from the directory the training ran in"
        ) from None


# ----------------------------------------------------------------------------------- ModelScope single
class ModelScopeFormat:
    name = "modelscope"
    weights = "pytorch_model.bin"

    @staticmethod
    def matches(d: Path, config: dict) -> bool:
        return True  # the fallback: ModelScope's own rule is "no megatron block -> single-process"

    @classmethod
    def read_config(cls, d: Path) -> tuple[GPTConfig, GenerationDefaults]:
        return configs.modelscope_to_config(read_json(d / "config.json"), d / "config.json", megatron=False)

    @classmethod
    def extra(cls, d: Path) -> dict[str, Any]:
        return {"dtype": _first_dtype(d / cls.weights)}

    @classmethod
    def state_dict(cls, d: Path) -> dict[str, torch.Tensor]:
        """The file's tensors under ModelScope's names (memory-mapped: read only when used)."""
        path = d / cls.weights
        sd = load_torch(path, "ModelScope weights")
        if isinstance(sd, dict) and "state_dict" in sd:  # as GPT3Model.from_pretrained unwraps it
            sd = sd["state_dict"]
        sd = _tensor_dict(sd, path)
        # GPT3Model.from_pretrained renames model.language_model -> language_model (trainer output)
        return {k.removeprefix("model.") if k.startswith("model.language_model.") else k: v for k, v in sd.items()}

    @classmethod
    def weight_shapes(cls, d: Path) -> list[tuple[Path, dict[str, tuple]]]:
        return [(d / cls.weights, _shapes(cls.state_dict(d)))]

    @classmethod
    def expected_shapes(cls, d: Path, cfg: GPTConfig) -> dict[str, torch.Size]:
        return tables.foreign_shapes(tables.MODELSCOPE, cfg)

    @classmethod
    def read_weights(cls, d: Path, cfg: GPTConfig, dtype) -> dict[str, torch.Tensor]:
        sd = cls.state_dict(d)
        tables.check_keys(_shapes(sd), cls.expected_shapes(d, cfg), str(d / cls.weights), _why(cfg, d / "config.json"))
        return tables.from_foreign(sd, tables.MODELSCOPE, cfg, dtype)

    @classmethod
    def write(cls, sd, cfg, gen, out: Path, tp: int, base: dict | None, tokenizer=None) -> None:
        configs.check_single_process_compatible(cfg)
        dtype = _dtype_name(next(iter(sd.values())).dtype)
        write_json(out / "config.json", configs.config_to_modelscope(cfg, gen, megatron=False, dtype=dtype))
        write_json(out / "configuration.json", configs.single_configuration(base))
        save_torch(tables.to_foreign(sd, tables.MODELSCOPE, cfg), out / cls.weights)
        _save_tokenizer(tokenizer, out)


# --------------------------------------------------------------------------------------------- Megatron
_SHARD = re.compile(r"mp_rank_(\d{2})_model_states\.pt")


def _shard_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


class MegatronFormat:
    name = "megatron"

    @staticmethod
    def matches(d: Path, config: dict) -> bool:
        conf = d / "configuration.json"
        return conf.is_file() and "megatron" in read_json(conf, "ModelScope configuration")

    @classmethod
    def read_config(cls, d: Path) -> tuple[GPTConfig, GenerationDefaults]:
        return configs.modelscope_to_config(read_json(d / "config.json"), d / "config.json", megatron=True)

    @classmethod
    def extra(cls, d: Path) -> dict[str, Any]:
        shards = cls.shard_paths(d)
        flags = read_json(d / "config.json")
        extra = {"tp": len(shards), "dtype": _first_dtype(shards[0])}
        if flags.get("fp16") or flags.get("bf16"):  # ModelScope would cast the whole model to this
            extra["runtime_dtype"] = "float16" if flags.get("fp16") else "bfloat16"
        return extra

    @staticmethod
    def shard_paths(d: Path) -> list[Path]:
        """model/mp_rank_00.. in rank order; a gap (00 and 02 but no 01) is an error."""
        model_dir = d / "model"
        ranks = sorted(int(m.group(1)) for p in model_dir.glob("mp_rank_*") if (m := _SHARD.fullmatch(p.name)))
        if not ranks:
            raise CheckpointError(f"{model_dir}: no tensor-parallel shards found (expected {_shard_name(0)}, ...)")
        missing = [r for r in range(ranks[-1] + 1) if r not in ranks]
        if missing:
            raise CheckpointError(
                f"{model_dir}: shard {_shard_name(missing[0])} is missing: found ranks "
                f"{', '.join(f'{r:02d}' for r in ranks)}, expected 00..{ranks[-1]:02d} with no gap"
            )
        return [model_dir / _shard_name(r) for r in ranks]

    @classmethod
    def shards(cls, d: Path) -> list[tuple[Path, dict[str, torch.Tensor]]]:
        out = []
        for path in cls.shard_paths(d):  # memory-mapped: a shard's tensors are read only when merged
            obj = load_torch(path, "Megatron tensor-parallel shard")
            out.append((path, _tensor_dict(obj["module"] if isinstance(obj, dict) and "module" in obj else obj, path)))
        return out

    @classmethod
    def weight_shapes(cls, d: Path) -> list[tuple[Path, dict[str, tuple]]]:
        return [(path, _shapes(sd)) for path, sd in cls.shards(d)]

    @classmethod
    def expected_shapes(cls, d: Path, cfg: GPTConfig) -> dict[str, torch.Size]:
        """Per tensor-parallel rank."""
        tp = len(cls.shard_paths(d))
        _check_tp(cfg, tp, f"{d / 'model'}: {tp} shards")
        return tables.foreign_shapes(tables.MEGATRON, cfg, tp)

    @classmethod
    def read_weights(cls, d: Path, cfg: GPTConfig, dtype) -> dict[str, torch.Tensor]:
        expected = cls.expected_shapes(d, cfg)
        shards = cls.shards(d)
        for path, sd in shards:
            tables.check_keys(_shapes(sd), expected, str(path), _why(cfg, d / "config.json", len(shards)))
        return tables.from_foreign(merge_state_dicts([sd for _, sd in shards]), tables.MEGATRON, cfg, dtype)

    @classmethod
    def write(cls, sd, cfg, gen, out: Path, tp: int, base: dict | None, tokenizer=None) -> None:
        _check_tp(cfg, tp, f"tp={tp}")
        dtype = _dtype_name(next(iter(sd.values())).dtype)
        write_json(out / "config.json", configs.config_to_modelscope(cfg, gen, megatron=True, dtype=dtype))
        write_json(out / "configuration.json", configs.megatron_configuration(base, tp))
        (out / "model").mkdir()
        megatron_sd = tables.to_foreign(sd, tables.MEGATRON, cfg)
        for rank, shard in enumerate(split_state_dict(megatron_sd, tp, n_head=cfg.n_head)):
            save_torch({"module": shard}, out / "model" / _shard_name(rank))
        _save_tokenizer(tokenizer, out)


def _save_tokenizer(tokenizer, out: Path) -> None:
    if tokenizer is not None:
        tokenizer.save(out)  # gpt3zh's own layout: the source file byte for byte + tokenizer_config.json


def _check_tp(cfg: GPTConfig, tp: int, what: str) -> None:
    for name, size in (("n_head", cfg.n_head), ("vocab_size", cfg.vocab_size), ("ffn width", cfg.ffn_dim)):
        if size % tp:
            raise CheckpointError(f"{what}: tensor parallelism {tp} does not divide {name}={size}")


# --------------------------------------------------------------------------------------- HF GPT-2
_HF_IGNORED = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old GPT-2 files


class HFFormat:
    name = "hf"
    weights = "model.safetensors"

    @staticmethod
    def matches(d: Path, config: dict) -> bool:
        return config.get("model_type") == "gpt2"

    @classmethod
    def read_config(cls, d: Path) -> tuple[GPTConfig, GenerationDefaults]:
        gen_path = d / "generation_config.json"
        gen_d = read_json(gen_path) if gen_path.is_file() else {}
        return configs.hf_to_config(read_json(d / "config.json"), gen_d, d / "config.json")

    @classmethod
    def extra(cls, d: Path) -> dict[str, Any]:
        path = cls.weights_path(d)
        return {"dtype": _safetensors_dtype(path) if path.suffix == ".safetensors" else _first_dtype(path)}

    @classmethod
    def weights_path(cls, d: Path) -> Path:
        for name in (cls.weights, "pytorch_model.bin"):
            if (d / name).is_file():
                return d / name
        raise CheckpointError(f"{d}: no HF weights file found (expected {cls.weights} or pytorch_model.bin)")

    @classmethod
    def tensors(cls, d: Path) -> tuple[Path, Mapping, dict[str, tuple], _Renamed]:
        """(file, its tensors, their shapes, the model's tensors under GPT2LMHeadModel names)."""
        path = cls.weights_path(d)
        if path.suffix == ".safetensors":
            src = SafetensorsFile(path, "HF weights")
            shapes = src.shapes()
        else:
            src = _tensor_dict(load_torch(path, "HF weights"), path)
            shapes = _shapes(src)
        keys = [k for k in src if not _HF_IGNORED.match(k) and k != "lm_head.weight"]
        # GPT2Model files (no LM head) name their tensors without the "transformer." prefix
        prefix = "" if any(k.startswith("transformer.") for k in keys) else "transformer."
        return path, src, shapes, _Renamed(src, {prefix + k: k for k in keys})

    @classmethod
    def weight_shapes(cls, d: Path) -> list[tuple[Path, dict[str, tuple]]]:
        path, _, shapes, renamed = cls.tensors(d)
        return [(path, {new: shapes[old] for new, old in renamed.names.items()})]

    @classmethod
    def expected_shapes(cls, d: Path, cfg: GPTConfig) -> dict[str, torch.Size]:
        return tables.foreign_shapes(tables.HF, cfg)

    @classmethod
    def read_weights(cls, d: Path, cfg: GPTConfig, dtype) -> dict[str, torch.Tensor]:
        path, src, shapes, renamed = cls.tensors(d)
        found = {new: shapes[old] for new, old in renamed.names.items()}
        tables.check_keys(found, cls.expected_shapes(d, cfg), str(path), _why(cfg, d / "config.json"))
        if "lm_head.weight" in shapes and not torch.equal(src["lm_head.weight"], renamed["transformer.wte.weight"]):
            raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight; "
                                  "gpt3zh needs a tied output head")
        return tables.from_foreign(renamed, tables.HF, cfg, dtype)

    @classmethod
    def write(cls, sd, cfg, gen, out: Path, tp: int, base: dict | None, tokenizer=None) -> None:
        from . import hf_tokenizer  # tokenizers is imported only when a model is written as HF

        dtype = _dtype_name(next(iter(sd.values())).dtype)
        config, generation = configs.config_to_hf(cfg, gen, dtype, **hf_tokenizer.generation_ids(tokenizer))
        write_json(out / "config.json", config)
        write_json(out / "generation_config.json", generation)
        save_safetensors(tables.to_foreign(sd, tables.HF, cfg), out / cls.weights)  # tied head not stored
        if tokenizer is not None:
            hf_tokenizer.save(tokenizer, out, cfg.max_seq_len)


class _Renamed(Mapping):
    """A lazy {new name: tensor} view of a tensor mapping whose keys are renamed."""

    def __init__(self, src: Mapping, names: dict[str, str]) -> None:
        self.src, self.names = src, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.src[self.names[name]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _safetensors_dtype(path: Path) -> str:
    dtype = SafetensorsFile(path, "weights").dtype()
    return _SAFETENSORS_DTYPES.get(dtype, dtype)


def _first_dtype(path: Path) -> str:
    """dtype of the first tensor in a torch file (memory-mapped, so nothing big is read)."""
    obj = load_torch(require_file(path, "weights"), "weights")
    for key in ("module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    t = next((v for v in obj.values() if isinstance(v, torch.Tensor)), None) if isinstance(obj, dict) else None
    return _dtype_name(t.dtype) if t is not None else "unknown"


# Detection order: explicit markers first (our format tag, HF's model_type), then ModelScope's rule.
FORMATS = {f.name: f for f in (Gpt3zhFormat, HFFormat, MegatronFormat, ModelScopeFormat)}


def detect(d: Path):
    if not d.exists():
        raise CheckpointError(f"{d}: no such model directory")
    if not d.is_dir():
        raise CheckpointError(f"{d}: expected a model directory, got a file")
    if TrainCheckpointFormat.is_legacy(d):
        return TrainCheckpointFormat
    config = read_json(d / "config.json", "model config")
    if TrainCheckpointFormat.matches(d, config):  # read-only: not in FORMATS, the formats one can write
        return TrainCheckpointFormat
    return next(f for f in FORMATS.values() if f.matches(d, config))


def is_model_dir(d: Path) -> bool:
    try:
        detect(d)
        return True
    except CheckpointError:
        return False
