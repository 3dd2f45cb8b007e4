"""Name tables: gpt3zh parameter names <-> each foreign format's names.

One table per foreign format. A row maps a gpt3zh name template to the foreign name template, the
transform that turns our tensor into theirs, and (Megatron only) the tensor-parallel partition dim
of the tensor: 0 column-parallel or vocab-parallel, 1 row-parallel, None replicated.
`{i}` is the layer index. ModelScope / Megatron / HF names appear nowhere else in the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import GPTConfig
from .errors import CheckpointError
from .files import progress
from .transforms import CONV1D, IDENTITY, QKV_BLOCKED, QKV_BLOCKED_CONV1D, Transform


@dataclass(frozen=True)
class Row:
    ours: str
    theirs: str
    transform: Transform = IDENTITY
    partition: int | None = None  # Megatron TP partition dim in the foreign layout


def _layer_rows(ours_to_theirs: dict[str, tuple]) -> list[Row]:
    return [Row(f"blocks.{{i}}.{k}", *v) for k, v in ours_to_theirs.items()]


_MS_LAYER = "language_model.transformer.layers.{i}."
MODELSCOPE = [
    Row("tok_emb.weight", "language_model.word_embeddings.weight"),
    Row("pos_emb.weight", "language_model.position_embeddings.weight"),
    *_layer_rows({
        "ln_1.weight": (_MS_LAYER + "input_layernorm.weight",),
        "ln_1.bias": (_MS_LAYER + "input_layernorm.bias",),
        "attn.qkv.weight": (_MS_LAYER + "attention.query_key_value.weight", QKV_BLOCKED),
        "attn.qkv.bias": (_MS_LAYER + "attention.query_key_value.bias", QKV_BLOCKED),
        "attn.proj.weight": (_MS_LAYER + "attention.dense.weight",),
        "attn.proj.bias": (_MS_LAYER + "attention.dense.bias",),
        "ln_2.weight": (_MS_LAYER + "post_attention_layernorm.weight",),
        "ln_2.bias": (_MS_LAYER + "post_attention_layernorm.bias",),
        "mlp.fc.weight": (_MS_LAYER + "mlp.dense_h_to_4h.weight",),
        "mlp.fc.bias": (_MS_LAYER + "mlp.dense_h_to_4h.bias",),
        "mlp.proj.weight": (_MS_LAYER + "mlp.dense_4h_to_h.weight",),
        "mlp.proj.bias": (_MS_LAYER + "mlp.dense_4h_to_h.bias",),
    }),
    Row("ln_f.weight", "language_model.transformer.final_layernorm.weight"),
    Row("ln_f.bias", "language_model.transformer.final_layernorm.bias"),
]

# Megatron keeps our per-head qkv layout, so every row is the identity; only TP partitioning differs.
_MG_LAYER = "language_model.encoder.layers.{i}."
MEGATRON = [
    Row("tok_emb.weight", "language_model.embedding.word_embeddings.weight", IDENTITY, 0),
    Row("pos_emb.weight", "language_model.embedding.position_embeddings.weight"),
    *_layer_rows({
        "ln_1.weight": (_MG_LAYER + "input_layernorm.weight",),
        "ln_1.bias": (_MG_LAYER + "input_layernorm.bias",),
        "attn.qkv.weight": (_MG_LAYER + "self_attention.query_key_value.weight", IDENTITY, 0),
        "attn.qkv.bias": (_MG_LAYER + "self_attention.query_key_value.bias", IDENTITY, 0),
        "attn.proj.weight": (_MG_LAYER + "self_attention.dense.weight", IDENTITY, 1),
        "attn.proj.bias": (_MG_LAYER + "self_attention.dense.bias",),
        "ln_2.weight": (_MG_LAYER + "post_attention_layernorm.weight",),
        "ln_2.bias": (_MG_LAYER + "post_attention_layernorm.bias",),
        "mlp.fc.weight": (_MG_LAYER + "mlp.dense_h_to_4h.weight", IDENTITY, 0),
        "mlp.fc.bias": (_MG_LAYER + "mlp.dense_h_to_4h.bias", IDENTITY, 0),
        "mlp.proj.weight": (_MG_LAYER + "mlp.dense_4h_to_h.weight", IDENTITY, 1),
        "mlp.proj.bias": (_MG_LAYER + "mlp.dense_4h_to_h.bias",),
    }),
    Row("ln_f.weight", "language_model.encoder.final_layernorm.weight"),
    Row("ln_f.bias", "language_model.encoder.final_layernorm.bias"),
]

# HF GPT-2: Conv1D weights are (in, out), and c_attn's out-features are [3, N, D].
_HF_LAYER = "transformer.h.{i}."
HF = [
    Row("tok_emb.weight", "transformer.wte.weight"),
    Row("pos_emb.weight", "transformer.wpe.weight"),
    *_layer_rows({
        "ln_1.weight": (_HF_LAYER + "ln_1.weight",),
        "ln_1.bias": (_HF_LAYER + "ln_1.bias",),
        "attn.qkv.weight": (_HF_LAYER + "attn.c_attn.weight", QKV_BLOCKED_CONV1D),
        "attn.qkv.bias": (_HF_LAYER + "attn.c_attn.bias", QKV_BLOCKED),
        "attn.proj.weight": (_HF_LAYER + "attn.c_proj.weight", CONV1D),
        "attn.proj.bias": (_HF_LAYER + "attn.c_proj.bias",),
        "ln_2.weight": (_HF_LAYER + "ln_2.weight",),
        "ln_2.bias": (_HF_LAYER + "ln_2.bias",),
        "mlp.fc.weight": (_HF_LAYER + "mlp.c_fc.weight", CONV1D),
        "mlp.fc.bias": (_HF_LAYER + "mlp.c_fc.bias",),
        "mlp.proj.weight": (_HF_LAYER + "mlp.c_proj.weight", CONV1D),
        "mlp.proj.bias": (_HF_LAYER + "mlp.c_proj.bias",),
    }),
    Row("ln_f.weight", "transformer.ln_f.weight"),
    Row("ln_f.bias", "transformer.ln_f.bias"),
]

# The gpt3zh table itself: identity names, Megatron's partition dims (our qkv is per head too).
GPT3ZH = [Row(r.ours, r.ours, IDENTITY, r.partition) for r in MEGATRON]


def expand(table: list[Row], n_layer: int) -> list[Row]:
    """Concrete rows for a model with n_layer layers, in gpt3zh parameter order."""
    rows = []
    for row in table:
        layers = range(n_layer) if "{i}" in row.ours else [None]
        for i in layers:
            rows.append(Row(row.ours.format(i=i), row.theirs.format(i=i), row.transform, row.partition))
    return rows


def our_shapes(cfg: GPTConfig) -> dict[str, torch.Size]:
    """The gpt3zh state-dict shapes of `cfg`, from a model built on meta (no memory)."""
    from ..model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    return {name: t.shape for name, t in model.state_dict().items()}


def foreign_shapes(table: list[Row], cfg: GPTConfig, tp: int = 1) -> dict[str, torch.Size]:
    """Expected foreign names and shapes (per TP rank when tp > 1), in table order."""
    ours = our_shapes(cfg)
    shapes = {}
    for row in expand(table, cfg.n_layer):
        shape = list(row.transform.forward(torch.empty(ours[row.ours], device="meta"), cfg.n_head).shape)
        if row.partition is not None:
            shape[row.partition] //= tp
        shapes[row.theirs] = torch.Size(shape)
    return shapes


def to_foreign(sd: dict[str, torch.Tensor], table: list[Row], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """gpt3zh-named state dict -> foreign-named state dict (every row must be present)."""
    rows = progress(expand(table, cfg.n_layer), "converting weights")
    return {r.theirs: r.transform.forward(sd[r.ours], cfg.n_head) for r in rows}


def from_foreign(sd: dict[str, torch.Tensor], table: list[Row], cfg: GPTConfig, dtype=None) -> dict:
    """Foreign-named state dict (already checked by `check_keys`) -> gpt3zh-named, optional cast."""
    out = {}
    for r in progress(expand(table, cfg.n_layer), "reading weights"):  # lazy sources are read here
        t = r.transform.inverse(sd[r.theirs], cfg.n_head)
        out[r.ours] = t if dtype is None else t.to(dtype)
    return out


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_keys(found: dict[str, tuple], expected: dict[str, torch.Size], where: str, why: str = "") -> None:
    """Compare found {name: shape} against expected; one error listing every problem.

    `why` says where the expected shapes come from (e.g. "config.json: vocab_size=...").
    """
    problems = compare_keys(found, expected)
    if problems:
        head = f"{where}: the weights do not match the model{' (' + why + ')' if why else ''}:"
        raise CheckpointError("\n".join([head, *(f"  {line}" for line in problems)]))


def compare_keys(found: dict[str, tuple], expected: dict[str, torch.Size]) -> list[str]:
    """One line per kind of problem (missing, unexpected) and per mismatched shape; [] if all match."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): " + ", ".join(f"{k} {_fmt(expected[k])}" for k in missing))
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(f"{k} {_fmt(found[k])}" for k in unexpected))
    for k in mismatched:
        lines.append(f"shape mismatch: {k} is {_fmt(found[k])} in the file, expected {_fmt(expected[k])}")
    return lines


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"\d+") + "$")


# Partition dims by name, for gpt3zh-named and Megatron-named state dicts alike.
_PARTITION = [(_pattern(t), r.partition) for r in MEGATRON for t in (r.ours, r.theirs)]


def partition_dim(name: str) -> int | None:
    """TP partition dim of a gpt3zh or Megatron parameter name (0, 1 or None = replicated)."""
    for pattern, dim in _PARTITION:
        if pattern.match(name):
            return dim
    raise CheckpointError(f"{name!r} is not a gpt3zh or Megatron parameter name (see checkpoint/tables.py)")
