"""`snapshot_download(model_id)`: a model's local directory, through gpt3zh.hub.

As ModelScope's function it returns the directory (a str). The id is looked up in ModelScope's
cache (`cache_dir`, else $MODELSCOPE_CACHE / ~/.cache/modelscope, every layout its clients have
used); only when the `modelscope` client is installed and downloads are not off (GPT3ZH_OFFLINE,
`local_files_only=True`) is it asked to download. Otherwise the error lists the paths tried and
how to fetch the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...hub import HubSettings, resolve_model

DEFAULT_REVISIONS = (None, "master")


def snapshot_download(
    model_id: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> str:
    if revision not in DEFAULT_REVISIONS:
        raise ValueError(
            f"snapshot_download({model_id!r}, revision={revision!r}): gpt3zh finds the snapshot ModelScope's "
            f"client cached (its default revision); download that revision with `modelscope download "
            f"--model {model_id} --revision {revision}` into a directory and pass its path instead"
        )
    settings = HubSettings.from_env()
    if cache_dir is not None:
        settings = HubSettings(Path(cache_dir).expanduser(), settings.offline)
    if local_files_only:
        settings = HubSettings(settings.cache, offline=True)
    path = resolve_model(model_id, settings)  # an id not found raises ModelNotFoundError (what was tried)
    if not path.is_dir():
        raise FileNotFoundError(
            f"snapshot_download({model_id!r}): neither a ModelScope model id (owner/name) nor a local model directory"
        )
    return str(path)
