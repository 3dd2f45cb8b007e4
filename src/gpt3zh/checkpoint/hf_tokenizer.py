"""A gpt3zh tokenizer written as transformers loads it, beside the HF GPT-2 weights.

  kind        files                                        AutoTokenizer.from_pretrained(dir) gives
  hf          tokenizer.json (as gpt3zh reads it)           PreTrainedTokenizerFast
  bert        tokenizer.json + vocab.txt                    PreTrainedTokenizerFast
  jieba_bpe   tokenizer.json (byte for byte) +              JiebaBPETokenizer (trust_remote_code=True):
              tokenization_gpt3zh.py (auto_map)             tokenizer.json cannot express jieba's cut

In every case `tok(text)["input_ids"]` equals gpt3zh's `encode_prompt(text)`, the ids generation starts
from. For BERT that is `[CLS] pieces`, without the trailing [SEP] that ModelScope's model drops before
generating: transformers generates from exactly what the tokenizer returns, so a [SEP] there would
change every continuation. tokenizer_config.json keeps gpt3zh's own config under the key
`tokenizer.HF_CONFIG_KEY`, so `load_tokenizer` reads an export back as the kind it was written from.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, processors

from ..tokenizer import CONFIG_NAME, HF_CONFIG_KEY, BertTokenizer, Tokenizer
from .files import write_json

REMOTE_CODE = Path(__file__).resolve().parents[1] / "assets" / "hf" / "tokenization_gpt3zh.py"
_AUTO_MAP = {"AutoTokenizer": [None, f"{REMOTE_CODE.stem}.JiebaBPETokenizer"]}  # [slow, fast] class refs
_HF_NAMES = {  # gpt3zh special-token name -> transformers' name (newline has none there)
    "eod_token": "eos_token",
    "pad_token": "pad_token",
    "unk_token": "unk_token",
    "sep_token": "sep_token",
    "cls_token": "cls_token",
    "mask_token": "mask_token",
}


def save(tok: Any, out: Path, max_len: int) -> None:
    """Write `tok` into the HF export directory `out` (a fresh temp dir); max_len is the context.

    Any other object with .save(dir) writes its own files, as save_model promises for every format.
    """
    if not isinstance(tok, Tokenizer):
        tok.save(out)
        return
    writer = {"hf": _write_plain, "bert": _write_bert, "jieba_bpe": _write_jieba}[tok.kind]
    write_json(out / CONFIG_NAME, {**tokenizer_config(tok, max_len), **writer(tok, out)})


def tokenizer_config(tok: Tokenizer, max_len: int) -> dict[str, Any]:
    specials = {
        hf: tok.specials[ours] for ours, hf in _HF_NAMES.items() if tok.specials.get(ours) is not None
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": max_len,
        # GPT-2 adds wte(token_type_ids) to its input embeddings: the tokenizer must not hand them out.
        "model_input_names": ["input_ids", "attention_mask"],
        # gpt3zh's decode is the backend's decode; transformers' extra clean-up would glue punctuation.
        "clean_up_tokenization_spaces": False,
        HF_CONFIG_KEY: tok.config(),
    }


def _write_plain(tok: Tokenizer, out: Path) -> dict[str, Any]:
    # The source bytes where tokenizers loads them as they are; else the backend gpt3zh built from them.
    try:
        tokenizers.Tokenizer.from_str(tok.source.decode("utf-8"))
        data = tok.source
    except Exception:  # noqa: BLE001 (tokenizers raises a bare Exception for a file it rejects)
        data = tok.backend.to_str(pretty=True).encode("utf-8")
    (out / "tokenizer.json").write_bytes(data)
    return {}


def _write_bert(tok: BertTokenizer, out: Path) -> dict[str, Any]:
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    cls, sep = tok.specials["cls_token"], tok.specials["sep_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1",
        special_tokens=[(cls, tok.cls_id), (sep, tok.sep_id)],
    )
    # transformers.BertTokenizer's decode: join pieces, glue "##" continuations, clean up punctuation
    # spaces. (ModelScope's removal of spaces between Chinese characters has no decoder; gpt3zh does it.)
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    (out / "tokenizer.json").write_text(backend.to_str(pretty=True), encoding="utf-8")
    (out / "vocab.txt").write_bytes(tok.source)  # gpt3zh reads a BERT export back from vocab.txt
    return {"do_lower_case": tok.do_lower_case}


def _write_jieba(tok: Tokenizer, out: Path) -> dict[str, Any]:
    # Byte for byte: a fast tokenizer without the jieba class refuses ModelScope's legacy Metaspace
    # entry instead of silently encoding without jieba; the remote class upgrades it in memory.
    (out / "tokenizer.json").write_bytes(tok.source)
    shutil.copyfile(REMOTE_CODE, out / REMOTE_CODE.name)
    return {"tokenizer_class": "JiebaBPETokenizer", "auto_map": _AUTO_MAP}


def generation_ids(tok: Any) -> dict[str, int]:
    """The tokenizer's ids that generation_config.json needs: sep (a stop id, as gpt3zh stops) and pad."""
    if not isinstance(tok, Tokenizer):
        return {}
    ids = {"sep_id": tok.sep_id, "pad_id": tok.pad_id}
    return {k: v for k, v in ids.items() if v is not None}
