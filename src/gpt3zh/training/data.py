"""Training data: rows from JSONL / JSON / CSV / parquet / a saved `datasets` dir -> token rows -> batches.

ModelScope's preprocessing (TextGenerationJiebaPreprocessor), kept exactly:
- continuation (only `src_txt`): t = tok(src) + [<sep>], truncated to sequence_length L;
  inputs t[:-1], labels t[1:]; every real label is trained (tokens 2..n and <sep>).
- prompt -> target (`src_txt` + `tgt_txt`): t = tok(src) + tok(tgt) + [<sep>], truncated to L;
  labels trained on positions [prompts_len - 1, inputs_len - 1): the target tokens and <sep>.
- a file where only some rows have `tgt_txt` is handled row by row, as ModelScope's preprocessor
  treats each row (the run's log and notes say how many rows of each kind it holds).
Files are UTF-8 (a leading BOM is accepted); a bad byte is reported with its file offset.
Padding is never trained. Where ModelScope pads every row to L, batches here are padded only to
their longest row, and rows of similar length are batched together (`bucket_by_length`), so
little compute goes to padding (benchmarks/train_padding.py measures it).

A row is stored as its token ids t (n <= L) and `start`, its first trained label position.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..fileio import read_utf8, writing

SRC, TGT = "src_txt", "tgt_txt"
PAD_ID = 0  # ModelScope pads inputs and labels with 0; padding is masked out of the loss
CACHE_VERSION = 3  # 3: mixed files are tokenized per row


class DataError(ConfigError):
    """A data file is unreadable or does not have the expected columns."""


# --------------------------------------------------------------------------------------- reading
def read_rows(path: str | Path, remap_columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json / .csv / .parquet file or a saved `datasets` directory, columns renamed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.is_dir():
        rows = _read_datasets_dir(path)
    elif path.suffix in readers:
        rows = readers[path.suffix](path)
    else:
        raise DataError(
            f"{path}: unknown data format {path.suffix!r} (expected .jsonl, .json, .csv, .parquet or a datasets dir)"
        )
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    if remap_columns:
        rows = [{remap_columns.get(k, k): v for k, v in row.items()} for row in rows]
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    # split on "\n" only: a JSON string may hold U+2028, which str.splitlines would cut at
    for lineno, line in enumerate(read_utf8(path, DataError).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(read_utf8(path, DataError))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        return list(csv.DictReader(io.StringIO(read_utf8(path, DataError), newline="")))
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err})") from None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'gpt3zh[data]'), "
                        "or export it to JSONL") from None
    try:
        return pq.read_table(path).to_pylist()
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{path}: cannot read as parquet "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def _read_datasets_dir(path: Path) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a directory: reading a saved `datasets` dataset needs the `datasets` package "
            f"(pip install datasets), or export it to JSONL"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; point at one split's directory")
    return ds.to_list()


def detect_mode(rows: list[dict[str, Any]], where: str) -> str:
    """'prompt' when every row has tgt_txt, 'continuation' when none has, 'mixed' otherwise.

    Mixed files are handled per row, as ModelScope's preprocessor treats each row: a row with
    tgt_txt trains its target (prompt masked), a row without (absent or null) trains all its tokens.
    Every row is checked: src_txt must be a string, tgt_txt a string when present.
    """
    with_tgt = 0
    for i, row in enumerate(rows, 1):
        if SRC not in row:
            raise DataError(
                f"{where}: row {i} has no column {SRC!r} (columns: {', '.join(map(str, row))}); "
                f"rename one with dataset.remap_columns, e.g. {{text1: {SRC}}}"
            )
        for col in (SRC, TGT) if _has_target(row) else (SRC,):
            if not isinstance(row[col], str):
                raise DataError(f"{where}: row {i} column {col!r} must be a string, got {type(row[col]).__name__}")
        with_tgt += _has_target(row)
    return "prompt" if with_tgt == len(rows) else "continuation" if with_tgt == 0 else "mixed"


def _has_target(row: dict[str, Any]) -> bool:
    return row.get(TGT) is not None


def first_row_without_target(rows: list[dict[str, Any]]) -> int | None:
    """1-based index of the first row with no tgt_txt (for errors about prompt->target metrics)."""
    return next((i for i, r in enumerate(rows, 1) if not _has_target(r)), None)


def rows_from_dataset(
    data: Any, where: str = "dataset", remap_columns: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The src_txt / tgt_txt rows of an in-memory dataset, for `detect_mode` and `tokenize_rows`.

    data: a `datasets.Dataset`, an MsDataset (anything with ModelScope's `to_hf_dataset()`, so
    gpt3zh.compat.modelscope's and ModelScope's own), or a list of dicts. As ModelScope's GPT-3
    trainer: src_txt only is continuation training, src_txt + tgt_txt trains the target only.
    remap_columns: {column: new name}, applied first (as dataset.remap_columns is to a file's rows).
    """
    if hasattr(data, "to_hf_dataset"):
        data = data.to_hf_dataset()
    columns = getattr(data, "column_names", None)  # a datasets.Dataset: check the schema once
    if remap_columns and columns is not None:
        data = data.rename_columns({k: v for k, v in remap_columns.items() if k in columns})
        columns = data.column_names
    elif remap_columns and isinstance(data, (list, tuple)):
        data = [{remap_columns.get(k, k): v for k, v in r.items()} if isinstance(r, Mapping) else r for r in data]
    if columns is not None:
        if SRC not in columns:
            raise DataError(
                f"{where}: no column {SRC!r} (columns: {', '.join(columns)}); rename one first, "
                f"e.g. .remap_columns({{'text1': {SRC!r}}})"
            )
        rows = data.select_columns([c for c in (SRC, TGT) if c in columns]).to_list()
    elif isinstance(data, (list, tuple)) and all(isinstance(r, Mapping) for r in data):
        rows = [dict(r) for r in data]
    else:
        kind = type(data).__name__
        raise DataError(f"{where}: expected a datasets.Dataset, an MsDataset or a list of dicts, got {kind}")
    if not rows:
        raise DataError(f"{where}: no rows (the dataset is empty)")
    return rows


# ------------------------------------------------------------------------------------ tokenizing
@dataclass
class TokenRows:
    """Ragged token rows in flat arrays: row i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # (N,) int32
    offsets: np.ndarray  # (R+1,) int64
    starts: np.ndarray  # (R,) int64, first trained label position of each row
    chars: np.ndarray  # (R,) int64, characters of the trained text (src, or tgt in prompt mode); a row cut
    # at sequence_length counts the kept share of its tokens' characters
    mode: str  # "continuation" | "prompt" | "mixed" (per row: a row with a target trains only that)
    truncated: int  # rows cut at sequence_length
    with_target: int = 0  # rows tokenized as prompt -> target

    def __len__(self) -> int:
        return len(self.starts)

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def trained_tokens(self) -> np.ndarray:
        """Trained label positions per row: [start, n - 1)."""
        return np.maximum(self.lengths - 1 - self.starts, 0)


def tokenize_rows(
    rows: list[dict[str, Any]], tok, sequence_length: int, mode: str, progress: bool | None = False
) -> TokenRows:
    """Token rows of `rows`. mode "continuation" ignores tgt_txt, "prompt" uses it in every row, and
    "mixed" per row (where present). progress: a bar on stderr (None: only when it is a terminal)."""
    prompt = [mode == "prompt" or (mode == "mixed" and _has_target(r)) for r in rows]
    src = _encode_all(tok, [r[SRC] for r in rows], progress, "tokenizing")
    tgt_rows = [i for i, p in enumerate(prompt) if p]
    tgt = dict(zip(tgt_rows, _encode_all(tok, [rows[i][TGT] for i in tgt_rows], progress, "tokenizing targets")))
    sep = tok.sep_id
    seqs, starts, chars, truncated = [], [], [], 0
    for i, s in enumerate(src):
        is_prompt = prompt[i]
        t = s + tgt.get(i, []) + [sep]
        t_full = t
        truncated += len(t) > sequence_length
        t = t[:sequence_length]
        prompts_len = min(len(s), sequence_length)
        # ModelScope's rule: prompt rows train [prompts_len - 1, inputs_len - 1); continuation rows train all labels.
        starts.append(max(prompts_len - 1, 0) if is_prompt else 0)
        text_chars = len(rows[i][TGT] if is_prompt else rows[i][SRC])
        text_tokens = len(t_full) - 1 - (len(s) if is_prompt else 0)  # the trained text's tokens
        kept_tokens = len(t) - (prompts_len if is_prompt else 0)
        if len(t_full) > sequence_length and text_tokens > 0:
            # a cut row is scored on part of its text only: count that part's share of the characters
            text_chars = round(text_chars * max(min(kept_tokens, text_tokens), 0) / text_tokens)
        chars.append(text_chars)
        seqs.append(t)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(t) for t in seqs])
    ids = np.fromiter((x for t in seqs for x in t), dtype=np.int32, count=int(offsets[-1]))
    return TokenRows(ids, offsets, np.array(starts, np.int64), np.array(chars, np.int64), mode, truncated,
                     len(tgt_rows))


def tokenize_dataset(data: Any, tok, sequence_length: int, where: str = "dataset") -> TokenRows:
    """An in-memory dataset (see `rows_from_dataset`) checked and tokenized as a data file is."""
    rows = rows_from_dataset(data, where)
    return tokenize_rows(rows, tok, sequence_length, detect_mode(rows, where))


_ENCODE_CHUNK = 4096  # rows per encode_batch call: big enough to keep the batch encoder busy


def _encode_all(tok, texts: list[str], progress: bool | None = False, desc: str = "") -> list[list[int]]:
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    # tqdm's disable=None: draw only when stderr is a terminal, so logs never get \r-garbage
    with tqdm(total=len(texts), desc=desc, unit="row", disable=None if progress is None else not progress,
              leave=False) as bar:
        for i in range(0, len(texts), _ENCODE_CHUNK):
            chunk = texts[i : i + _ENCODE_CHUNK]
            if hasattr(tok, "encode_batch"):
                out += [list(ids) for ids in tok.encode_batch(chunk)]
            else:
                out += [list(tok.encode(t)) for t in chunk]
            bar.update(len(chunk))
    return out


# ---------------------------------------------------------------------------------------- caching
def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of every file under a directory (names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tok, source: str | Path | None = None) -> str:
    """Identity of a tokenizer: its files when known, plus its ids on a probe text."""
    h = hashlib.sha256(type(tok).__name__.encode())
    if source is not None:
        src = Path(source)
        names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
        files = [src] if src.is_file() else [src / n for n in names if (src / n).is_file()]
        for p in files:
            h.update(file_digest(p).encode())
    probe = "床前明月光，疑是地上霜。The quick brown fox 123 <sep>\n"
    h.update(json.dumps([tok.vocab_size, tok.sep_id, list(tok.encode(probe))]).encode())
    return h.hexdigest()


def load_token_rows(
    path: str | Path,
    tok,
    sequence_length: int,
    remap_columns: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    tokenizer_id: str | None = None,
    progress: bool | None = False,
) -> TokenRows:
    """Read, check and tokenize a data file once; later calls load the cached arrays."""
    def build() -> TokenRows:
        rows = read_rows(path, remap_columns)
        return tokenize_rows(rows, tok, sequence_length, detect_mode(rows, str(path)), progress)

    if cache_dir is None:
        return build()
    tokenizer_id = tokenizer_id or tokenizer_fingerprint(tok)
    parts = [CACHE_VERSION, file_digest(path), tokenizer_id, sequence_length, sorted((remap_columns or {}).items())]
    return _through_cache(parts, Path(cache_dir), build)


def load_rows_tokens(
    rows: list[dict[str, Any]],
    mode: str,
    tok,
    sequence_length: int,
    cache_dir: str | Path | None = None,
    tokenizer_id: str | None = None,
    progress: bool | None = False,
) -> TokenRows:
    """`tokenize_rows` of in-memory rows (checked by rows_from_dataset + detect_mode), cached by
    their content as a file is by its bytes: under torchrun every rank holds the same rows, and
    the ranks after rank 0 read its cache instead of tokenizing again."""
    def build() -> TokenRows:
        return tokenize_rows(rows, tok, sequence_length, mode, progress)

    if cache_dir is None:
        return build()
    texts = json.dumps([[r[SRC], r.get(TGT)] for r in rows], ensure_ascii=False)
    parts = [CACHE_VERSION, "rows", hashlib.sha256(texts.encode()).hexdigest(), mode,
             tokenizer_id or tokenizer_fingerprint(tok), sequence_length]
    return _through_cache(parts, Path(cache_dir), build)


def _through_cache(key_parts: list, cache_dir: Path, build) -> TokenRows:
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:24]
    cached = cache_dir / f"tokens-{key}.npz"
    if cached.is_file():
        return _load_cache(cached)
    data = build()
    _save_cache(data, cached)
    return data


def _save_cache(data: TokenRows, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, ids=data.ids, offsets=data.offsets, starts=data.starts, chars=data.chars,
             meta=np.array(json.dumps({"mode": data.mode, "truncated": data.truncated,
                                       "with_target": data.with_target})))
    with writing(dest):
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, dest)  # atomic: a crash never leaves a half-written cache
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _load_cache(path: Path) -> TokenRows:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return TokenRows(z["ids"], z["offsets"], z["starts"], z["chars"], meta["mode"], meta["truncated"],
                         meta["with_target"])


# --------------------------------------------------------------------------------------- batching
def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True, bucket: bool = True
) -> list[list[int]]:
    """The row indices of each batch of one epoch; a pure function of (seed, epoch) for exact resume.

    bucket: sort rows by length inside windows of 64 batches, cut batches there, then shuffle the
    batch order, so a batch holds rows of similar length (little padding) while epochs still mix.
    """
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    if bucket:
        window = batch_size * 64
        lens = np.asarray(lengths)
        order = [i for w in range(0, n, window) for i in sorted(order[w : w + window], key=lambda i: -lens[i])]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if bucket and shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This data-parallel rank's rows of a global batch (rank and world passed explicitly)."""
    return indices[rank::world]


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) inputs t[:-1], padded with 0
    labels: torch.Tensor  # (B, T) targets t[1:], padded with 0
    mask: torch.Tensor  # (B, T) bool, True where the label is trained

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.tokens, self.labels, self.mask)))

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def collate(data: TokenRows, indices: Sequence[int], pad_to: int | None = None) -> Batch:
    """Inputs, labels and loss mask of the given rows; T = longest row - 1 (or pad_to)."""
    rows = [data.row(i) for i in indices]
    T = pad_to if pad_to is not None else max(len(r) for r in rows) - 1
    tokens = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for b, (i, r) in enumerate(zip(indices, rows)):
        t = torch.from_numpy(r.astype(np.int64))
        n = len(t) - 1
        # As ModelScope slices the 0-padded row: a row shorter than T + 1 keeps its last token
        # (<sep>) as an input; no trained label depends on it (causal), ModelScope's ppl does.
        tokens[b, : min(n + 1, T)] = t[:T]
        labels[b, :n] = t[1:]
        mask[b, int(data.starts[i]) : n] = True
    return Batch(tokens, labels, mask)
