"""Config translation: foreign config.json files <-> (GPTConfig, GenerationDefaults).

ModelScope rules (its GPT3Config and its quirks): read exactly what ModelScope reads and ignore what it ignores:
- both backends: vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
  max_position_embeddings, layernorm_epsilon (GPT3Config defaults when absent). `layer_norm_eps`
  is ignored (GPT3Config itself crashes on it), `kv_channels` is treated as hidden/heads, and
  unknown keys (attention_type, initializer_range, intermediate_size, hidden_act ...) are ignored.
- single-process GPT3Model: exact erf GELU and MLP width 4H always (hidden_act and
  ffn_hidden_size are never read); dropout from hidden_dropout_prob / attention_probs_dropout_prob.
- Megatron GPT3Model: tanh GELU unless bias_gelu_fusion is false, ffn_hidden_size honoured,
  dropout from hidden_dropout / attention_dropout, init_method_std;
  apply_residual_connection_post_layernorm=true is a different network and is refused.
- eod_id, top_k, top_p, temperature, tokens_to_generate -> GenerationDefaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError, GenerationConfig, GenerationDefaults, GPTConfig
from .errors import CheckpointError

_MISSING = object()


def _get(d: dict, key: str, default: Any, kind: type, where: Path) -> Any:
    """d[key] (or default) checked against kind; JSON ints are accepted where floats are expected."""
    value = d.get(key, _MISSING)
    if value is _MISSING or (value is None and default is None):
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise CheckpointError(f"{where}: {key}={value!r} must be a JSON {kind.__name__}")
    return value


def _build(where: Path, **fields: Any) -> GPTConfig:
    try:
        return GPTConfig(**fields)
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err}") from None


def _check_heads(d: dict, hidden: int, heads: int, where: Path) -> None:
    if heads > 0 and hidden % heads:
        raise CheckpointError(
            f"{where}: num_attention_heads={heads} does not divide hidden_size={hidden} "
            f"(each head needs hidden_size / num_attention_heads features)"
        )


# ------------------------------------------------------------------------------------------ ModelScope
def modelscope_to_config(d: dict, where: Path, megatron: bool) -> tuple[GPTConfig, GenerationDefaults]:
    hidden = _get(d, "hidden_size", 768, int, where)
    heads = _get(d, "num_attention_heads", 12, int, where)
    _check_heads(d, hidden, heads, where)
    common = dict(
        vocab_size=_get(d, "vocab_size", 25600, int, where),
        n_layer=_get(d, "num_hidden_layers", 12, int, where),
        n_head=heads,
        d_model=hidden,
        max_seq_len=_get(d, "max_position_embeddings", 2048, int, where),
        ln_eps=_get(d, "layernorm_epsilon", 1e-12, float, where),
        init_std=_get(d, "init_method_std", 0.02, float, where),
    )
    if megatron:
        if _get(d, "apply_residual_connection_post_layernorm", False, bool, where):
            raise CheckpointError(
                f"{where}: apply_residual_connection_post_layernorm=true is not supported "
                f"(gpt3zh implements the pre-LN residual that ModelScope's released models use)"
            )
        cfg = _build(
            where, **common,
            d_ff=_get(d, "ffn_hidden_size", None, int, where),
            gelu="tanh" if _get(d, "bias_gelu_fusion", True, bool, where) else "erf",
            dropout=_get(d, "hidden_dropout", 0.1, float, where),
            attn_dropout=_get(d, "attention_dropout", 0.1, float, where),
        )
    else:
        # The single-process model hard-codes F.gelu (erf) and a 4H MLP, whatever the file says.
        cfg = _build(
            where, **common, d_ff=None, gelu="erf",
            dropout=_get(d, "hidden_dropout_prob", 0.1, float, where),
            attn_dropout=_get(d, "attention_probs_dropout_prob", 0.1, float, where),
        )
    return cfg, _generation_from_modelscope(d, where)


def _generation_from_modelscope(d: dict, where: Path) -> GenerationDefaults:
    extra = d.get("extra_stop_ids", [])  # a gpt3zh addition; ModelScope keeps it as an unused attribute
    if not (isinstance(extra, list) and all(isinstance(i, int) for i in extra)):
        raise CheckpointError(f"{where}: extra_stop_ids={extra!r} must be a list of token ids")
    return GenerationDefaults(
        eod_id=_get(d, "eod_id", 1, int, where),
        top_k=_get(d, "top_k", 0, int, where),
        top_p=_get(d, "top_p", 0.9, float, where),
        temperature=_get(d, "temperature", 1.0, float, where),
        tokens_to_generate=_get(d, "tokens_to_generate", 100, int, where),
        extra_stop_ids=tuple(extra),
    )


def config_to_modelscope(cfg: GPTConfig, gen: GenerationDefaults, megatron: bool, dtype: str) -> dict:
    d: dict[str, Any] = {
        "model_type": "gpt3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "max_position_embeddings": cfg.max_seq_len,
        "layernorm_epsilon": cfg.ln_eps,
        "init_method_std": cfg.init_std,
        "hidden_act": "gelu",
        "intermediate_size": cfg.ffn_dim,  # informational: ModelScope never reads it
    }
    if megatron:
        if cfg.d_ff is not None:
            d["ffn_hidden_size"] = cfg.d_ff
        d.update(
            bias_gelu_fusion=cfg.gelu == "tanh",
            hidden_dropout=cfg.dropout,
            attention_dropout=cfg.attn_dropout,
            fp16=dtype == "float16",
            bf16=dtype == "bfloat16",
        )
    else:
        d.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attn_dropout)
    d.update(
        eod_id=gen.eod_id,
        top_k=gen.top_k,
        top_p=gen.top_p,
        temperature=gen.temperature,
        tokens_to_generate=gen.tokens_to_generate,
    )
    if gen.extra_stop_ids:
        d["extra_stop_ids"] = list(gen.extra_stop_ids)
    return d


def check_single_process_compatible(cfg: GPTConfig) -> None:
    """The single-process ModelScope model can only express erf GELU and a 4H MLP."""
    if cfg.gelu != "erf":
        raise CheckpointError(
            "format 'modelscope' (single-process GPT3Model) always runs erf GELU, but this model uses "
            "tanh GELU; save it as 'megatron' (bias_gelu_fusion=true) instead"
        )
    if cfg.ffn_dim != 4 * cfg.d_model:
        raise CheckpointError(
            f"format 'modelscope' (single-process GPT3Model) always has MLP width 4*d_model={4 * cfg.d_model}, "
            f"but this model has d_ff={cfg.d_ff}; save it as 'megatron' instead"
        )


def megatron_configuration(base: dict | None, tp: int) -> dict:
    """configuration.json for a Megatron dir, as DistributedGPT3.save_pretrained rewrites it."""
    conf = dict(base) if base else {
        "framework": "pytorch",
        "task": "text-generation",
        "preprocessor": {"type": "text-gen-jieba-tokenizer"},
        "model": {"type": "gpt3"},
    }
    conf["pipeline"] = {**conf.get("pipeline", {}), "type": "gpt3-generation"}
    megatron = {k: v for k, v in conf.get("megatron", {}).items()
                if k not in ("rank", "checkpoint_tensor_model_parallel_size")}
    megatron.update(world_size=tp, tensor_model_parallel_size=tp)
    conf["megatron"] = megatron
    return conf


def single_configuration(base: dict | None) -> dict:
    """configuration.json for a single-process dir: no megatron block (that selects the backend)."""
    conf = dict(base) if base else {
        "framework": "pytorch",
        "task": "text-generation",
        "preprocessor": {"type": "text-gen-tokenizer"},
        "model": {"type": "gpt3"},
    }
    conf.pop("megatron", None)
    conf["pipeline"] = {**conf.get("pipeline", {}), "type": "text-generation"}
    return conf


# -------------------------------------------------------------------------------------------- HF GPT-2
_HF_GELU = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def hf_to_config(d: dict, gen_d: dict, where: Path) -> tuple[GPTConfig, GenerationDefaults]:
    act = d.get("activation_function", "gelu_new")
    if act not in _HF_GELU:
        raise CheckpointError(f"{where}: activation_function={act!r} is not supported "
                              f"(expected one of {list(_HF_GELU)})")
    for key, want in (("tie_word_embeddings", True), ("scale_attn_weights", True),
                      ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if d.get(key, want) != want:
            raise CheckpointError(f"{where}: {key}={d[key]!r} is not supported (gpt3zh needs {want})")
    hidden, heads = _get(d, "n_embd", 768, int, where), _get(d, "n_head", 12, int, where)
    if heads > 0 and hidden % heads:
        raise CheckpointError(f"{where}: n_head={heads} does not divide n_embd={hidden}")
    cfg = _build(
        where,
        vocab_size=_get(d, "vocab_size", 50257, int, where),
        n_layer=_get(d, "n_layer", 12, int, where),
        n_head=heads,
        d_model=hidden,
        d_ff=_get(d, "n_inner", None, int, where),
        max_seq_len=_get(d, "n_positions", 1024, int, where),
        ln_eps=_get(d, "layer_norm_epsilon", 1e-5, float, where),
        gelu=_HF_GELU[act],
        dropout=_get(d, "resid_pdrop", 0.1, float, where),
        attn_dropout=_get(d, "attn_pdrop", 0.1, float, where),
        init_std=_get(d, "initializer_range", 0.02, float, where),
    )
    return cfg, _generation_from_hf(gen_d or {"eos_token_id": d.get("eos_token_id", 1)}, where)


def _generation_from_hf(g: dict, where: Path) -> GenerationDefaults:
    eos = g.get("eos_token_id", 1)
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{where}: eos_token_id={eos!r} must be a token id or a list of them")
    # transformers decodes greedily unless do_sample is true; ModelScope's way to say greedy is top_k=1.
    sampling = _get(g, "do_sample", False, bool, where)
    return GenerationDefaults(
        eod_id=ids[0],
        extra_stop_ids=tuple(ids[1:]),
        top_k=_get(g, "top_k", 0, int, where) if sampling else 1,
        top_p=_get(g, "top_p", 0.9, float, where),
        temperature=_get(g, "temperature", 1.0, float, where),
        tokens_to_generate=_get(g, "max_new_tokens", 100, int, where),
    )


def config_to_hf(
    cfg: GPTConfig, gen: GenerationDefaults, dtype: str, sep_id: int | None = None, pad_id: int | None = None
) -> tuple[dict, dict]:
    """(config.json, generation_config.json) for transformers.GPT2LMHeadModel.

    sep_id / pad_id are the tokenizer's, when one is exported: transformers then stops where gpt3zh's
    pipeline stops (eod_id, extra_stop_ids and the tokenizer's <sep>) and pads batches with pad_id.
    """
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.d_ff,  # None -> 4 * n_embd in GPT-2 as in gpt3zh
        # gelu = exact erf; gelu_new = the tanh approximation (Megatron's bias_gelu_fusion)
        "activation_function": "gelu" if cfg.gelu == "erf" else "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attn_dropout,
        "layer_norm_epsilon": cfg.ln_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": gen.eod_id,
        "eos_token_id": gen.eod_id,
        "torch_dtype": dtype,
    }
    return config, _generation_to_hf(cfg, gen, sep_id, pad_id)


def _generation_to_hf(
    cfg: GPTConfig, gen: GenerationDefaults, sep_id: int | None, pad_id: int | None
) -> dict[str, Any]:
    """ModelScope's conventions in transformers' terms: GenerationConfig.from_defaults, the mapping
    gpt3zh's pipeline, CLI and server use, written as generation_config.json."""
    c = GenerationConfig.from_defaults(gen, cfg.vocab_size, sep_id)
    # eod first, so it reads back as eod_id
    stops = list(dict.fromkeys([gen.eod_id, *c.stop_ids]))
    generation: dict[str, Any] = {"bos_token_id": gen.eod_id, "eos_token_id": stops[0] if len(stops) == 1 else stops}
    if pad_id is not None and pad_id < cfg.vocab_size:
        generation["pad_token_id"] = pad_id
    # transformers warns about sampling settings next to do_sample=false, so a greedy model states only that.
    generation["do_sample"] = not c.greedy
    if generation["do_sample"]:
        generation.update(top_k=c.top_k, top_p=c.top_p, temperature=c.temperature)
    generation["max_new_tokens"] = c.max_new_tokens
    return generation
