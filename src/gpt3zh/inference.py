"""Preparing a model for inference: the per-model transforms, done once, in one visible step.

`prepare(model, dtype=..., quantize=..., compile=..., cpu_kernels=..., pack_weights=...)` returns an `InferenceModel`:
the module to run (its own module objects, so the caller's model is never mutated: no KV cache, no
eval() on it), the one-token step function the engine calls, and a description of the chosen path
(its repr; the CLI's --verbose and the server's startup log print it). Prepared copies are cached,
one per model, and rebuilt when its weights are replaced (or, for a cast / int8 copy, updated).

The transforms, in order:
1. The module is a view: new module objects around the model's own parameter tensors, so nothing
   is copied and in-place weight updates show. dtype makes it a cast copy
   (`copy.deepcopy(view).to(dtype)`); int8 swaps the view's linear layers for int8 ones
   (`quantize_int8_dynamic` / `quantize_int8`), so only the int8 weights are new (the embeddings and
   norms stay shared; no float copy of the model is made on the way). quantize="int8"
   is the best int8 for the path: dynamic int8 (int8 weights and per-row int8 activations, fbgemm)
   for eager float32 on CPU, weight-only int8 elsewhere (compiled steps, accelerators, bf16/fp16);
   "int8-dynamic" / "int8-weight" ask for one.
2. CPU kernels (default on for eager CPU models): `fast.pack_layers` (oneDNN on packed copies of
   the linear weights: the fastest at every batch size, but a copy of the weights, so by default
   only when it fits in half the available memory; `pack_weights`) or else, with more than one
   thread, `fast.chunk_layers` (chunked-GEMV layers, no copy); and `fast.LeanStep` as the decode step.
3. compile: torch.compile of the modules' one-token step, with static shapes (the engine then
   decodes every row over the whole cache, masked, so one graph serves a whole call).

The fastest correct path for the device is the default; every choice can be turned off.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from typing import Any

import torch

from . import ckernel, fast, hugepages
from .config import InferenceOptions
from .model import GPT
from .quantize import Int8DynamicLinear, is_quantized, quantize_int8, quantize_int8_dynamic, scheme

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or None = the model's own), got {name!r}")
    return DTYPES[name]


class InferenceModel:
    """A model prepared for inference: `module` to run, `step` for one-token decode steps.

    `step(idx (B, 1), positions (B, 1), cache_pos, mask, slots) -> logits (B, V)` takes GPT.hidden's
    arguments: cache_pos (1,) shared by all rows with mask None (the rows attend to the first
    `slots` slots), or (B, 1) per row with a (B, 1, 1, S) mask. `static_shapes` asks the engine for
    the same shapes at every step (compiled steps). One engine at a time holds the module's KV
    cache (`claim`); a second concurrent user gets a `fork()`, a fresh view of the same tensors.
    """

    STEPS = ("modules", "lean", "compiled")

    def __init__(self, module: GPT, options: InferenceOptions, parts: tuple[str, ...], step: str = "modules") -> None:
        if step not in self.STEPS:
            raise ValueError(f"step must be one of {self.STEPS}, got {step!r}")
        self.module = module
        self.options = options
        self.config = module.config
        self.parts = parts
        self.step_kind = step
        self.device = module.tok_emb.weight.device
        self.dtype = module.tok_emb.weight.dtype
        self.static_shapes = step == "compiled"
        self._lean = fast.LeanStep(module) if step == "lean" else None
        self._compiled = _compiled(_module_step) if step == "compiled" else None
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        return ", ".join((f"{self.device.type} {str(self.dtype).removeprefix('torch.')}", *self.parts))

    def __repr__(self) -> str:
        return f"InferenceModel({self.description})"

    def step(self, idx, positions, cache_pos, mask, slots: int | None) -> torch.Tensor:
        if self._compiled is not None:
            return self._compiled(self.module, idx, positions, cache_pos, mask, None)
        if self._lean is not None:
            return self._lean(self.module, idx, positions, cache_pos, mask, slots)
        return _module_step(self.module, idx, positions, cache_pos, mask, slots)

    def prefill(self, idx: torch.Tensor, last: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Logits (n, V) at each row's `last` position of right-padded prompts idx (n, T), written
        to cache slots 0..T-1 of cache rows `rows` (None = the first n)."""
        h = self.prefill_hidden(idx, rows)  # (n, T, H)
        return self.module.head(h[torch.arange(idx.shape[0], device=idx.device), last])  # (n, V)

    def prefill_hidden(self, idx: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """`prefill`'s hidden states of every position (n, T, H), for callers that need more than
        the last position's logits (the engine's prompt log-probabilities run `module.head` on them)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)  # (T,)
        return self.module.hidden(idx, pos, pos, None, rows, T)  # (n, T, H), causal: pads come last

    # -- ownership of the module's KV cache
    def claim(self) -> InferenceModel:
        """This model, or a fork when another engine holds it; `release()` when done."""
        if self._lock.acquire(blocking=False):
            return self
        return self.fork().claim()

    def release(self) -> None:
        self.module.clear_kv_cache()
        self._lock.release()

    def fork(self) -> InferenceModel:
        return InferenceModel(_view(self.module), self.options, self.parts, self.step_kind)


def _module_step(module: GPT, idx, positions, cache_pos, mask, slots) -> torch.Tensor:
    h = module.hidden(idx, positions, cache_pos, mask, None, slots)[:, -1]  # (B, H)
    return module.head(h)  # (B, V)


_COMPILED: dict = {}


def _compiled(step):
    fn = _COMPILED.get(step)
    if fn is None:
        # dynamic=False: one graph per (batch, cache length); the engine keeps those few.
        fn = _COMPILED[step] = torch.compile(step, dynamic=False, fullgraph=True)
    return fn


# ------------------------------------------------------------------------------------------ prepare
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepare(model: GPT | InferenceModel, options: InferenceOptions | None = None, **kwargs: Any) -> InferenceModel:
    """`model` (a GPT, or load_pretrained's result) prepared for inference with `options` (or
    InferenceOptions(**kwargs)); cached."""
    if options is not None and kwargs:
        raise ValueError("give prepare() an InferenceOptions or keyword options, not both")
    options = options or InferenceOptions.from_dict(kwargs)
    from .checkpoint.api import Pretrained  # at call time: checkpoint/ is not needed to prepare a GPT

    if isinstance(model, Pretrained):
        model = model.model
    if isinstance(model, InferenceModel):
        if options != InferenceOptions() and options != model.options:
            raise ValueError(f"{model!r} is already prepared with {model.options}; prepare the GPT itself "
                             f"for other options")
        return model
    if not isinstance(model, GPT):
        raise TypeError(f"prepare() takes a gpt3zh GPT (or an InferenceModel), got {type(model).__name__}")
    threads = torch.get_num_threads()
    copies = _needs_copy(model, options)
    kernel = model.tok_emb.weight.device.type == "cpu" and ckernel.load() is not None  # (cached)
    key = (options, threads, kernel, _weights_version(model, with_updates=copies))
    cached = _PREPARED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    _PREPARED.pop(model, None)  # free a stale copy before making a new one
    prepared = _build(model, options, threads, copies)
    _PREPARED[model] = (key, prepared)
    return prepared


def _needs_copy(model: GPT, options: InferenceOptions) -> bool:
    target = as_dtype(options.dtype)
    return (target is not None and target != model.tok_emb.weight.dtype) or (
        options.quantize is not None and not is_quantized(model))


def int8_scheme(options: InferenceOptions, device: torch.device, dtype: torch.dtype) -> str | None:
    """The int8 scheme `options` ask for on this device and dtype (None: no quantization)."""
    eager_cpu_fp32 = device.type == "cpu" and not options.compile and dtype == torch.float32
    if options.quantize == "int8":
        return "int8-dynamic" if eager_cpu_fp32 else "int8-weight"
    if options.quantize == "int8-dynamic" and not eager_cpu_fp32:
        raise ValueError(f"quantize='int8-dynamic' runs eager float32 on CPU (fbgemm); this model is {device.type} "
                         f"{str(dtype).removeprefix('torch.')}{' with compile=True' if options.compile else ''}: "
                         f"use quantize='int8' (weight-only int8 there)")
    return options.quantize


QUANTIZERS = {"int8-dynamic": quantize_int8_dynamic, "int8-weight": quantize_int8}
SCHEME_PARTS = {"int8-dynamic": "int8 weights and activations (fbgemm)", "int8-weight": "int8 weights"}


def _build(model: GPT, options: InferenceOptions, threads: int, copies: bool) -> InferenceModel:
    parts: list[str] = []
    if copies:
        dtype = as_dtype(options.dtype) or model.tok_emb.weight.dtype
        chosen = int8_scheme(options, model.tok_emb.weight.device, dtype)  # before copying: errors cost nothing
        module = _view(model)
        if dtype != model.tok_emb.weight.dtype:  # a cast copy: to() on the view would cast the model's own tensors
            module = copy.deepcopy(module).to(dtype)
            if module.tok_emb.weight.device.type == "cpu":  # (its own tensors: placed as load_pretrained's are)
                hugepages.place_model(module)
        if chosen is not None and not is_quantized(module):  # swaps the view's layers, never the model's
            QUANTIZERS[chosen](module)
    else:
        module = _view(model)
    if is_quantized(module):
        parts.append(SCHEME_PARTS[scheme(module)])
    w = module.tok_emb.weight
    plain = type(w.data) is torch.Tensor  # a DTensor (training-parallel) model is run as it is
    cpu = w.device.type == "cpu" and plain and not options.compile
    if options.cpu_kernels is True and not cpu:
        raise ValueError("cpu_kernels=True needs a CPU model and compile=False")
    step = "compiled" if options.compile else "modules"
    if cpu and options.cpu_kernels is not False:
        kernel = ckernel.load() if w.dtype in ckernel.DTYPES else None
        would_use = w.dtype in ckernel.DTYPES and bool(fast._packable(module))  # (int8 layers never do)
        packed = _pack(module, options.pack_weights, threads, kernel)
        few = f"1-{ckernel.MAX_ROWS} rows: gpt3zh's C kernel over {threads} thread{'s' * (threads > 1)}"
        if packed:
            layers = [m for m in module.modules() if isinstance(m, fast.PackedLinear)]
            rows = (few if any(m._wk is not None for m in layers) else
                    f"one row: chunked GEMV over {threads} threads" if any(m.chunks for m in layers) else "")
            parts.append(f"oneDNN-packed weights (a {human_bytes(packed)} copy" + (f"; {rows})" if rows else ")"))
        elif (threads > 1 or kernel is not None) and fast.chunk_layers(module, threads, kernel):
            parts.append(few if kernel is not None else f"chunked GEMV over {threads} threads")
        if would_use and kernel is None:
            parts.append(f"C kernel unavailable: {ckernel.unavailable()}")
        if packed or threads > 1 or kernel is not None:
            step = "lean"
    elif options.pack_weights:
        raise ValueError("pack_weights=True needs a CPU model with compile=False")
    names = {"lean": "flat decode step", "compiled": "compiled decode step", "modules": "module decode step"}
    parts.append(names[step])
    return InferenceModel(module, options, tuple(parts), step)


def _pack(module: GPT, wanted: bool | None, threads: int, kernel: ckernel.Kernel | None) -> int:
    """Pack `module`'s plain linear layers for oneDNN when `wanted` (None: when the copy fits in half
    the available memory); the bytes copied (0: not packed)."""
    need = fast.packable_bytes(module)
    if wanted is False or (wanted is None and not 0 < need <= available_memory() // 2):
        return 0
    if need == 0:
        dtype = module.tok_emb.weight.dtype
        why = (f"oneDNN does not run {str(dtype).removeprefix('torch.')} linear layers on this CPU (float32 always; "
               f"bfloat16 needs AVX-512)" if not fast.can_pack(dtype) else
               "the model has no plain linear layers to pack (int8 or tensor-parallel layers run as they are)")
        raise ValueError(f"pack_weights=True: {why}")
    return fast.pack_layers(module, chunks=threads, kernel=kernel)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}" if unit == "GiB" else f"{n / size:,.0f} {unit}"
    return f"{n / 2**10:,.0f} KiB"


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _view(model: GPT) -> GPT:
    """New module objects around the same parameter and buffer tensors, in eval mode, no KV cache."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    # packed weights (fbgemm's int8, oneDNN's) are shared too (deepcopy would repack or fail on them)
    packed = (m for m in model.modules() if isinstance(m, Int8DynamicLinear | fast.PackedLinear))
    memo.update({id(m.packed): m.packed for m in packed})
    memo.update({id(b.attn.kv_cache): None for b in model.blocks if b.attn.kv_cache is not None})
    view = copy.deepcopy(model, memo)
    view.cache_len = 0
    return view.eval()


def _weights_version(model: GPT, with_updates: bool) -> tuple:
    """Changes when a weight tensor is replaced or a layer swapped (and, with_updates, when one is
    updated in place). Buffers count: int8 weights are buffers."""
    tensors = (*model.parameters(), *model.buffers())
    if with_updates:
        return tuple((t.data_ptr(), t._version) for t in tensors)
    return tuple(t.data_ptr() for t in tensors)
