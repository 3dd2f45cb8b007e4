"""ModelScope's names over gpt3zh, so the model cards' scripts run with an import changed.

    from gpt3zh.compat.modelscope import MsDataset   # was: from modelscope.msdatasets import MsDataset

Names resolve lazily (nothing is imported until used): `MsDataset` needs the `datasets` package
(`pip install gpt3zh[modelscope]`), and importing this package must not require it.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "MsDataset": "gpt3zh.compat.modelscope.msdataset",
    "DatasetNotFoundError": "gpt3zh.compat.modelscope.msdataset",
}

__all__ = ["DatasetNotFoundError", "MsDataset"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
