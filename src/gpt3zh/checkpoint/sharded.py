"""One tensor-parallel rank's slice of a checkpoint, read without the rest where the format allows.

`split` says how the serving layout cuts each gpt3zh-named tensor: {name: dim cut into tp equal,
contiguous parts, or None (kept whole)}; `gpt3zh.parallel.shard_dims` derives it from the TP plan.
What a rank reads, by source:

  megatron  k files mp_rank_XX: a tensor partitioned on the dim the layout cuts is read from the
            files whose range overlaps this rank's (k == tp: its own file only; tp a multiple of k:
            one file; k a multiple of tp: k/tp files). The vocab embedding, which the serving
            layout keeps whole, is read from every file (that tensor only); replicated tensors from
            one. Files are memory-mapped, so only the bytes touched are read.
  gpt3zh    model.safetensors: safetensors slices, so only this rank's bytes.
  dcp       a distributed-trainer checkpoint (step-XXXXXXXX/ with dcp/ and meta.json):
            torch.distributed.checkpoint reads the chunks that overlap this rank's slices, whatever
            the (dp, tp) it was saved at. A collective: every rank calls it together.
  modelscope, hf
            single files whose foreign layout (blocked qkv, transposed Conv1D) has no contiguous
            slice: every rank reads the whole file through the format's own reader (memory-mapped
            where torch.load allows) and keeps its slice. For large models convert first
            (`gpt3zh convert SRC DST --to gpt3zh`, or `--to megatron --tp N`).

Every tensor is checked by name and shape first (the files' own key names in the errors), as
the whole-model readers do, and the slices are copied out, so no file stays mapped.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, GenerationDefaults, GPTConfig
from ..hub import resolve_model
from . import formats, tables
from .errors import CheckpointError
from .files import SafetensorsFile, load_torch, read_json

DCP_DIR = "dcp"  # training.distributed.DCP_DIR: the layout of a distributed-trainer checkpoint
Split = dict[str, int | None]


@dataclass(frozen=True)
class Source:
    """What to serve, known before any weight is read (so a bad layout fails first)."""

    path: Path
    format: str  # a model directory's format, or "dcp"
    config: GPTConfig
    generation: GenerationDefaults | None  # None: a preset run's checkpoint (eod = its tokenizer's <sep>)
    tokenizer: Path  # where its tokenizer files are
    extra: dict[str, Any] = field(default_factory=dict)


def describe_source(path: str | os.PathLike) -> Source:
    """A model directory (any format) or a distributed-trainer checkpoint, without its weights."""
    d = resolve_model(path)
    if (d / DCP_DIR / ".metadata").is_file():
        return _dcp_source(d)
    fmt = formats.detect(d)
    cfg, gen = fmt.read_config(d)  # config files only: the weights are not touched yet
    return Source(d, fmt.name, cfg, gen, d)


def read_tp_shard(src: Source, split: Split, rank: int, tp: int, dtype: torch.dtype | None = None,
                  mesh=None) -> tuple[dict[str, torch.Tensor], str]:
    """(this rank's gpt3zh-named tensors, a line saying what it read). `mesh`: the 1-D tp
    DeviceMesh, needed for "dcp" at tp > 1 (tp = 1 reads without a process group). dtype None
    keeps the stored dtype."""
    names = set(tables.our_shapes(src.config))
    if set(split) != names:
        raise CheckpointError(f"split does not name the model's tensors: {sorted(set(split) ^ names)[:8]}")
    if not 0 <= rank < tp:
        raise CheckpointError(f"rank {rank} is outside tensor parallelism {tp}")
    if src.format == "megatron":
        return _read_megatron(src, split, rank, tp, dtype)
    if src.format == "gpt3zh":
        return _read_safetensors(src, split, rank, tp, dtype)
    if src.format == "dcp":
        if mesh is None and tp > 1:
            raise CheckpointError("reading a distributed checkpoint at tp > 1 needs the tp DeviceMesh")
        return _read_dcp(src, split, mesh, dtype)
    fmt = formats.FORMATS[src.format]
    sd = fmt.read_weights(src.path, src.config, dtype)
    out = {name: _own(_cut(sd.pop(name), split[name], rank, tp), None) for name in list(sd)}
    return out, f"read the whole {src.format} checkpoint and kept its slice (the format has no sliced reads)"


def _cut(t: torch.Tensor, dim: int | None, rank: int, tp: int) -> torch.Tensor:
    if dim is None:
        return t
    size = t.shape[dim] // tp
    return t.narrow(dim, rank * size, size)


def read_whole(src: Source, dtype: torch.dtype | None = None):
    """The whole model of a Source as a GPT in eval mode on the CPU (one process; any format)."""
    from ..model import GPT

    with torch.device("meta"):
        model = GPT(src.config)
    state, _ = read_tp_shard(src, dict.fromkeys(model.state_dict()), 0, 1, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _own(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A contiguous copy (so nothing keeps the file's mapping alive), cast."""
    return t.to(dtype=dtype or t.dtype, memory_format=torch.contiguous_format, copy=True)


# --------------------------------------------------------------------------------------------- Megatron
def _read_megatron(src: Source, split: Split, rank: int, tp: int, dtype) -> tuple[dict, str]:
    cfg, paths = src.config, formats.MegatronFormat.shard_paths(src.path)
    k = len(paths)
    formats._check_tp(cfg, k, f"{src.path / 'model'}: {k} shards")
    expected = tables.foreign_shapes(tables.MEGATRON, cfg, k)
    opened: dict[int, dict[str, torch.Tensor]] = {}

    def shard(j: int) -> dict[str, torch.Tensor]:
        if j not in opened:  # memory-mapped: tensors are read when sliced below
            obj = load_torch(paths[j], "Megatron tensor-parallel shard")
            sd = formats._tensor_dict(obj["module"] if isinstance(obj, dict) and "module" in obj else obj, paths[j])
            tables.check_keys(formats._shapes(sd), expected, str(paths[j]),
                              formats._why(cfg, src.path / "config.json", k))
            opened[j] = sd
        return opened[j]

    home = rank * k // tp  # the file holding this rank's first rows: replicated tensors come from it
    used, whole = {home}, set()  # files read for this rank's slices / only for tensors kept whole
    out = {}
    for row in tables.expand(tables.MEGATRON, cfg.n_layer):
        want, part = split[row.ours], row.partition
        if part is None:
            out[row.ours] = _own(_cut(shard(home)[row.theirs], want, rank, tp), dtype)
            continue
        if want not in (None, part):
            raise CheckpointError(f"{row.ours}: the serving layout cuts dim {want}, the Megatron files dim {part}")
        n = expected[row.theirs][part] * k
        lo, hi = (0, n) if want is None else (rank * n // tp, (rank + 1) * n // tp)
        c = n // k  # rows per file
        files = range(lo // c, (hi - 1) // c + 1)
        (whole if want is None else used).update(files)
        pieces = [shard(j)[row.theirs].narrow(part, max(lo, j * c) - j * c, min(hi, (j + 1) * c) - max(lo, j * c))
                  for j in files]
        out[row.ours] = _own(torch.cat(pieces, part) if len(pieces) > 1 else pieces[0], dtype)
    names = ", ".join(paths[j].name for j in sorted(used))
    more = len(whole - used)
    extra = f" (and the vocab embedding's rows from {more} more)" if more else ""
    return out, f"read {names} of {k} Megatron shards{extra}"


# ------------------------------------------------------------------------------------------ safetensors
def _read_safetensors(src: Source, split: Split, rank: int, tp: int, dtype) -> tuple[dict, str]:
    from safetensors import safe_open

    path = src.path / formats.Gpt3zhFormat.weights
    shapes = SafetensorsFile(path, "model weights").shapes()  # a clear error for a bad file
    expected = tables.foreign_shapes(tables.GPT3ZH, src.config)
    tables.check_keys(shapes, expected, str(path), formats._why(src.config, src.path / "config.json"))
    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name, shape in expected.items():
            index = [slice(None)] * len(shape)
            dim = split[name]
            if dim is not None:
                size = shape[dim] // tp
                index[dim] = slice(rank * size, (rank + 1) * size)
            out[name] = _own(f.get_slice(name)[tuple(index)], dtype)  # reads only these bytes
    return out, f"read its slices of {path.name}"


# ------------------------------------------------------------------------------------------------- DCP
def _dcp_source(d: Path) -> Source:
    """The architecture and tokenizer of a distributed-trainer checkpoint, from its meta.json (the
    run's config, as the trainer wrote it); paths in it are relative to the current directory, as
    they were for the run."""
    meta_path = d / "meta.json"
    meta = read_json(meta_path, "distributed checkpoint metadata")
    run = meta.get("config")
    if not isinstance(run, dict) or not isinstance(run.get("model"), dict):
        raise CheckpointError(f"{meta_path}: expected the run's config under 'config' with a 'model' section")
    model = run["model"]
    try:
        if model.get("preset") is not None:
            cfg = GPTConfig.from_preset(model["preset"], **(model.get("overrides") or {}))
            generation = None  # the trainer saves these runs with eod = the tokenizer's <sep>
        else:
            base = resolve_model(model["path"])
            cfg, generation = formats.detect(base).read_config(base)
    except (ConfigError, TypeError, KeyError) as err:
        raise CheckpointError(f"{meta_path}: config.model: {err}") from None
    tokenizer = run.get("tokenizer") or model.get("path")
    if tokenizer is None:
        raise CheckpointError(f"{meta_path}: the run names no tokenizer (config.tokenizer)")
    saved = meta.get("parallel") or {}
    return Source(d, "dcp", cfg, generation, resolve_model(tokenizer), {"saved_at": saved, "step": d.name})


def _read_dcp(src: Source, split: Split, mesh, dtype) -> tuple[dict, str]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard

    dcp_dir = src.path / DCP_DIR
    stored = dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata
    ours = tables.our_shapes(src.config)
    found = {k.removeprefix("model."): tuple(v.size) for k, v in stored.items()
             if k.startswith("model.") and hasattr(v, "size")}
    tables.check_keys(found, ours, str(dcp_dir), formats._why(src.config, src.path / "meta.json"))
    tp = 1 if mesh is None else mesh.size()
    state: dict[str, torch.Tensor] = {}
    for name, shape in ours.items():
        kind = dtype or stored[f"model.{name}"].properties.dtype
        dim = split[name]
        if dim is None:
            state[name] = torch.empty(shape, dtype=kind)
        else:
            local = list(shape)
            local[dim] //= tp
            # a DTensor target: DCP reads only the stored chunks that overlap this rank's slice
            state[name] = DTensor.from_local(torch.empty(local, dtype=kind), mesh, [Shard(dim)], run_check=False)
    with warnings.catch_warnings():  # one process, no group: DCP says it assumes so, which is the intent
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load({"model": state}, checkpoint_id=str(dcp_dir), no_dist=mesh is None)
    out = {n: (t.to_local() if isinstance(t, DTensor) else t) for n, t in state.items()}
    return out, f"read its chunks of {src.path.name}/{DCP_DIR} (saved at {src.extra.get('saved_at')})"
