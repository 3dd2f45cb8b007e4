"""CPU decoding kernels, applied to a model as module swaps (model.py stays as it is).

A decode step multiplies one row per sequence by every weight once, so on CPU it is bound by how
fast the weights stream from memory. For 1-3 rows gpt3zh's own C kernel (`gpt3zh.ckernel`, float32
and bfloat16) streams them at ~95% of a plain reduction's bandwidth; of torch's kernels, MKL's GEMV
(what F.linear calls for one row) streams a weight with about one core's bandwidth whatever the
thread count, and `torch.bmm` over k = threads contiguous row blocks of the weight runs the blocks
on all cores at 55-60% (base preset, docs/benchmarks.md, kernel survey).

- `ChunkedLinear`: for inputs of few rows, around the layer's own tensors: 1-3 rows on the C
  kernel when given, else the chunked bmm; F.linear above CHUNKED_MAX_ROWS rows.
- `chunk_layers(model, k, kernel)`: swap every plain nn.Linear and the tied head for ChunkedLinear
  (nothing copied). `gpt3zh.inference.prepare` applies it to its own view of a model, never to the
  caller's.
- `PackedLinear`: oneDNN's inner product on a copy of the weight packed once into its blocked
  layout (`torch.ops.mkldnn._reorder_linear_weight`, the layout torch.compile's CPU freezing uses)
  for 4 and more rows (batched decoding, prefill: 1.4-2.8x bmm or F.linear), 1-3 rows on the C
  kernel (or, without it, one row as the chunked bmm), at the cost of that copy; `pack_layers(model)`
  swaps it in.
- `LeanStep`: the one-token decode step of a model as one flat loop over its layers' tensors (the
  modules' computation op for op, no module calls, no dropout no-ops). Between two GEMVs that each
  stream megabytes of weights, every small op and the Python around it runs with cold caches, so
  the flat loop is ~12% faster per step than the modules (base preset, batch 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ckernel
from .model import GPT, TiedHead
from .quantize import Int8DynamicLinear

# ChunkedLinear takes F.linear above this many input rows: there the GEMM is compute-bound and MKL
# already uses every core (crossover on 2 cores between 512 and 1024 rows: benchmarks/linear_layout.py).
CHUNKED_MAX_ROWS = 512


# The row count oneDNN packs the weights for. Any count runs on them; packed for 8, one row runs as
# fast as on a one-row packing, and 2-32 rows much faster (1-row packings pick a GEMV-only layout).
PACK_ROWS = 8


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs linear layers of this dtype on this CPU (float32 always; bfloat16 with
    AVX-512 or AMX; float16 only on CPUs with AVX-512-FP16 / AMX-FP16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return {torch.float32: lambda: True, torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
            torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}.get(dtype, lambda: False)()


class PackedLinear(nn.Module):
    """`F.linear(x, weight, bias)` through oneDNN on a packed copy of the weight (no gradients).

    The copy is made once and made again when the weight changes (an in-place update or a new
    tensor: checked at each call), so the layer always computes with the current weight. The result
    equals F.linear up to the order of the float sums. Calls that need gradients go to F.linear.

    kernel (gpt3zh's C kernel; float32 and bfloat16 weights): inputs of 1-ckernel.MAX_ROWS rows run
    on it, over the original weight (all 49 base-preset matrices, one row: ~2x faster than packed).
    Else chunks > 1: one-row float32 inputs run as ChunkedLinear's `chunks` GEMVs on the original
    weight (as fast or a little faster than packed there; 2-8 rows 1.4-1.7x faster packed).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = PACK_ROWS,
                 chunks: int = 0, kernel: ckernel.Kernel | None = None) -> None:
        super().__init__()
        if not can_pack(weight.dtype) or weight.device.type != "cpu":
            raise ValueError(f"oneDNN does not run {weight.dtype} linear layers on this {weight.device.type}")
        if chunks > 1 and weight.shape[0] % chunks:
            raise ValueError(f"{weight.shape[0]} output features do not split into {chunks} equal blocks")
        self.weight, self.bias = weight, bias  # the original Parameters, shared
        self.rows, self.chunks = rows, chunks if chunks > 1 else 0
        self.kernel = kernel if weight.dtype in ckernel.DTYPES else None
        self._pack()

    def _pack(self) -> None:
        w, b, k = self.weight, self.bias, self.chunks
        self._packed_from = (w.data_ptr(), w._version, None if b is None else b.data_ptr())
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.rows)
        self._b = None if b is None else b.detach()
        # few rows read the original weight through the C kernel (it needs it contiguous)
        self._wk = w.detach() if self.kernel is not None and w.is_contiguous() else None
        if k:  # views of the current tensors, as ChunkedLinear's
            self._w = w.detach().view(k, -1, w.shape[1]).transpose(1, 2)
            self._bc = None if b is None else b.detach().view(k, 1, -1)

    @property
    def packed_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def run(self, x: torch.Tensor, gelu: str | None = None) -> torch.Tensor:
        """(..., in) -> (..., out) on the packed weight (packed again first if the weight changed);
        gelu "none" / "tanh": F.gelu of that (in the C kernel when it runs)."""
        w, b = self.weight, self.bias
        if (w.data_ptr(), w._version, None if b is None else b.data_ptr()) != self._packed_from:
            self._pack()
        n_in = x.shape[-1]
        if self._wk is not None and x.numel() <= ckernel.MAX_ROWS * n_in and x.dtype == w.dtype:
            return self.kernel.run(x.reshape(-1, n_in), self._wk, self._b, gelu=gelu).view(*x.shape[:-1], -1)
        if self.chunks and x.numel() == n_in:
            y = _gemv(x.reshape(1, -1), self._w, self._bc, self.chunks).view(*x.shape[:-1], -1)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self._b, "none", [], "")
        return y if gelu is None else F.gelu(y, approximate=gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return self.run(x)

    def extra_repr(self) -> str:
        one = (f", 1-{ckernel.MAX_ROWS} rows by the C kernel" if self._wk is not None else
               f", one row as {self.chunks} GEMVs" if self.chunks else "")
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, packed for {self.rows} rows{one}"


def pack_layers(model: GPT, chunks: int = 0, rows: int = PACK_ROWS, kernel: ckernel.Kernel | None = None) -> int:
    """Swap, in place, every plain nn.Linear and the tied head for PackedLinear over the same
    tensors (plus the packed copies); return the bytes those copies take. float32 and bfloat16
    layers run inputs of 1-ckernel.MAX_ROWS rows through `kernel` (gpt3zh's C kernel) when given;
    without it, float32 layers whose outputs split into `chunks` > 1 blocks run one-row inputs as
    chunked GEMVs. Other layer types (int8, tensor-parallel, chunked) are left as they are."""
    copied = 0
    for parent, name, child in _packable(model):
        w = child.weight
        k = chunks if w.dtype == torch.float32 and chunks > 1 and w.shape[0] % chunks == 0 else 0
        layer = PackedLinear(w, getattr(child, "bias", None), rows, k, kernel)
        setattr(parent, name, layer)
        copied += layer.packed_bytes
    return copied


def packable_bytes(model: GPT) -> int:
    """The bytes pack_layers(model) would copy (0 if oneDNN cannot run the model's dtype here)."""
    weights = [child.weight for _, _, child in _packable(model)]
    if not weights or not can_pack(weights[0].dtype) or weights[0].device.type != "cpu":
        return 0
    return sum(w.numel() * w.element_size() for w in weights)


def _packable(model: GPT) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of every plain nn.Linear and tied head: what pack_layers and
    chunk_layers swap."""
    return [(parent, name, child) for parent in list(model.modules()) for name, child in parent.named_children()
            if type(child) in (nn.Linear, TiedHead) and type(child.weight.data) is torch.Tensor]


class ChunkedLinear(nn.Module):
    """`F.linear(x, weight, bias)` for inputs of few rows, as `chunks` GEMVs run side by side.

    The weight (out, in) is viewed (no copy) as `chunks` contiguous blocks of out/chunks rows; one
    `torch.bmm` multiplies the input by every block, and ATen runs the batch entries on separate
    threads, so each core streams its own part of the weight. The result equals F.linear up to the
    order of the float sums (<= 1e-6 relative in fp32). Inputs of more than `max_rows` rows, and
    calls that need gradients, go to F.linear.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, chunks: int,
                 max_rows: int = CHUNKED_MAX_ROWS, kernel: ckernel.Kernel | None = None) -> None:
        super().__init__()
        if weight.shape[0] % chunks:
            raise ValueError(f"{weight.shape[0]} output features do not split into {chunks} equal blocks")
        self.weight, self.bias = weight, bias  # the original Parameters, shared
        self.chunks, self.max_rows = chunks, max_rows
        # Views made once (a decode step calls each layer once per token, so ops per call count):
        # they share the parameters' storage, so in-place weight updates show.
        self._w = weight.detach().view(chunks, -1, weight.shape[1]).transpose(1, 2)  # (k, in, out/k)
        self._b = None if bias is None else bias.detach().view(chunks, 1, -1)  # (k, 1, out/k)
        # 1-ckernel.MAX_ROWS rows through gpt3zh's C kernel, when given (float32 / bf16, contiguous weight)
        ok = kernel is not None and weight.dtype in ckernel.DTYPES and weight.is_contiguous()
        self.kernel = kernel if ok else None
        self._wk = weight.detach() if ok else None
        self._bk = None if bias is None or not ok else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return self.run(x)

    def run(self, x: torch.Tensor, gelu: str | None = None) -> torch.Tensor:
        """(..., in) -> (..., out), no gradients; gelu "none" / "tanh": F.gelu of that (in the C
        kernel when it runs)."""
        n_in = x.shape[-1]
        rows = x.numel() // n_in
        if self.kernel is not None and rows <= ckernel.MAX_ROWS and x.dtype == self.weight.dtype:
            return self.kernel.run(x.reshape(rows, n_in), self._wk, self._bk, gelu=gelu).view(*x.shape[:-1], -1)
        if rows > self.max_rows:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = _gemv(x.reshape(rows, n_in), self._w, self._b, self.chunks).view(*x.shape[:-1], -1)
        return y if gelu is None else F.gelu(y, approximate=gelu)

    def extra_repr(self) -> str:
        k = f", 1-{ckernel.MAX_ROWS} rows by the C kernel" if self.kernel is not None else ""
        return (f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, chunks={self.chunks}, "
                f"max_rows={self.max_rows}{k}")


def chunk_layers(model: GPT, chunks: int, kernel: ckernel.Kernel | None = None) -> int:
    """Swap, in place, every plain nn.Linear (out features divisible by `chunks`) and the tied head
    (vocab divisible) for ChunkedLinear over the same tensors; return how many were swapped. With
    `kernel` (gpt3zh's C kernel, float32 / bfloat16) every such layer is swapped and runs
    1-ckernel.MAX_ROWS rows through it (a layer that does not split runs other few-row inputs as
    one block).

    Other layer types (int8, tensor-parallel) are left as they are.
    """
    swapped = 0
    for parent, name, child in _packable(model):
        k = chunks if child.weight.shape[0] % chunks == 0 else 1 if kernel is not None else 0
        if k:
            setattr(parent, name, ChunkedLinear(child.weight, getattr(child, "bias", None), k, kernel=kernel))
            swapped += 1
    return swapped


# ------------------------------------------------------------------ CPU decode: the one-token step
class LeanStep:
    """GPT.hidden + head for one new token per row, in eval mode, as a flat loop.

    Made for one model (a prepared copy: `gpt3zh.inference.prepare`) and called with it. Reads its
    parameters, KV caches and ChunkedLinear views at call time (nothing copied); a plain nn.Linear
    runs F.linear and any other layer (int8, tensor-parallel) is called as the module. Numerically it
    is the modules' computation op for op, so its logits equal theirs (tests/test_fast.py); where the
    layers run on gpt3zh's C kernel, a float32 step with every row at one slot (no mask) writes the
    KV cache and attends in one C call instead (`ckernel.Kernel.attention`: SDPA's result up to float
    rounding; ~70 us less per layer than the cache-write ops and SDPA after a weight stream).
    """

    def __init__(self, model: GPT) -> None:
        # No reference to `model` itself: a cache keyed weakly by the model may hold this step.
        cfg = model.config
        self.shape, self.eps = (cfg.d_model,), cfg.ln_eps
        self.head_dim = cfg.head_dim
        self.layers = [
            (b.ln_1.weight, b.ln_1.bias, _layer_args(b.attn.qkv), b.attn, _layer_args(b.attn.proj),
             b.ln_2.weight, b.ln_2.bias, _layer_args(b.mlp.fc), b.mlp.approximate, _layer_args(b.mlp.proj))
            for b in model.blocks
        ]
        self.head = _layer_args(model.head)
        # gpt3zh's C kernel when the layers run on it (its decode attention then runs too)
        self.kernel = next((m.kernel for m in model.modules() if getattr(m, "kernel", None) is not None), None)

    def __call__(self, model, idx, positions, cache_pos, mask, slots) -> torch.Tensor:
        """Logits (B, V) of one token per row. The arguments are GPT.hidden's: mask (B, 1, 1, S)
        bool or additive float, or None when every row writes the same slot and attends to the
        first `slots` slots (cache_pos (1,) = slots - 1)."""
        B, T = idx.shape
        if T != 1:
            raise ValueError(f"LeanStep runs one new token per row, got idx of shape {tuple(idx.shape)}")
        if mask is not None:
            slots = mask.shape[-1]
        D, shape, eps, kernel = self.head_dim, self.shape, self.eps, self.kernel
        # every row at one slot, attending to the slots before it (no mask): the C kernel's attention
        fused = (kernel is not None and mask is None and slots is not None
                 and model.tok_emb.weight.dtype == torch.float32 and cache_pos.numel() == 1
                 and cache_pos.dtype == torch.int64 and int(cache_pos) == slots - 1)
        x = F.embedding(idx, model.tok_emb.weight) + F.embedding(positions, model.pos_emb.weight)
        x = x.view(B, -1)  # (B, H)
        for ln1_w, ln1_b, qkv, attn, proj, ln2_w, ln2_b, fc, approximate, fc2 in self.layers:
            h = _gemv(F.layer_norm(x, shape, ln1_w, ln1_b, eps), *qkv)  # (B, N * 3 * D)
            if fused:  # the cache write and the attention in one C call
                y = kernel.attention(h, attn.kv_cache.k, attn.kv_cache.v, cache_pos)  # (B, N * D)
            else:
                q, k, v = h.view(B, 1, -1, 3, D).permute(3, 0, 2, 1, 4).unbind(0)  # each (B, N, 1, D)
                k, v = attn.kv_cache.update(cache_pos, k, v, None, slots)  # (B, N, S, D)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, N, 1, D)
                y = y.view(B, -1) if B == 1 else y.transpose(1, 2).reshape(B, -1)
            x = x + _gemv(y, *proj)
            h = _gemv(F.layer_norm(x, shape, ln2_w, ln2_b, eps), *fc, gelu=approximate)
            x = x + _gemv(h, *fc2)
        return _gemv(F.layer_norm(x, shape, model.ln_f.weight, model.ln_f.bias, eps), *self.head)  # (B, V)


def _layer_args(layer: nn.Module) -> tuple:
    """(weight, bias, chunks) for _gemv: a ChunkedLinear's block views (chunks > 0), an nn.Linear's
    or the tied head's own tensors (0), a dynamic int8 layer (-2), a packed layer or a chunked one
    with the C kernel (-3: its `run`), or any other layer as a module to call (-1)."""
    if type(layer) is PackedLinear:
        return layer, None, -3
    if type(layer) is Int8DynamicLinear:
        return layer, None, -2
    if type(layer) is ChunkedLinear:
        return (layer, None, -3) if layer.kernel is not None else (layer._w, layer._b, layer.chunks)
    if type(layer) is nn.Linear:
        return layer.weight, layer.bias, 0
    if type(layer) is TiedHead:
        return layer.weight, None, 0
    return layer, None, -1


def _gemv(x: torch.Tensor, w, b: torch.Tensor | None, chunks: int,
          gelu: str | None = None) -> torch.Tensor:
    """_linear, then F.gelu(approximate=gelu) when gelu is given (fused where the layer's `run`
    runs the C kernel)."""
    if chunks == -3:
        return w.run(x, gelu)
    y = _linear(x, w, b, chunks)
    return y if gelu is None else F.gelu(y, approximate=gelu)


def _linear(x: torch.Tensor, w, b: torch.Tensor | None, chunks: int) -> torch.Tensor:
    """(B, in) -> (B, out): the chunked GEMV (chunks > 0), F.linear (0), dynamic int8 (-2; its
    one-row call without the module's reshapes), packed (-3) or the module `w` (-1)."""
    if chunks <= 0:
        if chunks == -3:
            return w.run(x)
        if chunks == -2:
            return w.one_row(x) if x.shape[0] == 1 else w.rows(x)
        return F.linear(x, w, b) if chunks == 0 else w(x)
    B = x.shape[0]
    x3 = x.view(1, B, -1).expand(chunks, B, -1)
    y = torch.bmm(x3, w) if b is None else torch.baddbmm(b, x3, w)  # (k, B, out/k)
    return y.view(1, -1) if B == 1 else y.transpose(0, 1).reshape(B, -1)
