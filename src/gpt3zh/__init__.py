"""gpt3zh: ModelScope's Chinese GPT-3 family, rebuilt as a clean PyTorch toolkit.

Public functions are resolved lazily so that `import gpt3zh.model` pulls in torch and the config
only (no tokenizers, no torch.distributed, no trainer). Submodules are named so that they never
shadow these functions: `gpt3zh.generate` is a function, the module is `gpt3zh.generation`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "GPTConfig": "gpt3zh.config",
    "GenerationDefaults": "gpt3zh.config",
    "PRESETS": "gpt3zh.config",
    "GPT": "gpt3zh.model",
    "GenerationConfig": "gpt3zh.config",
    "InferenceOptions": "gpt3zh.inference",
    "load_model": "gpt3zh.checkpoint",
    "load_pretrained": "gpt3zh.checkpoint",
    "prepare": "gpt3zh.inference",
    "save_model": "gpt3zh.checkpoint",
    "load_tokenizer": "gpt3zh.tokenizer",
    "generate": "gpt3zh.generation",
    "stream": "gpt3zh.generation",
    "pipeline": "gpt3zh.pipelines",
    "train": "gpt3zh.training",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpt3zh' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
