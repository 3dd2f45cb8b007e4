"""int8 inference, applied to a built model as module swaps (model.py is never edited).

Two schemes, both with int8 weights per output channel (absmax / 127, symmetric, round to nearest):

- **dynamic int8 (W8A8)**, `Int8DynamicLinear` / `quantize_int8_dynamic(model)`, CPU only: the
  activations are quantized too, per row at run time, and the matmul multiplies int8 by int8 in
  fbgemm (PyTorch's x86 int8 GEMM, `torch.ops.quantized.linear_dynamic`, VNNI where the CPU has
  it), as CTranslate2's int8 does. A decode step reads 4x fewer weight bytes than fp32 and does no
  int8 -> float conversion, so it runs near the memory bandwidth (docs/benchmarks.md "CPU peers").
- **weight-only int8**, `QuantLinear` / `quantize_int8(model)`: float activations times dequantized
  weights. On accelerators `F.linear(x, w.to(x.dtype)) * scale`, which inductor fuses into one
  kernel under torch.compile (the gpt-fast recipe); on CPU `torch._weight_int8pack_mm` with bf16
  activations (its fp32-activation path is scalar on many CPUs).

`gpt3zh.prepare(model, quantize="int8")` picks dynamic int8 for eager CPU decoding and weight-only
int8 everywhere else (compiled steps, accelerators); "int8-dynamic" / "int8-weight" force one.
Both give the tied output head its own int8 copy of the embedding; the embedding lookup keeps the
float table (a gather reads one row per token: quantizing it saves memory but no time).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .model import GPT


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights (N, K), fp32 scales (N,)) with w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,); an all-zero row keeps scale > 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


# ------------------------------------------------------------------------------ weight-only int8
class QuantLinear(nn.Module):
    """y = x @ (q * scale)^T + bias, with q int8 (N, K) and scale (N,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, scale = quantize_per_channel(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            y = self._cpu_matmul(x)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _cpu_matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = int8_matmul_cpu(x.reshape(-1, self.in_features), self.weight, self.scale)  # (M, N)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


# A custom op so that torch.compile calls the kernel as it is: inductor's own lowering of
# _weight_int8pack_mm rejects a fused (pointwise) input, and the bf16 cast must stay outside anyway.
@torch.library.custom_op("gpt3zh::int8_matmul_cpu", mutates_args=())
def int8_matmul_cpu(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float @ (q (N, K) int8 * scale (N,))^T -> (M, N) in x's dtype, via bf16 activations."""
    y = torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scale.to(torch.bfloat16))
    return y.to(x.dtype)


@int8_matmul_cpu.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[0])


def quantize_int8(model: GPT) -> GPT:
    """Weight-only int8, in place (every nn.Linear and the tied head); returns the model.

    Module swaps only: every nn.Linear becomes a QuantLinear, and the TiedHead becomes a QuantLinear
    over an int8 copy of the embedding. A quantized model is for inference only: it has no
    trainable weights in its linears and cannot be saved by `save_model` (quantize after loading).
    """
    if is_quantized(model):
        return model
    _swap_linears(model, QuantLinear.from_linear)
    model.head = QuantLinear(model.tok_emb.weight, None)
    return model


# ------------------------------------------------------------------------- dynamic int8 (W8A8)
def _range_row(k: int) -> torch.Tensor:
    """The row appended to a multi-row input (see Int8DynamicLinear): min -128/127, max 1."""
    row = torch.zeros(1, k)
    row[0, 0], row[0, -1] = -128.0 / 127.0, 1.0
    return row


class Int8DynamicLinear(nn.Module):
    """y = x @ W^T + bias with W int8 per output channel and x quantized per row at run time.

    The weight is packed once for fbgemm (`torch.ops.quantized.linear_prepack`); a call quantizes
    the input and multiplies int8 by int8 with int32 sums (exact), then scales back to float.
    fbgemm quantizes its whole input with one affine uint8 grid from the input's min and max, so:
    - one row (every batch-1 decode step): the row is its own input, so it gets the grid of its own
      range (256 levels over [min, max]) and nothing else runs around the kernel;
    - several rows (prefill, batched decoding): each row is divided by its absmax, and a fixed row
      with min -128/127 and max 1 is appended, so the grid is always scale 1/127, zero point 128,
      i.e. symmetric int8 per row (CTranslate2's scheme), whatever the other rows hold: a row's
      result never depends on which rows share its batch. The output rows are scaled back.
    Float inputs other than fp32 are computed in fp32 and returned in their dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError(f"dynamic int8 runs on CPU (fbgemm); the weight is on {weight.device}")
        q, scale = quantize_per_channel(weight)
        self.out_features, self.in_features = q.shape
        # weight / scale / bias as QuantLinear holds them (state_dict, inspection, reference checks);
        # `packed` is fbgemm's layout of the same int8 numbers, which is what runs. Reading it back
        # (linear_unpack) costs milliseconds, so the model code's `.weight.shape` reads the buffer.
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        zero = torch.zeros_like(scale, dtype=torch.long)
        with warnings.catch_warnings():  # torch's quantized-tensor deprecation notice: only the packing uses one
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            # the bias goes in too: fbgemm adds it in its output stage, so a one-row call is one op
            self.packed = torch.ops.quantized.linear_prepack(qw, self.bias)
        self.reduce_range = not _has_vnni()
        # fp32 whatever the model's dtype (not buffers): the appended row, and the bias fbgemm packed
        self._range_row = _range_row(self.in_features)
        self._bias = self.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8DynamicLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        dtype = x2.dtype
        x2 = x2.float()
        y = self.one_row(x2) if x2.shape[0] == 1 else self.rows(x2)  # (M, N)
        return y.to(dtype).view(*lead, self.out_features)

    def one_row(self, x: torch.Tensor) -> torch.Tensor:
        """(1, K) fp32 -> (1, N): the decode step's call (fast.LeanStep calls it directly)."""
        return _LINEAR_DYNAMIC(x, self.packed, self.reduce_range)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) fp32 -> (M, N), each row on its own symmetric int8 grid (see the class docstring)."""
        s = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_(min=1e-30)  # (M, 1)
        y = _LINEAR_DYNAMIC(torch.cat([x / s, self._range_row]), self.packed, self.reduce_range)[:-1]  # (M, N)
        if self._bias is None:
            return y.mul_(s)
        return y.sub_(self._bias).mul_(s).add_(self._bias)  # (W x / s + b - b) * s + b

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weights per channel, "
                f"int8 activations per row")


_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default  # the overload itself: less dispatch per call


@functools.cache
def _has_vnni() -> bool:
    """Whether the CPU multiplies uint8 by int8 into int32 without saturation (AVX512-VNNI / AVX-VNNI).
    Without it fbgemm's u8 x s8 pair sums saturate at int16 unless activations use 7 bits
    (reduce_range, as torch.ao's dynamic Linear does by default)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_int8_dynamic(model: GPT) -> GPT:
    """Dynamic int8 (W8A8), in place: every nn.Linear and the tied head become Int8DynamicLinear
    (CPU only; inference only, like `quantize_int8`); returns the model."""
    if is_quantized(model):
        return model
    _swap_linears(model, Int8DynamicLinear.from_linear)
    model.head = Int8DynamicLinear(model.tok_emb.weight, None)
    return model


# ------------------------------------------------------------------------------------ shared
def _swap_linears(model: nn.Module, make) -> None:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, make(child))


def is_quantized(model: nn.Module) -> bool:
    return isinstance(getattr(model, "head", None), QuantLinear | Int8DynamicLinear)


def scheme(model: nn.Module) -> str | None:
    """"int8-dynamic", "int8-weight" or None: how `model` is quantized (its head tells)."""
    head = getattr(model, "head", None)
    if isinstance(head, Int8DynamicLinear):
        return "int8-dynamic"
    return "int8-weight" if isinstance(head, QuantLinear) else None
