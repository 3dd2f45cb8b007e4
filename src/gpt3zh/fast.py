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
- `decode_model(model)`: on CPU, a view of the model for decoding (the same parameter tensors,
  nothing copied) whose linear layers and tied head run few-row inputs as `ChunkedLinear`: one
  GEMV per thread over contiguous row blocks of the weight. A decode step reads every weight once
  for one token, so it is bound by memory bandwidth, and MKL's fp32 GEMV streams a weight with
  about one core's bandwidth whatever the thread count; `torch.bmm` over k = threads row blocks
  runs the blocks on all cores (base preset, 2 cores: 28.6 ms instead of F.linear's 39.6 ms for
  all weights once, benchmarks/linear_layout.py and docs/benchmarks.md). Many-row inputs (a long prefill) take F.linear as before.
- `decode_step(view)`: `LeanStep`, the view's one-token decode step as a flat loop over its tensors
  (the modules' computation op for op, without module calls), ~12% faster per step on CPU.
"""

from __future__ import annotations

import copy
import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .model import GPT
from .quantize import is_quantized, quantize_int8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("int8",)
CACHE_BUCKET = 64

# ChunkedLinear takes F.linear above this many input rows: there the GEMM is compute-bound and MKL
# already uses every core (crossover on 2 cores between 512 and 1024 rows: benchmarks/linear_layout.py).
CHUNKED_MAX_ROWS = 512

_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DECODE_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LEAN_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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


# ----------------------------------------------------------------------- CPU decode: chunked GEMV
class ChunkedLinear(nn.Module):
    """`F.linear(x, weight, bias)` for inputs of few rows, as `chunks` GEMVs run side by side.

    The weight (out, in) is viewed (no copy) as `chunks` contiguous blocks of out/chunks rows; one
    `torch.bmm` multiplies the input by every block, and ATen runs the batch entries on separate
    threads, so each core streams its own part of the weight. The result equals F.linear up to the
    order of the float sums (<= 1e-6 relative in fp32). Inputs of more than `max_rows` rows, and
    calls that need gradients, go to F.linear.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, chunks: int,
                 max_rows: int = CHUNKED_MAX_ROWS) -> None:
        super().__init__()
        if weight.shape[0] % chunks:
            raise ValueError(f"{weight.shape[0]} output features do not split into {chunks} equal blocks")
        self.weight, self.bias = weight, bias  # the original Parameters, shared
        self.chunks, self.max_rows = chunks, max_rows
        # Views made once (a decode step calls each layer once per token, so ops per call count):
        # they share the parameters' storage, so in-place weight updates show. decode_model builds
        # a new view whenever a parameter tensor is replaced.
        self._w = weight.detach().view(chunks, -1, weight.shape[1]).transpose(1, 2)  # (k, in, out/k)
        self._b = None if bias is None else bias.detach().view(chunks, 1, -1)  # (k, 1, out/k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in = x.shape[-1]
        rows = x.numel() // n_in
        if rows > self.max_rows or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return _gemv(x.reshape(rows, n_in), self._w, self._b, self.chunks).view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, chunks={self.chunks}, max_rows={self.max_rows}"


def decode_model(model: GPT) -> GPT:
    """The model to run prefill and decode steps with.

    On CPU with more than one thread: a cached view of `model` (its own module objects around the
    same parameter and buffer tensors, so nothing is copied and in-place weight updates show) in which
    every nn.Linear and the tied head are ChunkedLinear over torch.get_num_threads() blocks. The view
    is rebuilt when the thread count or any parameter tensor changes. Elsewhere (accelerators, one
    thread, an int8 or tensor-parallel model, a layer whose width does not split evenly) the layer
    is left as it is, and `model` itself is returned when nothing changes.
    """
    k = torch.get_num_threads()
    w = model.tok_emb.weight
    # type(p.data) is a tensor subclass (DTensor) for a tensor-parallel model: left as it is.
    if k < 2 or w.device.type != "cpu" or type(w.data) is not torch.Tensor or "head" in vars(model):
        return model
    key = (k, _weights_version(model))
    cached = _DECODE_VIEWS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, shared)
    replaced = False
    for parent in list(view.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and type(child.weight.data) is torch.Tensor and child.out_features % k == 0:
                setattr(parent, name, ChunkedLinear(child.weight, child.bias, k))
                replaced = True
    if view.config.vocab_size % k == 0:
        view.lm_head = ChunkedLinear(view.tok_emb.weight, None, k)
        object.__setattr__(view, "head", view.lm_head)  # shadows GPT.head, as quantize_int8 does
        replaced = True
    result = view if replaced else model
    _DECODE_VIEWS[model] = (key, result)
    if replaced:
        _LEAN_STEPS[view] = LeanStep(view)
    return result


# ------------------------------------------------------------------ CPU decode: the one-token step
def decode_step(model: GPT):
    """The function that runs one decode step of `model`: `(model, idx (B, 1), positions (B, 1),
    cache_pos, mask) -> logits (B, V)`, the signature of generation's `_last_logits`.

    For a CPU decode view (`decode_model`) in eval mode this is `LeanStep`: the same computation as
    the modules' forward, written as one flat loop over the layers' tensors. A decode step on CPU
    is ~50 GEMVs plus ~200 small ops; between two GEMVs that each stream megabytes of weights, the
    small ops and the Python around them run with cold caches, so every module call and view
    saved counts (base preset, 2 cores: ~3 ms of a ~33 ms step, docs/benchmarks.md). Otherwise
    (not a decode view, training mode): None, and the caller runs the modules.
    """
    step = _LEAN_STEPS.get(model)  # made by decode_model with the view
    return None if model.training else step


class LeanStep:
    """Model.hidden + head for one new token per row, in eval mode, as a flat loop (see decode_step).

    Called with the view it was made for. Reads its parameters, KV caches and ChunkedLinear views at
    call time (nothing copied); a layer that is a plain nn.Linear runs F.linear. Numerically it is
    the modules' computation op for op, so its logits equal theirs (tests/test_fast.py).
    """

    def __init__(self, model: GPT) -> None:
        # No reference to `model` itself: _LEAN_STEPS is keyed weakly by it, and a value that held
        # its key would keep the view, and through it the weights, alive for ever.
        cfg = model.config
        self.shape, self.eps = (cfg.d_model,), cfg.ln_eps
        self.head_dim = cfg.head_dim
        self.layers = [
            (b.ln_1.weight, b.ln_1.bias, _gemv_args(b.attn.qkv), b.attn, _gemv_args(b.attn.proj),
             b.ln_2.weight, b.ln_2.bias, _gemv_args(b.mlp.fc), b.mlp.approximate, _gemv_args(b.mlp.proj))
            for b in model.blocks
        ]
        head = vars(model).get("head")  # decode_model's ChunkedLinear, shadowing GPT.head (tied)
        self.head = _gemv_args(head) if isinstance(head, nn.Module) else (model.tok_emb.weight, None, 0)

    def __call__(self, model, idx, positions, cache_pos, mask) -> torch.Tensor:
        """mask: (B, 1, 1, S), bool or additive float. None when no row is padded and every row
        writes the same slot (cache_pos (1,)): the step then attends to slots 0..cache_pos only,
        which is what the causal mask would allow, without building or applying a mask."""
        # Called inside generation's inference mode; dropout is off (eval mode, see decode_step).
        B, T = idx.shape
        if T != 1:
            raise ValueError(f"LeanStep runs one new token per row, got idx of shape {tuple(idx.shape)}")
        filled = None
        if mask is None:
            if cache_pos.dim() != 1:
                raise ValueError("LeanStep without a mask needs one shared cache slot, cache_pos of shape (1,)")
            filled = int(cache_pos[-1]) + 1  # a CPU tensor: no device sync
        D, shape, eps = self.head_dim, self.shape, self.eps
        x = (F.embedding(idx, model.tok_emb.weight) + F.embedding(positions, model.pos_emb.weight)).view(B, -1)  # (B, H)
        for ln1_w, ln1_b, qkv, attn, proj, ln2_w, ln2_b, fc, approximate, fc2 in self.layers:
            h = _gemv(F.layer_norm(x, shape, ln1_w, ln1_b, eps), *qkv).view(B, 1, -1, 3, D)  # (B, 1, N, 3, D)
            q, k, v = h.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, N, 1, D)
            k, v = attn.kv_cache.update(cache_pos, k, v)  # (B, N, S, D)
            if filled is not None:
                k, v = k[:, :, :filled], v[:, :, :filled]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, N, 1, D)
            x = x + _gemv(y.view(B, -1) if B == 1 else y.transpose(1, 2).reshape(B, -1), *proj)
            h = F.gelu(_gemv(F.layer_norm(x, shape, ln2_w, ln2_b, eps), *fc), approximate=approximate)
            x = x + _gemv(h, *fc2)
        return _gemv(F.layer_norm(x, shape, model.ln_f.weight, model.ln_f.bias, eps), *self.head)  # (B, V)


def _gemv_args(layer: nn.Module) -> tuple:
    """(weight, bias, chunks) for _gemv: a ChunkedLinear's block views, or an nn.Linear's own."""
    if type(layer) is ChunkedLinear:
        return layer._w, layer._b, layer.chunks
    return layer.weight, layer.bias, 0


def _gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, chunks: int) -> torch.Tensor:
    """(B, in) -> (B, out): the chunked GEMV (ChunkedLinear's few-row path), or F.linear (chunks 0)."""
    if not chunks:
        return F.linear(x, w, b)
    B = x.shape[0]
    x3 = x.view(1, B, -1).expand(chunks, B, -1)
    y = torch.bmm(x3, w) if b is None else torch.baddbmm(b, x3, w)  # (k, B, out/k)
    return y.view(1, -1) if B == 1 else y.transpose(0, 1).reshape(B, -1)
