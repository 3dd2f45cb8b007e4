"""CPU decoding kernels, applied to a model as module swaps (model.py stays as it is).

A decode step multiplies one row per sequence by every weight once, so on CPU it is bound by how
fast the weights stream from memory. MKL's fp32 GEMV (what F.linear calls for one row) streams a
weight with about one core's bandwidth whatever the thread count; `torch.bmm` over k = threads
contiguous row blocks of the weight runs the blocks on all cores (base preset, 2 cores: 28.6 ms
instead of F.linear's 39.6 ms for all weights once, benchmarks/linear_layout.py).

- `ChunkedLinear`: that layout for inputs of few rows (F.linear above CHUNKED_MAX_ROWS rows).
- `chunk_layers(model, k)`: swap every plain nn.Linear and the tied head for ChunkedLinear around
  the same weight tensors (nothing copied). `gpt3zh.inference.prepare` applies it to its own view of
  a model, never to the caller's.
- `LeanStep`: the one-token decode step of a model as one flat loop over its layers' tensors (the
  modules' computation op for op, no module calls, no dropout no-ops). Between two GEMVs that each
  stream megabytes of weights, every small op and the Python around it runs with cold caches, so
  the flat loop is ~12% faster per step than the modules (base preset, batch 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import GPT, TiedHead
from .quantize import Int8DynamicLinear

# ChunkedLinear takes F.linear above this many input rows: there the GEMM is compute-bound and MKL
# already uses every core (crossover on 2 cores between 512 and 1024 rows: benchmarks/linear_layout.py).
CHUNKED_MAX_ROWS = 512


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
        # they share the parameters' storage, so in-place weight updates show.
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


def chunk_layers(model: GPT, chunks: int) -> int:
    """Swap, in place, every plain nn.Linear (out features divisible by `chunks`) and the tied head
    (vocab divisible) for ChunkedLinear over the same tensors; return how many were swapped.

    Other layer types (int8, tensor-parallel) are left as they are.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            plain = type(child) is nn.Linear and type(child.weight.data) is torch.Tensor
            tied = type(child) is TiedHead and type(child.weight.data) is torch.Tensor
            if (plain or tied) and child.weight.shape[0] % chunks == 0:
                setattr(parent, name, ChunkedLinear(child.weight, getattr(child, "bias", None), chunks))
                swapped += 1
    return swapped


# ------------------------------------------------------------------ CPU decode: the one-token step
class LeanStep:
    """GPT.hidden + head for one new token per row, in eval mode, as a flat loop.

    Made for one model (a prepared copy: `gpt3zh.inference.prepare`) and called with it. Reads its
    parameters, KV caches and ChunkedLinear views at call time (nothing copied); a plain nn.Linear
    runs F.linear and any other layer (int8, tensor-parallel) is called as the module. Numerically it
    is the modules' computation op for op, so its logits equal theirs (tests/test_fast.py).
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

    def __call__(self, model, idx, positions, cache_pos, mask, slots) -> torch.Tensor:
        """Logits (B, V) of one token per row. The arguments are GPT.hidden's: mask (B, 1, 1, S)
        bool or additive float, or None when every row writes the same slot and attends to the
        first `slots` slots (cache_pos (1,) = slots - 1)."""
        B, T = idx.shape
        if T != 1:
            raise ValueError(f"LeanStep runs one new token per row, got idx of shape {tuple(idx.shape)}")
        if mask is not None:
            slots = mask.shape[-1]
        D, shape, eps = self.head_dim, self.shape, self.eps
        x = F.embedding(idx, model.tok_emb.weight) + F.embedding(positions, model.pos_emb.weight)
        x = x.view(B, -1)  # (B, H)
        for ln1_w, ln1_b, qkv, attn, proj, ln2_w, ln2_b, fc, approximate, fc2 in self.layers:
            h = _gemv(F.layer_norm(x, shape, ln1_w, ln1_b, eps), *qkv).view(B, 1, -1, 3, D)  # (B, 1, N, 3, D)
            q, k, v = h.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, N, 1, D)
            k, v = attn.kv_cache.update(cache_pos, k, v, None, slots)  # (B, N, S, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, N, 1, D)
            x = x + _gemv(y.view(B, -1) if B == 1 else y.transpose(1, 2).reshape(B, -1), *proj)
            h = F.gelu(_gemv(F.layer_norm(x, shape, ln2_w, ln2_b, eps), *fc), approximate=approximate)
            x = x + _gemv(h, *fc2)
        return _gemv(F.layer_norm(x, shape, model.ln_f.weight, model.ln_f.bias, eps), *self.head)  # (B, V)


def _layer_args(layer: nn.Module) -> tuple:
    """(weight, bias, chunks) for _gemv: a ChunkedLinear's block views (chunks > 0), an nn.Linear's
    or the tied head's own tensors (0), a dynamic int8 layer (-2), or any other layer as a module
    to call (-1)."""
    if type(layer) is Int8DynamicLinear:
        return layer, None, -2
    if type(layer) is ChunkedLinear:
        return layer._w, layer._b, layer.chunks
    if type(layer) is nn.Linear:
        return layer.weight, layer.bias, 0
    if type(layer) is TiedHead:
        return layer.weight, None, 0
    return layer, None, -1


def _gemv(x: torch.Tensor, w, b: torch.Tensor | None, chunks: int) -> torch.Tensor:
    """(B, in) -> (B, out): the chunked GEMV (chunks > 0), F.linear (0), dynamic int8 (-2; its
    one-row call without the module's reshapes), or the module `w` (-1)."""
    if chunks <= 0:
        if chunks == -2:
            return w.one_row(x) if x.shape[0] == 1 else w.rows(x)
        return F.linear(x, w, b) if chunks == 0 else w(x)
    B = x.shape[0]
    x3 = x.view(1, B, -1).expand(chunks, B, -1)
    y = torch.bmm(x3, w) if b is None else torch.baddbmm(b, x3, w)  # (k, B, out/k)
    return y.view(1, -1) if B == 1 else y.transpose(0, 1).reshape(B, -1)
