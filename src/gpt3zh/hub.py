"""Model ids: `owner/name` as on ModelScope's hub, resolved to a local model directory.

Every place gpt3zh names a model directory (load_model, load_tokenizer, describe, convert, the
pipeline, the CLI's model arguments, the training config's model and tokenizer) also takes an id
such as `damo/nlp_gpt3_text-generation_1.3B`. `resolve_model` looks for it where ModelScope's own
client keeps its downloads, so a model fetched once with `modelscope download` is found offline.

Only when the optional `modelscope` client is installed (`pip install gpt3zh[hub]`), the id is
not cached and GPT3ZH_OFFLINE is not set does gpt3zh ask that client to download it; otherwise
nothing is downloaded and the error says which paths were tried and how to fetch the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# ModelScope's repository names: an owner and a name, letters, digits, '_', '-', '.'.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class HubSettings:
    cache: Path  # ModelScope's cache base: $MODELSCOPE_CACHE, default ~/.cache/modelscope (the client's)
    offline: bool = False  # GPT3ZH_OFFLINE=1: never download, even with the modelscope client installed

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> HubSettings:
        """The one place gpt3zh reads these environment variables."""
        cache = environ.get("MODELSCOPE_CACHE")
        offline = environ.get("GPT3ZH_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        return cls(Path(cache).expanduser() if cache else Path.home() / ".cache" / "modelscope", offline)


class ModelNotFoundError(FileNotFoundError):
    """A model id that is neither a local directory nor in ModelScope's cache (and was not downloaded)."""

    def __init__(self, model_id: str, tried: list[Path], reason: str) -> None:
        self.model_id, self.tried = model_id, list(tried)
        lines = [
            f"model {model_id!r} is not a local directory and not in the ModelScope cache; tried:",
            *(f"  {p}" for p in tried),
            reason,
            "To fetch it (then it is found here offline):",
            f"  pip install modelscope && modelscope download --model {model_id}",
            f"  or: python -c \"from modelscope import snapshot_download; snapshot_download('{model_id}')\"",
            "Set MODELSCOPE_CACHE if the cache is elsewhere, or pass the model directory's path.",
        ]
        super().__init__("\n".join(lines))


def is_model_id(name: str | os.PathLike) -> bool:
    """True for `owner/name` (one slash, no leading '.' or '/'): the form of a hub model id."""
    return _ID.fullmatch(os.fspath(name)) is not None


def cache_candidates(model_id: str, cache: Path) -> list[Path]:
    """Where ModelScope's clients have put `model_id` under the cache base, in the order searched.

    With MODELSCOPE_CACHE unset, clients before 1.38 used ~/.cache/modelscope/hub as their root,
    which is `cache/hub` here; with it set, they used it as the root itself. Both are covered.
    A `snapshots` entry holds one directory per revision (see `_model_dir`).
    """
    owner, name = model_id.split("/")
    # Clients before 1.38 write a '.' in the id as '___' on disk (1.3B -> 1___3B); since late 2024
    # they also link the dotted name to it. Both spellings are tried.
    spellings = list(dict.fromkeys([(owner, name), (owner.replace(".", "___"), name.replace(".", "___"))]))

    def under(*roots: Path) -> list[Path]:
        return [root / o / n for root in roots for o, n in spellings]

    return [
        # 1.23-1.37: $MODELSCOPE_CACHE/models/owner/name, default ~/.cache/modelscope/hub/models/...;
        # the newest client still reuses these when present, so they come first.
        *under(cache / "models", cache / "hub" / "models"),
        cache / "models" / f"{owner}--{name}" / "snapshots",  # >= 1.38 (modelscope_hub): .../snapshots/REV
        *under(cache, cache / "hub"),  # before 1.23: $MODELSCOPE_CACHE/owner/name, default .../modelscope/hub/...
    ]


def resolve_model(name_or_path: str | os.PathLike, settings: HubSettings | None = None) -> Path:
    """A local directory for a model path or a ModelScope id.

    An existing path is returned as is. An id (`owner/name`) that is not a local path is looked
    up in the ModelScope cache (`settings`, default `HubSettings.from_env()`), then downloaded
    with the `modelscope` client when it is installed and downloads are not off; otherwise
    ModelNotFoundError lists what was tried. Any other string comes back as a Path unchanged, so
    the caller's own "no such model directory" error names it.
    """
    path = Path(name_or_path).expanduser()
    if path.exists() or not is_model_id(name_or_path):
        return path
    model_id = os.fspath(name_or_path)
    settings = settings or HubSettings.from_env()
    tried = cache_candidates(model_id, settings.cache)
    for candidate in tried:
        found = _model_dir(candidate)
        if found is not None:
            return found
    tried = [path.absolute(), *tried]
    if settings.offline:
        raise ModelNotFoundError(model_id, tried, "Downloads are off (GPT3ZH_OFFLINE is set).")
    return _download(model_id, tried)


def _model_dir(candidate: Path) -> Path | None:
    """candidate when it is a non-empty directory (an interrupted download leaves an empty one).

    For a `snapshots` directory: its master or main revision, or its only one, as the client picks.
    """
    if candidate.name == "snapshots" and candidate.is_dir():
        revisions = [p for p in candidate.iterdir() if p.is_dir() and any(p.iterdir())]
        by_name = {p.name: p for p in revisions}
        return by_name.get("master") or by_name.get("main") or (revisions[0] if len(revisions) == 1 else None)
    return candidate if candidate.is_dir() and any(candidate.iterdir()) else None


def _download(model_id: str, tried: list[Path]) -> Path:
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            model_id, tried, "The modelscope client is not installed, so nothing was downloaded."
        ) from None
    try:
        return Path(snapshot_download(model_id))
    except Exception as err:  # offline, unknown id, no permission: the client's own words say which
        raise ModelNotFoundError(
            model_id, tried, f"modelscope's snapshot_download failed: {type(err).__name__}: {err}"
        ) from err
