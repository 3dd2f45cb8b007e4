"""File access for checkpoints: safe pickle loading, safetensors, JSON, atomic output dirs.

Every reader turns low-level failures into a CheckpointError naming the file and what was expected.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import uuid
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from ..failpoints import failpoint
from ..fileio import writing
from .errors import CheckpointError


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found ({what})")
    return path


def read_json(path: Path, what: str = "config") -> dict[str, Any]:
    require_file(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text ({err.reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def progress(items: list, desc: str):
    """`items` with a tqdm bar on stderr, for the loops over a checkpoint's tensors.

    Shown only on a terminal (tqdm's disable=None) and only after a second (delay), so converting a
    large checkpoint shows where it is while small models, tests and pipes never print a bar.
    """
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", file=sys.stderr, disable=None, delay=1.0, leave=False)


# -------------------------------------------------------------------------------- pickles (torch.save)
# DeepSpeed / Megatron shard files keep their launch arguments as an argparse.Namespace next to the
# weights. Rebuilding a Namespace only sets attributes (no code runs), so it is safe to allow.
_SAFE_EXTRA_GLOBALS = [argparse.Namespace]


def load_torch(path: Path, what: str, mmap: bool = True) -> Any:
    """torch.load with weights_only=True (a pickle carrying code is refused, never run).

    Zip-format files are memory-mapped (unless mmap=False), so tensors are read only when used.
    """
    require_file(path, what)
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... by case
        raise _pickle_error(path, err) from None


def _pickle_error(path: Path, err: Exception) -> CheckpointError:
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"Unsupported operand \S+", text)
    if "Weights only load failed" in text or found:
        culprit = found.group(1) if found and found.groups() else (found.group(0) if found else "non-tensor data")
        return CheckpointError(
            f"{path}: refused to load: the pickle references {culprit}, which weights-only loading does not "
            f"allow (files that carry code are never executed; expected tensors in plain dicts)"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return CheckpointError(f"{path}: cannot read: truncated or not a PyTorch checkpoint ({first})")


def save_torch(obj: dict[str, Any], path: Path, clone_views: bool = True) -> None:
    """torch.save, cloning views first: a view would otherwise drag its whole base storage along.

    A full disk raises a WriteError naming `path`: torch's own writer reports it only as
    "inline_container.cc ... unexpected pos", so the bytes go through a file object that keeps the
    OSError its write raised.
    """
    with writing(path), open(path, "wb", buffering=0) as f:
        out = _KeepError(f)
        try:
            torch.save(_own_storage(obj) if clone_views else obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise


class _KeepError:
    """A write-only file object for torch.save: writes every byte or keeps the OSError that stopped it."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):  # a raw write may be short (the byte that no longer fits)
                done += self.f.write(view[done:])
        except OSError as err:
            self.error = err
            raise
        return done

    def flush(self) -> None:
        self.f.flush()


def _own_storage(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _own_storage(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        t = obj.contiguous()
        return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    return obj


# ------------------------------------------------------------------------------------------ safetensors
class SafetensorsFile(Mapping):
    """A lazy {name: tensor} view of a .safetensors file: tensors are read on access."""

    def __init__(self, path: Path, what: str) -> None:
        from safetensors import safe_open

        require_file(path, what)
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            self._names = list(self._file.keys())
        except Exception as err:
            raise CheckpointError(f"{path}: cannot read: truncated or not a safetensors file ({err})") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self._file.get_slice(k).get_shape()) for k in self._names}

    def dtype(self) -> str:
        return self._file.get_slice(self._names[0]).get_dtype() if self._names else "none"

    def metadata(self) -> dict[str, str]:
        return self._file.metadata() or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({err})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # metadata format=pt: transformers refuses safetensors files without it
    with writing(path):
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        except Exception as err:  # the Rust writer's SafetensorError carries the OS error only as text
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        _default_permissions(path)  # safetensors writes 0600; a model directory is ordinary readable data


def _default_permissions(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---------------------------------------------------------------------------------- atomic output dirs
@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool, is_model_dir: Callable[[Path], bool]):
    """Yield a fresh temp dir next to out_dir; on success it replaces out_dir in one rename.

    On any failure the temp dir is removed and an existing out_dir is left untouched. A non-empty
    out_dir that is not a model directory is refused unless overwrite=True.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    blocker = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:  # mkdir would say "File exists" about a path the user never named
        raise CheckpointError(f"{out}: cannot be created: {blocker} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not is_model_dir(out):
        raise CheckpointError(
            f"{out}: refusing to overwrite a non-empty directory that is not a model directory "
            f"(pass overwrite=True, or --force on the command line)"
        )
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    with writing(tmp):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        with writing(out, name_this=True):
            yield tmp
            failpoint("output.write")
            _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    failpoint("output.replace")
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover_output_dir(out: Path) -> list[Path]:
    """Undo what a killed `atomic_output_dir(out)` left: a half-written `.out.tmp-*` is deleted; a
    `.out.old-*` (the previous output, moved aside just before the kill) is put back if `out` is
    missing, else deleted. Only for a directory no other process is writing. Returns what it removed."""
    removed = []
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            old.rename(out)
        else:
            shutil.rmtree(old)
            removed.append(old)
    for tmp in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        shutil.rmtree(tmp)
        removed.append(tmp)
    return removed


# ------------------------------------------------------------------- torch.distributed.checkpoint dirs
# DCP keeps its index (.metadata) as a plain pickle, and DCP itself loads it with pickle.load; here
# it is read by an unpickler that can build only DCP's own metadata records and the torch values
# they hold, so a planted payload is refused, never run. The tensors are read by DCP through
# torch.load(weights_only=True); non-tensor entries (which DCP would torch.load with
# weights_only=False) are never requested.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # any record class of that module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler:
    @staticmethod
    def load(f, path: Path):
        import pickle

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str):
                allowed = _DCP_GLOBALS.get(module, set())
                value = super().find_class(module, name) if module in _DCP_GLOBALS and (
                    allowed is None or name in allowed) else None
                if value is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                    value = getattr(torch, name)
                if value is None or (module.endswith(".metadata") and not isinstance(value, type)):
                    raise CheckpointError(
                        f"{path}: refused to load: the DCP metadata references {module}.{name}, which is not one "
                        f"of DCP's own records (files that carry code are never executed)"
                    )
                return value

        try:
            return Restricted(f).load()
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{path}: cannot read DCP metadata: truncated or not a DCP checkpoint "
                                  f"({err})") from None


def _dcp_reader(d: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            meta_path = Path(self.path) / ".metadata"
            require_file(meta_path, "DCP metadata")
            with open(meta_path, "rb") as f:
                metadata = _DCPMetadataUnpickler.load(f, meta_path)
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(d))


def dcp_tensor_entries(d: Path, prefix: str) -> dict[str, Any]:
    """{name: TensorStorageMetadata} of the entries under `prefix.` in the DCP dir d (metadata only)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _dcp_reader(d).read_metadata()
    entries = {k[len(prefix) + 1 :]: v for k, v in metadata.state_dict_metadata.items() if k.startswith(prefix + ".")}
    bad = [k for k, v in entries.items() if not isinstance(v, TensorStorageMetadata)]
    if bad or not entries:
        raise CheckpointError(f"{d}: expected tensors under {prefix!r} in the DCP metadata, "
                              f"{'found non-tensor entries: ' + ', '.join(bad[:4]) if bad else 'found none'}")
    return entries


def load_dcp_tensors(d: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The whole (unsharded) tensors under `prefix.` of a DCP dir, in this one process."""
    import torch.distributed.checkpoint as dcp

    entries = dcp_tensor_entries(d, prefix)
    out = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in entries.items()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load({prefix: out}, storage_reader=_dcp_reader(d), no_dist=True)
    except CheckpointError:
        raise
    except Exception as err:  # a missing or cut .distcp file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{d}: cannot read the DCP tensors ({first[:200]})") from None
    return out
