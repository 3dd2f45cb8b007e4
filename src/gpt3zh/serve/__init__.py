"""OpenAI-compatible serving: the engine (gpt3zh.engine) in a thread, and its FastAPI app.

`create_app(model, tokenizer, ServeConfig(...))` builds the app; `serve(...)` runs it with uvicorn.
Names resolve lazily, so `gpt3zh.serve.settings` (used by the CLI parser) does not import FastAPI.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "APIError": "gpt3zh.serve.app",
    "create_app": "gpt3zh.serve.app",
    "serve": "gpt3zh.serve.app",
    "ServeConfig": "gpt3zh.serve.settings",
    "EngineThread": "gpt3zh.serve.runner",
}

__all__ = ["APIError", "EngineThread", "ServeConfig", "create_app", "serve"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpt3zh.serve' has no attribute {name!r}")
