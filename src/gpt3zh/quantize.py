"""Weight-only int8 quantization, applied to a built model (model.py is never edited).

`quantize_int8(model)` replaces every nn.Linear by a `QuantLinear` holding int8 weights (N, K) and
one fp scale per output channel (absmax / 127, symmetric, round to nearest), and gives the tied
output head its own int8 copy of the embedding (`model.head`). The embedding lookup keeps the
float table: a gather reads one row per token, so quantizing it saves memory but no time.

How the int8 matmul runs, per device (measured, docs/benchmarks.md "Fast inference (CPU)"):
- CPU: `torch._weight_int8pack_mm` with bf16 activations. Its fp32-activation path is scalar on
  AVX2 machines (8-10x slower than the fp32 GEMV), while the bf16 path is vectorized; the bf16
  rounding of activations (8 mantissa bits) is below the int8 weight error.
- other devices: dequantize in the matmul, `F.linear(x, w.to(x.dtype)) * scale`, which inductor
  fuses into one kernel under torch.compile (the gpt-fast recipe).
"""

from __future__ import annotations

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
    """Quantize `model` in place (every nn.Linear and the tied head) and return it.

    Module swaps only: every nn.Linear becomes a QuantLinear, and the TiedHead becomes a QuantLinear
    over an int8 copy of the embedding (the float table stays for the token lookup, where a gather
    reads one row per token: quantizing it would save memory but no time). A quantized model is for
    inference only: it has no trainable weights in its linears and cannot be saved by `save_model`
    (quantize after loading instead).
    """
    if is_quantized(model):
        return model
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, QuantLinear.from_linear(child))
    model.head = QuantLinear(model.tok_emb.weight, None)
    return model


def is_quantized(model: nn.Module) -> bool:
    return isinstance(getattr(model, "head", None), QuantLinear)
