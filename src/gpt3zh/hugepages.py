"""Large CPU tensors on transparent huge pages (Linux).

A CPU decode step streams every weight from memory once per token. On 4 KiB pages that is a TLB
entry per 4 KiB read, and in a virtual machine every miss is a two-level page walk; on 2 MiB pages
the same weights stream faster (base preset, all 49 matrices through the C kernel: ~15% less time,
docs/benchmarks.md). `load_pretrained` places the tensors it loads for the CPU this way; `place`
and `place_model` do it for any tensors or model.

A placed tensor is an ordinary CPU tensor over a private anonymous mapping advised
MADV_HUGEPAGE before its pages are touched: its storage is exactly its bytes (saving it writes
nothing more), forks copy it on write, and it is unmapped when the last reference goes. Where
transparent huge pages are off ("never", or not Linux) tensors are returned as they are.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch
from torch import nn

PAGE = 2 << 20  # the x86-64 / arm64 (4 KiB granule) PMD size
MIN_BYTES = PAGE  # smaller tensors do not fill one huge page


def mode() -> str:
    """The kernel's transparent-huge-page mode: 'always', 'madvise', 'never' ('' if unknown)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return ""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def enabled() -> bool:
    return mode() in ("always", "madvise")


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor whose pages will be huge pages (2 MiB aligned)."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    mm = mmap.mmap(-1, nbytes + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(mm)
    offset = -ctypes.addressof(view) % PAGE
    del view  # (a live export would keep the mapping from closing)
    mm.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mm, dtype=dtype, count=numel, offset=offset).view(shape)


def place(tensors: dict[str, torch.Tensor], min_bytes: int = MIN_BYTES) -> dict[str, torch.Tensor]:
    """Replace, in the dict itself, every CPU tensor of at least `min_bytes` by a copy on huge
    pages, one at a time (an old tensor nothing else holds is freed as its copy is made, so peak
    memory grows by one tensor); return the dict. The same tensor under two names stays one
    tensor; views into a shared storage are left as they are (copies would unshare them)."""
    if not enabled():
        return tensors
    storages: dict[int, set[tuple]] = {}
    for t in tensors.values():
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel():
            storages.setdefault(t.untyped_storage().data_ptr(), set()).add(_key(t))
    done: dict[tuple, torch.Tensor] = {}
    for name in list(tensors):
        t = tensors[name]
        if not _placeable(t, min_bytes) or len(storages[t.untyped_storage().data_ptr()]) > 1:
            continue
        key = _key(t)
        if key not in done:
            done[key] = empty(t.shape, t.dtype).copy_(t)
        tensors[name] = done[key]
        del t
    return tensors


def place_model(model: nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Move `model`'s CPU parameters and buffers of at least `min_bytes` onto huge pages in place
    (`.data` swapped: the Parameter objects, their values and tied weights stay); the bytes moved."""
    if not enabled():
        return 0
    moved, done = 0, {}
    for t in (*model.parameters(), *model.buffers()):
        if not _placeable(t, min_bytes):
            continue
        key = _key(t)
        if key not in done:
            done[key] = empty(t.shape, t.dtype).copy_(t.detach())
            moved += t.numel() * t.element_size()
        t.data = done[key]
    return moved


def _placeable(t, min_bytes: int) -> bool:
    return (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.is_contiguous()
            and t.numel() * t.element_size() >= min_bytes and not t.is_sparse and not t.is_quantized)


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype


def huge_bytes(t: torch.Tensor) -> int:
    """How many bytes of the mapping that holds `t`'s data are on huge pages now (Linux
    /proc/self/smaps AnonHugePages; 0 where unknown)."""
    addr = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
