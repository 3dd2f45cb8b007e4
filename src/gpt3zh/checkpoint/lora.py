"""LoRA adapters through Hugging Face peft: add them to a GPT, save and load them, merge them in.

An adapter directory holds:
- `adapter_config.json` and `adapter_model.safetensors`: peft's own format, as
  `PeftModel.save_pretrained` writes it (weight names `base_model.model.<layer>.lora_A.weight`), so
  `peft.PeftModel.from_pretrained(gpt, DIR)` loads it too;
- `adapter_base.json`: the base model it was trained on: where (a path or ModelScope id), its
  GPTConfig, its generation defaults and a fingerprint (a few sampled weights, so a different
  checkpoint of the same shape is caught; compared to bf16 precision, so a base converted to
  another format or float dtype still matches);
- the tokenizer files, so the directory works wherever a model directory does.

Every gpt3zh way in (`load_pretrained`, so generate, serve, the pipeline, eval, convert) takes an
adapter directory as a model: the base is loaded, checked against the record (config, then every
adapter weight's name and shape, then the fingerprint) and the adapter is merged into it: the
result is a plain GPT, run by the one engine at the base's speed. Layers are swapped, never
patched: peft's `inject_adapter_in_model` replaces each target nn.Linear by a `lora.Linear` around
it, and merging swaps each back for its base layer with W + (alpha / r) B A folded in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import GenerationDefaults, GPTConfig
from ..model import GPT
from .errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "adapter_base.json"
PEFT_PREFIX = "base_model.model."  # PeftModel's weight-name prefix (the GPT sits at base_model.model)
TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # the nn.Linear layers of a block
FINGERPRINT_TOLERANCE = 2**-7  # relative: one bf16 rounding


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _peft():
    try:
        import peft
    except ImportError:
        raise CheckpointError("LoRA adapters need peft: pip install 'gpt3zh[lora]'") from None
    return peft


# ------------------------------------------------------------------------------------------ adding
def peft_config(r: int, alpha: float, dropout: float, targets: list[str] | tuple[str, ...], base: str | None = None):
    return _peft().LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                              bias="none", base_model_name_or_path=base)


def add_lora(model: GPT, config) -> GPT:
    """Swap each target nn.Linear of `model` for a peft lora.Linear around it (in place); freeze
    every base weight; adapters in fp32 whatever the base dtype (their updates are small: bf16
    would round them away)."""
    linear = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    for target in config.target_modules:
        if not any(name == target or name.endswith("." + target) for name in linear):
            raise CheckpointError(f"LoRA target_modules: {target!r} names no linear layer of this model "
                                  f"(each block has {', '.join(TARGETS)})")
    _peft().inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()
    return model


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's saved names (`base_model.model.<layer>.lora_A.weight`)."""
    return adapter_weights(model.state_dict())


def adapter_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter entries of a LoRA model's state dict, renamed as peft saves them (its
    get_peft_model_state_dict: the adapter name "default" dropped, PeftModel's prefix added)."""
    return {PEFT_PREFIX + k.replace(".default", ""): v.detach().cpu().contiguous()
            for k, v in state.items() if "lora_" in k}


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base layer and swap the base layer back in (in place): a plain GPT."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge(safe_merge=True)  # raises on NaN instead of writing it into the base
                setattr(parent, name, child.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------------ the base
def fingerprint(model: GPT) -> list[float]:
    """A few weights of fixed places (first and last layers, embeddings), to tell bases apart."""
    def weight(m):
        return (m.get_base_layer() if hasattr(m, "get_base_layer") else m).weight

    first, last = model.blocks[0], model.blocks[-1]
    rows = [model.tok_emb.weight[-1], weight(first.attn.qkv)[0], weight(last.mlp.proj)[-1], model.ln_f.weight]
    return [float(x) for row in rows for x in row.detach()[:16].float().cpu()]


def same_fingerprint(a: list[float] | None, b: list[float] | None) -> bool:
    if not a or not b:
        return True  # nothing recorded: nothing to compare
    a_t, b_t = torch.tensor(a), torch.tensor(b)
    return a_t.shape == b_t.shape and torch.allclose(a_t, b_t, rtol=FINGERPRINT_TOLERANCE, atol=1e-6)


def check_fingerprint(stored: list[float] | None, model: GPT, where: str) -> None:
    if not same_fingerprint(stored, fingerprint(model)):
        raise CheckpointError(f"{where}: the base model's weights are not the ones this adapter was trained on "
                              "(its sampled weights differ); it is an adapter for another checkpoint "
                              "of the same shape")


def describe_base(base: str | os.PathLike, config: GPTConfig, generation: GenerationDefaults,
                  model: GPT) -> dict[str, Any]:
    """adapter_base.json's content for a base at `base` (a directory, kept absolute, or a model id)."""
    where = str(Path(base).resolve()) if Path(base).exists() else str(base)
    return {"format": "gpt3zh-lora", "base": where, "config": config.to_dict(), "generation": generation.to_dict(),
            "fingerprint": fingerprint(model)}


# ------------------------------------------------------------------------------------------ saving
def save_adapter(model: GPT, out_dir: str | os.PathLike, config, base: dict[str, Any], tokenizer=None,
                 overwrite: bool = False) -> Path:
    """Write `model`'s adapters as an adapter directory (atomic: a failure leaves an existing one
    as it was)."""
    from .files import atomic_output_dir

    weights = adapter_state(model)
    with atomic_output_dir(out_dir, overwrite, lambda d: is_adapter_dir(d) or _is_model_dir(d)) as tmp:
        write_adapter(tmp, weights, config, base, tokenizer)
    return Path(out_dir)


def write_adapter(directory: Path, weights: dict[str, torch.Tensor], config, base: dict[str, Any],
                  tokenizer=None) -> None:
    """The adapter files into `directory` (a fresh temp dir the caller renames into place)."""
    from safetensors.torch import save_file

    bad = [k for k, v in weights.items() if not bool(v.isfinite().all())]
    if bad:
        raise CheckpointError(f"adapter weight {bad[0]} holds NaN or infinite values; nothing was written")
    config.base_model_name_or_path = base["base"]
    config.inference_mode = True
    config.save_pretrained(str(directory))
    save_file(weights, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / BASE_FILE).write_text(json.dumps(base, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(directory)


def _is_model_dir(d: Path) -> bool:
    from .formats import is_model_dir

    return is_model_dir(d)


# ------------------------------------------------------------------------------------------ loading
def read_base(adapter: Path) -> dict[str, Any] | None:
    from .files import read_json

    return read_json(adapter / BASE_FILE, "LoRA adapter base record") if (adapter / BASE_FILE).is_file() else None


def read_config(adapter: Path):
    from .files import read_json

    data = read_json(adapter / ADAPTER_CONFIG, "peft adapter config")
    if data.get("peft_type") != "LORA":
        raise CheckpointError(f"{adapter / ADAPTER_CONFIG}: a {data.get('peft_type')!r} adapter; gpt3zh loads LoRA "
                              f"adapters only")
    return _peft().LoraConfig.from_pretrained(str(adapter))


def base_location(adapter: Path, record: dict[str, Any] | None) -> str:
    """Where the base model is, from the adapter's record (an error says how to give it otherwise)."""
    if record is None:
        raise CheckpointError(f"{adapter}: has no {BASE_FILE} (the adapter was not written by gpt3zh), so its base "
                              f"model is unknown; give the base explicitly (--model BASE --adapter {adapter})")
    base = record.get("base")
    looks_like_path = isinstance(base, str) and (os.path.isabs(base) or base.startswith("."))
    if not isinstance(base, str) or (looks_like_path and not Path(base).is_dir()):
        raise CheckpointError(f"{adapter}: its base model {base!r} ({BASE_FILE}) does not exist; put the base back "
                              f"there, or give it explicitly (--model BASE --adapter {adapter})")
    return base


def apply_adapter(model: GPT, adapter: Path, record: dict[str, Any] | None) -> GPT:
    """Add the adapter at `adapter` to `model` (checked: config, names and shapes, fingerprint)."""
    from safetensors.torch import load_file

    if record is not None:
        _check_config(GPTConfig.from_dict(record["config"], f"{adapter / BASE_FILE} config"), model.config, adapter)
    config = read_config(adapter)
    weights_path = adapter / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise CheckpointError(f"{adapter}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")
    from safetensors import SafetensorError

    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:  # a cut or foreign file
        raise CheckpointError(f"{weights_path}: cannot be read as safetensors ({err})") from None
    add_lora(model, config)
    expected = {k: v.shape for k, v in adapter_state(model).items()}
    _check_shapes(weights, expected, adapter)
    _peft().set_peft_model_state_dict(model, {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()})
    if record is not None:
        check_fingerprint(record.get("fingerprint"), model, str(adapter))
    return model


def _check_config(trained: GPTConfig, base: GPTConfig, adapter: Path) -> None:
    diff = [(k, v, getattr(base, k)) for k, v in trained.to_dict().items()
            if k not in ("dropout", "attn_dropout") and getattr(base, k) != v]
    if diff:
        name, was, now = diff[0]
        raise CheckpointError(f"{adapter}: an adapter for another base model: it was trained on {name}={was}, "
                              f"this base has {name}={now}")


def _check_shapes(found: dict[str, torch.Tensor], expected: dict[str, torch.Size], adapter: Path) -> None:
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"{adapter / ADAPTER_WEIGHTS}: no weight {name} (the adapter config targets it)")
        if tuple(found[name].shape) != tuple(shape):
            raise CheckpointError(f"{adapter / ADAPTER_WEIGHTS}: {name} has shape {tuple(found[name].shape)}, this "
                                  f"base's layer needs {tuple(shape)}: an adapter for another base model")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{adapter / ADAPTER_WEIGHTS}: {extra[0]} matches no layer of this base model "
                              f"({len(extra)} unexpected weights)")
