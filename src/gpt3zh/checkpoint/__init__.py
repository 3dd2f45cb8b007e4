"""Checkpoints: load, save, convert and describe model directories in four formats.

Formats (detected automatically): gpt3zh's own (config.json + model.safetensors), ModelScope
single-process (pytorch_model.bin), ModelScope Megatron (model/mp_rank_XX_model_states.pt, any
number of tensor-parallel shards) and Hugging Face GPT-2. Conversion is a name table per foreign
format (tables.py) plus named transforms (transforms.py) and TP split/merge (tp.py). A training
checkpoint (work_dir/checkpoints/step-N) is read like a model directory.
"""

from .api import (
    ModelDirInfo,
    Pretrained,
    WeightsReport,
    convert,
    describe,
    inspect_weights,
    load_generation_defaults,
    load_model,
    load_pretrained,
    save_model,
)
from .errors import CheckpointError
from .formats import FORMATS
from .tp import merge_state_dicts, reshard, split_state_dict

__all__ = [
    "FORMATS",
    "CheckpointError",
    "ModelDirInfo",
    "WeightsReport",
    "convert",
    "describe",
    "Pretrained",
    "inspect_weights",
    "load_generation_defaults",
    "load_model",
    "load_pretrained",
    "merge_state_dicts",
    "reshard",
    "save_model",
    "split_state_dict",
]
