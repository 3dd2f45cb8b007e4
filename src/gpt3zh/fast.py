"""The fast generation path: functions applied around the model, chosen by GenerationConfig's
`compile`, `quantize` and `dtype` options (model.py and the eager path stay as they are).

- `prepared(model, quantize, dtype)`: the model to decode with. When it differs from `model` (a
  dtype cast, int8 weights) it is a transformed copy, made once and cached per model until the
  model's weights change. For a big model, cast / `quantize_int8` it once yourself instead: then
  there is nothing to copy and `prepared` returns the model itself.
- `compiled(step)`: torch.compile of the one-token decode step. The step reads the static KV cache
  and the static per-step buffers of generation.py and does no host sync, so it compiles to one
  graph; the prefill stays eager (its shape changes with every prompt). Inductor on CPU; on CUDA
  the same default mode (CUDA graphs would need the KV cache to outlive a call, see docs).
- `bucketed_cache_len`: the compiled step is specialised on the cache length, so the cache is
  rounded up to a multiple of CACHE_BUCKET slots; every request length inside a bucket reuses one
  compiled graph (the extra slots are masked out).
"""

from __future__ import annotations

import copy
import weakref

import torch

from .model import GPT
from .quantize import is_quantized, quantize_int8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("int8",)
CACHE_BUCKET = 64

_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILED: dict = {}


def as_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or None = the model's own), got {name!r}")
    return DTYPES[name]


def prepared(model: GPT, quantize: str | None = None, dtype: str | torch.dtype | None = None) -> GPT:
    """`model` itself when it already has this dtype / quantization, else a cached transformed copy."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None or one of {QUANTIZE}, got {quantize!r}")
    current = model.tok_emb.weight.dtype
    target = as_dtype(dtype) or current
    want_int8 = quantize == "int8" and not is_quantized(model)
    if not want_int8 and target == current:
        return model
    key = (quantize, target, _weights_version(model))
    cached = _PREPARED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    _PREPARED.pop(model, None)  # free the stale copy before making a new one
    fast = copy.deepcopy(model).to(target)  # the caller's model is left untouched
    if want_int8:
        quantize_int8(fast)
    _PREPARED[model] = (key, fast)
    return fast


def _weights_version(model: GPT) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def compiled(step):
    """torch.compile(step), made once per step function (dynamo caches graphs per code object)."""
    fn = _COMPILED.get(step)
    if fn is None:
        # dynamic=False: one graph per (batch, cache length); bucketed_cache_len keeps those few.
        fn = _COMPILED[step] = torch.compile(step, dynamic=False, fullgraph=True)
    return fn


def bucketed_cache_len(need: int, max_seq_len: int) -> int:
    return min(max_seq_len, -(-need // CACHE_BUCKET) * CACHE_BUCKET)
