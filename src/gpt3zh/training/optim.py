"""Optimizer construction, the bf16-parameter AdamW, activation checkpointing and a memory estimate.

Weight decay skips biases, LayerNorm weights and the embeddings (the tied output head is the
token embedding), as Megatron and nanoGPT do: decaying them only pulls scale parameters to zero.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import GPTConfig
from .config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or name.endswith("_emb.weight")  # biases and norms are 1-D
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    trained = next(p for p in model.parameters() if p.requires_grad)  # LoRA: fp32 adapters on a frozen bf16 base
    if trained.dtype == torch.bfloat16:
        return BF16AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    # fused kernels on CUDA: one launch for all parameters and no foreach temporaries
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW for bf16 parameters: fp32 moments, the update computed in fp32 and rounded back to
    bf16 stochastically.

    Rounding to nearest would drop every update smaller than half a bf16 ulp (2^-9 relative, so
    lr 1e-5 updates vanish); stochastic rounding keeps them right in expectation, without the
    4 bytes/param of an fp32 master copy. Per parameter: 2 (bf16 weight) + 2 (bf16 grad) + 8
    (fp32 moments) = 12 bytes, against 16 for fp32 AdamW (+4 more for fp32 master + bf16 copy).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = float(state["step"])
                g = p.grad.float()
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
                w = p.float().mul_(1 - group["lr"] * group["weight_decay"])
                w.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))
                p.copy_(stochastic_round_bf16(w))


def stochastic_round_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction."""
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)  # uniform over the 16 bits bf16 drops
    rounded = ((bits + noise) & -65536).view(torch.float32)  # low 16 bits zero: exact in bf16
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each transformer block in the backward pass instead of storing its activations.

    torch's composable `checkpoint` (non-reentrant, through module hooks): the model's structure,
    its parameter names and forward stay as they are, so the tensor-parallel plan, FSDP and
    checkpoints see the same model. Dropout masks are replayed exactly (the RNG state is restored
    for the recompute). Applying it twice is a no-op.
    """
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        if checkpoint.state(block) is None:
            checkpoint(block)
    return model


# ------------------------------------------------------------------------------------ memory estimate
def estimate_memory(
    cfg: GPTConfig,
    batch_size: int,
    seq_len: int,
    precision: str = "bf16",
    param_dtype: str = "bf16",
    activation_checkpointing: bool = True,
) -> dict[str, float]:
    """Rough peak GPU bytes of one training step on one device (weights, grads, AdamW, activations).

    Activations per layer and token, from the shapes in model.py (SDPA keeps no T x T matrix):
    about 9*H + 2*F values (ln_1/ln_2 in and out, qkv 3H, attention out, residuals, fc out and
    GELU out F each; 34*H bytes at 16 bits for F = 4H, as Korthikanti et al. 2022 count). With
    checkpointing only each block's input (H values) is kept, plus one block's full activations
    during its recompute. The head's logits and their gradient (fp32, V per trained token) are
    counted for every token. CUDA context and allocator slack (~1-2 GiB) are not included.
    """
    n = cfg.num_params
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    if param_dtype == "bf16":
        weights, grads, optim = 2 * n, 2 * n, 8 * n
    else:
        weights, grads, optim = 4 * n, 4 * n, 8 * n
    tokens = batch_size * seq_len
    h = cfg.d_model
    per_layer_full = tokens * (9 * h + 2 * cfg.ffn_dim) * act_bytes
    if activation_checkpointing:
        acts = cfg.n_layer * tokens * h * act_bytes + per_layer_full
    else:
        acts = cfg.n_layer * per_layer_full
    logits = 2 * tokens * cfg.vocab_size * 4  # fp32 logits + their gradient
    total = weights + grads + optim + acts + logits
    gib = 1024**3
    return {
        "weights_gib": weights / gib,
        "grads_gib": grads / gib,
        "optimizer_gib": optim / gib,
        "activations_gib": acts / gib,
        "logits_gib": logits / gib,
        "total_gib": total / gib,
        "params": n,
    }


def format_estimate(est: dict[str, float]) -> str:
    parts = [f"{k[:-4]} {v:.2f}" for k, v in est.items() if k.endswith("_gib")]
    return "estimated GPU memory (GiB): " + ", ".join(parts) + f" ({est['params'] / 1e9:.2f}B params)"
