"""ModelScope's attribute-access config (`modelscope.utils.config.Config` / `ConfigDict`).

What a `cfg_modify_fn` receives: the model directory's configuration.json as nested mappings
read and written by attribute (`cfg.train.optimizer = {...}`, `cfg.train.hooks.append({...})`,
`cfg.preprocessor.sequence_length = 512`). A missing key read by attribute is an AttributeError
that names the key and the keys that exist, as ModelScope's is; a dict assigned to a key is
wrapped so it reads by attribute too.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...config import unknown_key_message
from ...hub import resolve_model

CONFIGURATION = "configuration.json"  # ModelScope's ModelFile.CONFIGURATION


class ConfigDict(dict):
    """A dict whose keys are also attributes; nested dicts (also inside lists) are ConfigDicts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, _wrap(value))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy / pickle probe dunders: never keys
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(unknown_key_message(name, sorted(self), "config key")) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __deepcopy__(self, memo: dict) -> ConfigDict:
        return ConfigDict({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists all the way down (values such as a Python lr_lambda kept)."""
        return _unwrap(self)

    def safe_get(self, key_chain: str, default: Any = None) -> Any:
        """The value at a dotted key chain (`'train.optimizer.lr'`), or default."""
        node: Any = self
        for part in key_chain.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def merge_from_dict(self, options: Mapping[str, Any], force: bool = True) -> None:
        """Set dotted keys ({'train.max_epochs': 3}); force=False keeps values already there."""
        for key_chain, value in options.items():
            *parents, last = key_chain.split(".")
            node = self
            for part in parents:
                if not isinstance(node.get(part), Mapping):
                    node[part] = ConfigDict()
                node = node[part]
            if force or last not in node:
                node[last] = copy.deepcopy(value)

    def dump(self, path: str | os.PathLike) -> None:
        """Write as JSON; a Python value JSON cannot hold (a function) is written as its name."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=4, ensure_ascii=False, default=_json_name) + "\n",
                              encoding="utf-8")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ConfigDict:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such ModelScope configuration file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON configuration ({err})") from None
        if not isinstance(data, dict):
            # a file's content is wrong, not a caller's argument: ValueError, as for bad JSON
            raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")  # noqa: TRY004
        return cls(data)


Config = ConfigDict  # ModelScope's Config wraps a ConfigDict; one class does both here


def read_config(model_id_or_path: str | os.PathLike, revision: str | None = None) -> ConfigDict:
    """configuration.json of a model directory or ModelScope id (modelscope.utils.hub.read_config)."""
    if revision not in (None, "master"):
        raise ValueError(f"read_config(revision={revision!r}): gpt3zh reads the cached snapshot only (revision None)")
    path = resolve_model(model_id_or_path)
    return ConfigDict.from_file(path if path.is_file() else path / CONFIGURATION)


def _wrap(value: Any) -> Any:
    if isinstance(value, ConfigDict):
        return value
    if isinstance(value, Mapping):
        return ConfigDict(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unwrap(v) for v in value]
    return value


def _json_name(value: Any) -> str:
    name = getattr(value, "__qualname__", None) or type(value).__name__
    return f"<python {name}>"
