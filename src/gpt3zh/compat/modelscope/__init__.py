"""ModelScope's names over gpt3zh, so the model cards' scripts run with their imports changed.

    from gpt3zh.compat.modelscope import pipeline, Tasks            # was: modelscope.pipelines / utils.constant
    from gpt3zh.compat.modelscope import MsDataset                  # was: modelscope.msdatasets
    from gpt3zh.compat.modelscope import build_trainer, Trainers    # was: modelscope.trainers / metainfo

- `pipeline(Tasks.text_generation, model=ID)(text)` -> `{'text': ...}`, ModelScope's text and call
  options, `stream_generate` (compat.modelscope.pipelines);
- `build_trainer(name=Trainers.gpt3_trainer, default_args=...)` -> `.train()` / `.evaluate()`:
  configuration.json through `cfg_modify_fn`, every setting honoured or refused by name, one
  process or the dp x tp trainer under torchrun (compat.modelscope.trainers);
- `MsDataset` over Hugging Face `datasets`, local data only; `snapshot_download` and
  `read_config` through gpt3zh.hub (ModelScope's cache, offline).

Names resolve lazily (nothing is imported until used): `MsDataset` needs the `datasets` package
(`pip install gpt3zh[modelscope]`), and importing this package must not require it.
docs/modelscope.md maps every ModelScope name the cards use to its gpt3zh counterpart.
"""

from __future__ import annotations

import importlib

from .constants import Metrics, Tasks, Trainers

_LAZY = {
    "MsDataset": "gpt3zh.compat.modelscope.msdataset",
    "DatasetNotFoundError": "gpt3zh.compat.modelscope.msdataset",
    "pipeline": "gpt3zh.compat.modelscope.pipelines",
    "TextGenerationPipeline": "gpt3zh.compat.modelscope.pipelines",
    "build_trainer": "gpt3zh.compat.modelscope.trainers",
    "GPT3Trainer": "gpt3zh.compat.modelscope.trainers",
    "snapshot_download": "gpt3zh.compat.modelscope.hub",
    "Config": "gpt3zh.compat.modelscope.config",
    "ConfigDict": "gpt3zh.compat.modelscope.config",
    "read_config": "gpt3zh.compat.modelscope.config",
}

__all__ = [
    "Config", "ConfigDict", "DatasetNotFoundError", "GPT3Trainer", "Metrics", "MsDataset", "Tasks",
    "TextGenerationPipeline", "Trainers", "build_trainer", "pipeline", "read_config", "snapshot_download",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
