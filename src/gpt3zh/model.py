"""The GPT-3 model: plain single-device PyTorch, plus its static KV cache.

Shape letters: B batch, T query length, S cache (key) length, H d_model, N heads, D head_dim,
F ffn width, V vocab.

Parallelism, compilation, quantization and generation are functions applied to this module
elsewhere; nothing here knows about them. Two things keep that possible: heads are inferred from
the local qkv width (`view(B, T, -1, 3, D)`), so a column-sharded qkv just works, and the qkv
out-features are laid out per head as [N, 3, D] (Megatron's layout), so a contiguous column split
gives each tensor-parallel rank whole heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig


class KVCache(nn.Module):
    """Preallocated keys/values for one layer: (B, N, S, D), written in place at `cache_pos`.

    A call addresses a subset of the cache: `rows` (None = the first B rows, B = the input's batch;
    or a (B,) tensor of row indices, e.g. the free rows a serving engine prefills) and `slots` (the
    first `slots` slots are returned for attention; None = all). Writes always land in the shared
    buffers, so one cache serves batches of any size up to its own.
    """

    def __init__(self, batch: int, max_len: int, n_head: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: torch.Tensor | None = None, slots: int | None = None):
        """Write k, v (B, N, T, D) at `cache_pos` ((T,) shared by all rows, or (B, T) per row) and
        return the addressed rows' keys and values over their first `slots` slots, (B, N, s, D)."""
        B = k.shape[0]
        s = self.k.shape[2] if slots is None else slots
        if rows is None:
            kc, vc = self.k[:B], self.v[:B]  # views of the first B rows
            if cache_pos.dim() == 1:
                kc.index_copy_(2, cache_pos, k)
                vc.index_copy_(2, cache_pos, v)
            else:
                r = torch.arange(B, device=k.device)[:, None]  # (B, 1)
                kc[r, :, cache_pos] = k.transpose(1, 2)  # the indexed view is (B, T, N, D)
                vc[r, :, cache_pos] = v.transpose(1, 2)
            return kc[:, :, :s], vc[:, :, :s]
        r = rows[:, None]  # (B, 1)
        pos = cache_pos[None, :] if cache_pos.dim() == 1 else cache_pos  # (1 or B, T)
        self.k[r, :, pos] = k.transpose(1, 2)
        self.v[r, :, pos] = v.transpose(1, 2)
        return self.k[rows, :, :s], self.v[rows, :, :s]  # gathered copies of those rows


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # out features laid out [N, 3, D]
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_dropout = cfg.attn_dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cache_pos: torch.Tensor | None, mask: torch.Tensor | None,
                cache_rows: torch.Tensor | None = None, cache_slots: int | None = None):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, -1, 3, self.head_dim)  # (B, T, N, 3, D)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, N, T, D)
        if self.kv_cache is not None:
            if cache_pos is None:
                raise ValueError("a KV cache is set up: pass cache_pos (the cache slots of the input tokens)")
            k, v = self.kv_cache.update(cache_pos, k, v, cache_rows, cache_slots)  # (B, N, S, D)
        S = k.shape[2]
        if mask is None and T > 1 and S != T:
            # The queries are the last T of the S attended slots (GPT.hidden's cache_slots contract).
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        dropout = self.attn_dropout if self.training else 0.0
        # ModelScope masks with -10000 on the scores; after softmax that is exactly 0 in fp32 for any
        # realistic score range, so SDPA's boolean masking gives the same probabilities.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                           is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, N*D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.d_model)
        # erf: the single-process ModelScope model's F.gelu. tanh: Megatron's bias_gelu_fusion kernel
        # (0.79788456 = sqrt(2/pi) rounded; the difference from F.gelu(approximate="tanh") is < 1e-7).
        self.approximate = "none" if cfg.gelu == "erf" else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache_pos=None, mask=None, cache_rows=None, cache_slots=None):
        x = x + self.drop(self.attn(self.ln_1(x), cache_pos, mask, cache_rows, cache_slots))
        return x + self.drop(self.mlp(self.ln_2(x)))


class TiedHead(nn.Module):
    """The output head, tied to the token embedding: logits = h @ W_emb^T.

    It owns no parameter: it reads the embedding's current weight at call time, so loading with
    assign=True, dtype casts and sharding of `tok_emb` all show here, and state dicts hold the
    weight once (as `tok_emb.weight`). Being a module, it can be swapped like any layer (int8, the
    CPU decode layout).
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        # Kept outside _modules: the embedding is registered once, under GPT.tok_emb.
        self.__dict__["embedding"] = embedding

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.embedding.weight)  # (..., V)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.head = TiedHead(self.tok_emb)
        self.cache_len = 0
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> GPT:
        """`gpt3zh.checkpoint.load_model(path, **kwargs)` under transformers' name (any supported format)."""
        from .checkpoint import load_model  # at call time: model.py imports torch and config only

        return load_model(path, **kwargs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Megatron's from-scratch init: N(0, std); output projections N(0, std / sqrt(2L))."""
        std = self.config.init_std
        out_std = std / math.sqrt(2.0 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def setup_kv_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> None:
        """Preallocate a static KV cache of `max_len` slots (default: the full context) per layer."""
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds max_seq_len={self.config.max_seq_len}")
        dtype = dtype or self.tok_emb.weight.dtype
        device = device or self.tok_emb.weight.device
        for block in self.blocks:
            attn = block.attn
            n_local_heads = attn.qkv.weight.shape[0] // (3 * attn.head_dim)
            attn.kv_cache = KVCache(batch_size, max_len, n_local_heads, attn.head_dim, dtype, device)
        self.cache_len = max_len

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
        self.cache_len = 0

    def hidden(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache_rows: torch.Tensor | None = None,
        cache_slots: int | None = None,
    ) -> torch.Tensor:
        """Final-layernormed hidden states (B, T, H).

        idx: (B, T) token ids. positions: (T,) or (B, T) position ids (default: cache_pos, else
        0..T-1). cache_pos: (T,) or (B, T) cache slots to write, required once a KV cache is set up.
        mask: bool (B or 1, 1, T, S), True = attend, or a float mask of that shape added to the
        attention scores (0 attend, -inf hide).
        cache_rows: which cache rows the batch uses (None = the first B; a (B,) tensor = those rows).
        cache_slots: attend to the first `cache_slots` slots only (default: the mask's width, or the
        whole cache). Without a mask the queries are then taken to be the LAST T of those slots
        (cache_pos = cache_slots - T ... cache_slots - 1), attended causally: a one-token decode
        step needs no mask at all. With neither a mask nor cache_slots, the mask is causal over the
        slots named by cache_pos.
        """
        T = idx.shape[1]
        if positions is None:
            positions = cache_pos if cache_pos is not None else torch.arange(T, device=idx.device)
        if self.cache_len and mask is None and cache_slots is None:
            mask = _slot_causal_mask(cache_pos, self.cache_len)
        if mask is not None and cache_slots is None and self.cache_len:
            cache_slots = mask.shape[-1]
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))  # (B, T, H)
        for block in self.blocks:
            x = block(x, cache_pos, mask, cache_rows, cache_slots)
        return self.ln_f(x)

    def forward(self, idx, positions=None, cache_pos=None, mask=None, cache_rows=None, cache_slots=None):
        return self.head(self.hidden(idx, positions, cache_pos, mask, cache_rows, cache_slots))  # (B, T, V)


def _slot_causal_mask(cache_pos: torch.Tensor | None, cache_len: int) -> torch.Tensor:
    if cache_pos is None:
        raise ValueError("a KV cache is set up: pass cache_pos (the cache slots of the input tokens)")
    slots = torch.arange(cache_len, device=cache_pos.device)
    mask = slots <= cache_pos[..., None]  # (T, S) or (B, T, S)
    return mask[None, None] if mask.dim() == 2 else mask[:, None]
