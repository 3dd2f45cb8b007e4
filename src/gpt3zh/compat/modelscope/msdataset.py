"""ModelScope's `MsDataset` over Hugging Face `datasets`, for local data.

As in ModelScope (msdatasets/ms_dataset.py), an MsDataset wraps one `datasets.Dataset`;
`MsDataset.load` hands local files to `datasets.load_dataset` and returns one MsDataset, or a
dict {split: MsDataset} when there are several splits; `remap_columns` returns the renamed
`datasets.Dataset` itself (so the model cards' `.remap_columns(...).map(...)` is datasets' map).

What differs: nothing is fetched from a hub. A name that is not a local file, a local directory
or a `datasets` builder (json, csv, parquet, text, arrow) is an error that says how to pass the
same data as local files; every data file is checked to be local and present before `datasets`
is called, so no call can reach the network.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

try:
    import datasets
except ImportError as err:  # pragma: no cover - exercised only where datasets is absent
    raise ImportError(
        "gpt3zh.compat.modelscope.MsDataset needs the `datasets` package: pip install 'gpt3zh[modelscope]'"
    ) from err

# File extension -> (datasets builder, its options). ModelScope's table (utils/constant.py
# EXTENSIONS_TO_LOAD) reads .tsv as comma-separated csv; tab is what a .tsv file holds.
EXTENSIONS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
    ".arrow": ("arrow", {}),
}
BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets builders that read local files
DataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]]

_LOCAL_EXAMPLES = (
    "Pass local files instead, e.g.\n"
    "  MsDataset.load('json', data_files={'train': 'train.jsonl', 'test': 'test.jsonl'})\n"
    "  MsDataset.load('path/to/train.jsonl')   (.csv, .tsv, .parquet, .txt likewise)\n"
    "  MsDataset.load('path/to/dir')           (its train.* / test.* / validation.* files are the splits)"
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset name or data file that is not local (gpt3zh downloads no datasets)."""


class MsDataset:
    """One `datasets.Dataset` (or IterableDataset) with ModelScope's MsDataset interface."""

    def __init__(self, ds_instance: datasets.Dataset | datasets.IterableDataset, target: str | None = None):
        if isinstance(ds_instance, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raise TypeError(
                f"MsDataset wraps one split; got a {type(ds_instance).__name__} with splits "
                f"{list(ds_instance)}: use MsDataset.to_ms_dataset(...) for a dict of splits"
            )
        if not isinstance(ds_instance, (datasets.Dataset, datasets.IterableDataset)):
            raise TypeError(f"MsDataset needs a datasets.Dataset, got {type(ds_instance).__name__}")
        columns = ds_instance.column_names or []
        if target is not None and target not in columns:
            raise ValueError(f"target {target!r} is not a column of the dataset (columns: {', '.join(columns)})")
        self._hf_ds = ds_instance
        self.target = target

    # ---------------------------------------------------------------------------- the dataset
    def __len__(self) -> int:
        return len(self._hf_ds)

    def __getitem__(self, key):
        return self._hf_ds[key]

    def __iter__(self) -> Iterator[Any]:
        for row in self._hf_ds:
            yield row if self.target is None else row[self.target]

    def __repr__(self) -> str:
        return f"MsDataset({self._hf_ds!r})"

    @property
    def ds_instance(self) -> datasets.Dataset | datasets.IterableDataset:
        return self._hf_ds

    @property
    def column_names(self) -> list[str]:
        return list(self._hf_ds.column_names or [])

    def to_hf_dataset(self) -> datasets.Dataset | datasets.IterableDataset:
        self._hf_ds.reset_format()
        return self._hf_ds

    def remap_columns(self, column_mapping: dict[str, str]) -> datasets.Dataset:
        """Rename columns; returns the `datasets.Dataset` itself, as ModelScope's does."""
        self._hf_ds.reset_format()
        return self._hf_ds.rename_columns(column_mapping)

    def map(self, function: Callable | None = None, **kwargs: Any) -> MsDataset:
        """`datasets.Dataset.map`, kept wrapped (ModelScope's MsDataset has no map; its users call
        the map of the Dataset that remap_columns returns, which works here too)."""
        return MsDataset(self._hf_ds.map(function, **kwargs), self.target)

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def to_ms_dataset(cls, ds_instance: Any, target: str | None = None) -> MsDataset | dict[str, MsDataset]:
        """A Dataset -> MsDataset; a DatasetDict -> {split: MsDataset}, or one MsDataset when it has one split."""
        if isinstance(ds_instance, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            if len(ds_instance) == 1:
                return cls(next(iter(ds_instance.values())), target)
            return {name: cls(split, target) for name, split in ds_instance.items()}
        return cls(ds_instance, target)

    from_hf_dataset = to_ms_dataset  # ModelScope's older (deprecated) name

    @staticmethod
    def load(
        dataset_name: str | list,
        namespace: str | None = None,
        target: str | None = None,
        version: str | None = None,
        hub: Any = None,
        subset_name: str | None = None,
        split: str | None = None,
        data_dir: str | None = None,
        data_files: DataFiles | None = None,
        download_mode: Any = None,
        cache_dir: str | None = None,
        features: datasets.Features | None = None,
        use_streaming: bool = False,
        **config_kwargs: Any,
    ) -> MsDataset | dict[str, MsDataset]:
        """ModelScope's MsDataset.load for local data (same arguments; `version` is ignored and
        `hub` only names, in the error, where a name that is not local would have come from).

        dataset_name: a data file (.jsonl/.json/.csv/.tsv/.parquet/.txt/.arrow; its rows are the
        'train' split), a directory (datasets finds its split files, or a `save_to_disk` dir), a
        builder name with data_files / data_dir (`'json', data_files={'train': ..., 'test': ...}`),
        or a list of values (one column named `target`, default 'target').
        Returns one MsDataset for one split (or with `split=`), else {split: MsDataset}.
        """
        if isinstance(dataset_name, list):
            column = target or "target"
            return MsDataset(datasets.Dataset.from_dict({column: dataset_name}), column)
        if not isinstance(dataset_name, str):
            raise TypeError(f"dataset_name must be a str or a list, got {type(dataset_name).__name__}")
        name = os.path.expanduser(dataset_name)
        kwargs = dict(
            name=subset_name, split=split, cache_dir=cache_dir, features=features,
            download_mode=getattr(download_mode, "value", download_mode), streaming=use_streaming,
            **config_kwargs,
        )
        if os.path.isfile(name):
            builder, options = _builder_of_file(name)
            if data_files is not None:
                raise ValueError(f"MsDataset.load({dataset_name!r}): a data file and data_files= given; give one")
            ds = _hf_load(builder, dataset_name, data_files=[name], **{**options, **kwargs})
        elif name in BUILDERS:
            if data_files is None and data_dir is None:
                raise ValueError(
                    f"MsDataset.load({dataset_name!r}): the {name!r} builder needs data_files= "
                    f"(or data_dir=), e.g. data_files={{'train': 'train.jsonl'}}"
                )
            _check_local(dataset_name, data_files, data_dir)
            ds = _hf_load(name, dataset_name, data_files=data_files, data_dir=data_dir, **kwargs)
        elif os.path.isdir(name):
            ds = _load_dir(name, dataset_name, data_files, data_dir, kwargs)
        else:
            raise _not_local(dataset_name, namespace, getattr(hub, "value", hub))
        return MsDataset.to_ms_dataset(ds, target)


# -------------------------------------------------------------------------------------- loading
def _builder_of_file(path: str) -> tuple[str, dict[str, Any]]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"{path}: unknown data file type {ext!r} (expected one of: {', '.join(EXTENSIONS)})")
    return EXTENSIONS[ext]


def _load_dir(name: str, shown: str, data_files, data_dir, kwargs: dict[str, Any]):
    if os.path.isfile(os.path.join(name, "dataset_dict.json")) or os.path.isfile(os.path.join(name, "state.json")):
        ds = datasets.load_from_disk(name)  # a save_to_disk directory: datasets.load_dataset refuses it
        split = kwargs.get("split")
        if split is None or isinstance(ds, datasets.Dataset):
            return ds
        if split not in ds:
            raise ValueError(f"{shown}: no split {split!r} (splits: {', '.join(ds)})")
        return ds[split]
    _check_local(shown, data_files, data_dir, base=name)
    return _hf_load(name, shown, data_files=data_files, data_dir=data_dir, **kwargs)


def _hf_load(path: str, shown: str, **kwargs: Any):
    try:
        return datasets.load_dataset(path, **kwargs)
    except ValueError as err:
        # e.g. 'Unknown split "test". Should be one of [\'train\']' or a builder option's complaint
        raise ValueError(f"MsDataset.load({shown!r}): {err}") from err


def _check_local(shown: str, data_files: DataFiles | None, data_dir: str | None, base: str = "") -> None:
    """Every data file (or glob) names something on this disk; nothing may be a URL."""
    if data_dir is not None:
        root = os.path.join(base, os.path.expanduser(data_dir))
        if not os.path.isdir(root):
            raise DatasetNotFoundError(f"MsDataset.load({shown!r}): data_dir {root} is not a directory")
        base = root
    for pattern in _patterns(data_files):
        if "://" in pattern:
            raise DatasetNotFoundError(
                f"MsDataset.load({shown!r}): data file {pattern!r} is a URL; gpt3zh reads local files only "
                f"(download it first, then pass its path)"
            )
        full = os.path.join(base, os.path.expanduser(pattern))
        if not (glob.glob(full) if glob.has_magic(full) else os.path.exists(full)):
            raise DatasetNotFoundError(f"MsDataset.load({shown!r}): data file {full} not found")


def _patterns(data_files: DataFiles | None) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, (str, os.PathLike)):
        return [os.fspath(data_files)]
    if isinstance(data_files, Mapping):
        return [p for files in data_files.values() for p in _patterns(files)]
    return [os.fspath(p) for p in data_files]


def _not_local(dataset_name: str, namespace: str | None, hub: str | None) -> DatasetNotFoundError:
    if hub == "huggingface":
        where = f"the Hugging Face hub dataset {dataset_name!r}"
    else:  # ModelScope's default namespace is 'modelscope'
        hub_id = dataset_name if "/" in dataset_name else f"{namespace or 'modelscope'}/{dataset_name}"
        where = f"the ModelScope hub dataset {hub_id!r}"
    return DatasetNotFoundError(
        f"MsDataset.load({dataset_name!r}): not a local file or directory, nor a datasets builder "
        f"({', '.join(BUILDERS)}), so it would be {where}; gpt3zh downloads no datasets.\n"
        f"Tried: {os.path.abspath(os.path.expanduser(dataset_name))} (no such file or directory)\n"
        f"{_LOCAL_EXAMPLES}"
    )
