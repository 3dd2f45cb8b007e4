"""The JiebaBPE tokenizer of ModelScope's Chinese GPT-3 (1.3B / 2.7B / 13B) for transformers.

gpt3zh copies this file into the Hugging Face exports of JiebaBPE models; `tokenizer_config.json` names
it in `auto_map`, so `AutoTokenizer.from_pretrained(path, trust_remote_code=True)` loads it.

ModelScope tokenizes in two steps: jieba cuts the text into words (`list(jieba.cut(text))`), then the
BPE in tokenizer.json encodes the words as a pre-tokenized sequence. tokenizer.json cannot express the
jieba step, so this class runs it before the fast tokenizer; everything else (special tokens, padding,
tensors, decoding) is the stock fast tokenizer. The ids equal gpt3zh's and ModelScope's.

Self-contained on purpose (it runs where gpt3zh is not installed): it imports transformers,
tokenizers and jieba only.
"""

import json
import logging

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

_jieba = None


def _cut(text):
    """ModelScope's pre-tokenization: jieba's accurate mode with HMM, its global dictionary."""
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict..."
        _jieba = jieba
    return list(_jieba.cut(text))


def _cut_input(text):
    """A text becomes its words; a list (or tuple) of texts, each cut in turn; None stays None."""
    if text is None:
        return None
    if isinstance(text, str):
        return _cut(text)
    return type(text)(_cut_input(t) for t in text)


def _upgrade_legacy_metaspace(node):
    """Give old Metaspace entries (add_prefix_space only) the prepend_scheme newer tokenizers need.

    ModelScope's tokenizer.json was written by tokenizers < 0.15: `add_prefix_space: false`, which
    newer releases reject next to their default prepend_scheme "always". The old meaning is "never".
    """
    if isinstance(node, list):
        for item in node:
            _upgrade_legacy_metaspace(item)
    elif isinstance(node, dict):
        if node.get("type") == "Metaspace" and "add_prefix_space" in node and "prepend_scheme" not in node:
            node["prepend_scheme"] = "always" if node["add_prefix_space"] else "never"
        for value in node.values():
            _upgrade_legacy_metaspace(value)


class JiebaBPETokenizer(PreTrainedTokenizerFast):
    """jieba words -> tokenizer.json's BPE (pre-tokenized), as ModelScope's JiebaBPETokenizer."""

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # transformers 5 would parse tokenizer.json here (and fail on the legacy entry); __init__ reads it.
        return kwargs

    def __init__(self, *args, tokenizer_file=None, **kwargs):
        if tokenizer_file is not None and kwargs.get("tokenizer_object") is None:
            with open(tokenizer_file, encoding="utf-8") as f:
                spec = json.load(f)
            _upgrade_legacy_metaspace(spec)  # the file itself stays byte for byte ModelScope's
            kwargs["tokenizer_object"] = Tokenizer.from_str(json.dumps(spec))
        super().__init__(*args, **kwargs)

    # transformers 5 sends every encode / __call__ / tokenize through _encode_plus.
    def _encode_plus(self, text, text_pair=None, *args, is_split_into_words=False, **kwargs):
        if not is_split_into_words:
            text, text_pair = _cut_input(text), _cut_input(text_pair)
        return super()._encode_plus(text, text_pair, *args, is_split_into_words=True, **kwargs)

    # transformers 4 batches through _batch_encode_plus (its _encode_plus calls it).
    def _batch_encode_plus(self, batch_text_or_text_pairs, *args, is_split_into_words=False, **kwargs):
        if not is_split_into_words:
            batch_text_or_text_pairs = _cut_input(batch_text_or_text_pairs)
        return super()._batch_encode_plus(batch_text_or_text_pairs, *args, is_split_into_words=True, **kwargs)
