"""Tokenizers: ModelScope's JiebaBPE, BERT `vocab.txt`, and plain Hugging Face `tokenizer.json`.

Three kinds share one interface (`Tokenizer`): `encode`, `encode_batch`, `decode`, `detokenize`,
`token_to_id` / `id_to_token`, the special ids and `save`.

- `jieba_bpe` (ModelScope 1.3B/2.7B/13B): jieba cuts the text into words, then the BPE
  `tokenizer.json` encodes the words as a pre-tokenized sequence (ModelScope's JiebaBPETokenizer).
- `bert` (ModelScope chinese-base/large): Google's Chinese WordPiece `vocab.txt`, configured to
  match `transformers.BertTokenizer(do_lower_case=True)` without needing transformers (ModelScope's BERT preprocessing).
- `hf`: any `tokenizers` file used as is, e.g. the character-level tokenizer made by
  `train_char_tokenizer` for gpt3zh's own small models.

A model directory says which kind it holds in `tokenizer_config.json` (`{"type": KIND, ...}`,
written by `save`); without it the kind is detected from the files (see `detect_kind`).
Nothing happens on import: jieba is imported and its dictionary built on first use.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from .hub import resolve_model

CONFIG_NAME = "tokenizer_config.json"
KINDS = ("jieba_bpe", "bert", "hf")
JIEBA_PREPROCESSOR = "text-gen-jieba-tokenizer"  # ModelScope configuration.json marker
# In a transformers-style tokenizer_config.json (gpt3zh's HF export), gpt3zh's own config sits here.
HF_CONFIG_KEY = "gpt3zh"

# Special-token names per kind; tokenizer_config.json may override any of them (null = absent).
_DEFAULT_SPECIALS: dict[str, dict[str, str | None]] = {
    "jieba_bpe": {
        "eod_token": "<|endoftext|>",
        "sep_token": "<sep>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "newline_token": "\n",
        "cls_token": None,
    },
    # BERT has no end-of-document token; the model's config.json eod_id decides when generation
    # stops, so eod defaults to [SEP], the token that ends every encoded BERT sequence.
    "bert": {
        "eod_token": "[SEP]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "newline_token": None,
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    },
    "hf": {
        "eod_token": "<|endoftext|>",
        "sep_token": "<sep>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "newline_token": "\n",
        "cls_token": None,
    },
}
# The vocabulary must contain these; the others are looked up when named and may be absent.
_REQUIRED = {
    "jieba_bpe": ("eod_token", "sep_token", "newline_token"),  # what ModelScope's class reads
    "bert": ("cls_token", "sep_token", "pad_token", "unk_token"),
    "hf": ("eod_token",),
}
_SOURCE_FILE = {"jieba_bpe": "tokenizer.json", "bert": "vocab.txt", "hf": "tokenizer.json"}


class TokenizerError(ValueError):
    """A tokenizer file or directory that cannot be used as it is (the message names it)."""


# ------------------------------------------------------------------------------------------- jieba
_jieba = None


def _jieba_module():
    """jieba, imported on first use with its "Building prefix dict..." chatter silenced."""
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return _jieba


def jieba_cut(text: str) -> list[str]:
    """ModelScope's pre-tokenization: `list(jieba.cut(text))` (accurate mode, HMM on).

    It uses jieba's global dictionary: `jieba.add_word` elsewhere in the process changes it.
    Not rjieba, though it is much faster: it cuts differently (astral-plane characters, and
    runs like "MPQ-78" or "S.K."), so the ids would stop matching ModelScope's (docs/benchmarks.md).
    """
    return list(_jieba_module().cut(text))


# ------------------------------------------------------------------------------------ the interface
class Tokenizer:
    """One tokenizer of any kind. Build it with `load_tokenizer` or `train_char_tokenizer`.

    Special ids are `None` where the vocabulary has no such token. `vocab_size` is the number of
    embedding rows the ids need (largest id + 1); it can exceed the number of tokens when the
    vocabulary has holes (the ModelScope 1.3B file lacks id 520: 51,199 tokens, vocab_size 51,200).
    """

    kind: str = ""

    def __init__(self, backend: tokenizers.Tokenizer, source: bytes, specials: dict[str, str | None]):
        self.backend = backend
        self.source = source  # the file this tokenizer came from, byte for byte (saved as is)
        self.specials = dict(specials)
        ids = {name: (None if tok is None else backend.token_to_id(tok)) for name, tok in specials.items()}
        self.eod_id: int | None = ids.get("eod_token")
        self.sep_id: int | None = ids.get("sep_token")
        self.pad_id: int | None = ids.get("pad_token")
        self.unk_id: int | None = ids.get("unk_token")
        self.cls_id: int | None = ids.get("cls_token")
        self.newline_id: int | None = ids.get("newline_token")
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, eod_id={self.eod_id}, "
            f"sep_id={self.sep_id}, pad_id={self.pad_id})"
        )

    # -- encoding
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Same ids as `[encode(t) for t in texts]`, encoded by tokenizers' parallel batch path."""
        return _batch_ids(self.backend, list(texts))

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a generation prompt starts from (equal to `encode` except for BERT)."""
        return self.encode(text)

    # -- decoding
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text ModelScope's pipeline returns for these ids (prompt included)."""
        return self.decode(ids, skip_special_tokens=True)

    def unstable_tail(self, ids: Sequence[int]) -> int:
        """How many trailing tokens of `ids` decode to text that later tokens may still change
        (beyond an incomplete character, which shows as a trailing U+FFFD). For incremental
        detokenization (gpt3zh.detokenize); 0 when decoding is prefix-stable."""
        return 0

    # -- transformers habits: tok(text), tok.batch_decode(rows), Tokenizer.from_pretrained(path)
    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: bool | str = False,
        padding_side: str = "right",
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Model inputs as transformers tokenizers return them: `input_ids` and `attention_mask`.

        The ids are `encode_prompt`'s, what generation feeds the model (equal to `encode` except for
        BERT, whose trailing [SEP] ModelScope drops before generating); gpt3zh's HF export gives the
        same ids. A str gives flat lists, a list of str one row per text. padding=True (or "longest")
        pads every row to the longest with pad_id on `padding_side` ("left" for batched generation),
        mask 0 there. return_tensors="pt": (B, T) int64 tensors, B = 1 for a str.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"tokenizer input must be a str or a list of str; got a list holding {bad[0]}")
        if padding not in (False, True, "longest", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'do_not_pad'; got {padding!r}")
        ids = [self.encode_prompt(t) for t in texts]
        if padding in (True, "longest"):
            ids, mask = self._pad(ids, padding_side)
        else:
            mask = [[1] * len(row) for row in ids]
        if return_tensors is not None:
            ids, mask = _as_tensor(ids, return_tensors), _as_tensor(mask, return_tensors)
        elif single:
            ids, mask = ids[0], mask[0]
        return BatchEncoding(input_ids=ids, attention_mask=mask)

    def _pad(self, rows: list[list[int]], side: str) -> tuple[list[list[int]], list[list[int]]]:
        """(ids, mask) with every row padded to the longest on `side`."""
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if self.pad_id is None:
            name = self.specials.get("pad_token")
            raise TokenizerError(f"padding needs a pad token; this tokenizer has none (pad_token={name!r})")
        width = max(map(len, rows), default=0)
        ids, mask = [], []
        for row in rows:
            pad, zeros, ones = [self.pad_id] * (width - len(row)), [0] * (width - len(row)), [1] * len(row)
            ids.append(pad + row if side == "left" else row + pad)
            mask.append(zeros + ones if side == "left" else ones + zeros)
        return ids, mask

    def batch_decode(self, sequences: Iterable[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """`decode` of each row; rows may be lists of ids or the rows of a (B, T) tensor."""
        return [self.decode(_as_id_list(row), skip_special_tokens=skip_special_tokens) for row in sequences]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """`load_tokenizer(path)` under transformers' name; the kind comes from the files."""
        tok = load_tokenizer(path)
        if not isinstance(tok, cls):
            raise TokenizerError(f"{path} holds a {type(tok).__name__} ({tok.kind}), not a {cls.__name__}")
        return tok

    # -- vocabulary
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    # -- saving
    def config(self) -> dict[str, Any]:
        """The tokenizer_config.json content that reloads this tokenizer."""
        return {"type": self.kind, **self.specials}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the source file (byte for byte) and tokenizer_config.json; return the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / _SOURCE_FILE[self.kind], self.source)
        text = json.dumps(self.config(), ensure_ascii=False, indent=2) + "\n"
        _write_atomic(directory / CONFIG_NAME, text.encode("utf-8"))
        return directory


class BatchEncoding(dict):
    """What calling a tokenizer returns: a dict (`input_ids`, `attention_mask`) read as attributes too."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _as_tensor(rows: list[list[int]], kind: str):
    if kind != "pt":
        raise ValueError(f"return_tensors must be 'pt' (torch) or None, got {kind!r}")
    if len({len(r) for r in rows}) > 1:
        raise ValueError(
            f"cannot make one tensor of rows with lengths {sorted({len(r) for r in rows})}; pass padding=True"
        )
    import torch  # only here: tokenizing needs no torch

    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)  # (B, T), also for empty rows


def _as_id_list(row: Any) -> list[int]:
    return row.tolist() if hasattr(row, "tolist") else [int(i) for i in row]


class JiebaBPETokenizer(Tokenizer):
    """ModelScope's `JiebaBPETokenizer` (ModelScope's JiebaBPETokenizer): same ids, same `detokenize`.

    Special tokens are never matched in the text: jieba cuts a literal "<sep>" into "<", "sep",
    ">" (four BPE ids, as in ModelScope); append `sep_id` / `eod_id` to the ids instead.
    """

    kind = "jieba_bpe"

    def encode(self, text: str) -> list[int]:
        words = jieba_cut(text)
        return self.backend.encode(words, is_pretokenized=True, add_special_tokens=True).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # jieba is pure Python and dominates the time; the BPE step runs in parallel in Rust.
        return _batch_ids(self.backend, [jieba_cut(t) for t in texts], is_pretokenized=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        # ModelScope cuts at the FIRST <sep> anywhere, the prompt included (ModelScope's detokenize).
        ids = list(ids)
        if self.sep_id in ids:
            ids = ids[: ids.index(self.sep_id)]
        return self.decode(ids, skip_special_tokens=True)


_GLUED_LEFT = frozenset(".,?!'")  # words _clean_up_tokenization joins to the word before them


class BertTokenizer(Tokenizer):
    """`transformers.BertTokenizer` as ModelScope's single-process models use it (ModelScope's BERT preprocessing).

    `encode(text)` returns what ModelScope's preprocessor feeds before padding and truncation:
    `[CLS] pieces... [SEP]`. ModelScope's model then starts generating AT the [SEP] position
    (prompt_length = attention_mask.sum() - 1), so the prompt the model conditions on is
    `[CLS] pieces...` = `encode_prompt(text)`. `decode` follows `BertTokenizer.decode` and then
    ModelScope's `remove_space_between_chinese_chars`, so it returns the pipeline's text.
    """

    kind = "bert"

    def __init__(self, backend, source, specials, do_lower_case: bool = True):
        super().__init__(backend, source, specials)
        self.do_lower_case = do_lower_case

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)[:-1]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        unk = self.specials["unk_token"]
        pieces = []
        for i in ids:
            # transformers maps an id outside the vocabulary to [UNK], a special token.
            token = self.backend.id_to_token(i)
            if skip_special_tokens and (i in self.special_ids or token is None):
                continue
            pieces.append(unk if token is None else token)
        text = " ".join(pieces).replace(" ##", "").strip()
        return remove_space_between_chinese_chars(_clean_up_tokenization(text))

    def unstable_tail(self, ids: Sequence[int]) -> int:
        # BERT decoding is not prefix-stable: "##" pieces grow the last word, and transformers'
        # clean-up glues " ." " ," " ?" " !" to the word before and " ' " to both neighbours, so
        # "前 ' 年ing" (or "前 , .ly") becomes one non-Chinese word and the space before "前" (kept
        # between non-Chinese words, removed between Chinese ones) appears only then. Words before
        # the last two are final unless such glue links them to a later word: then the whole linked
        # group stays held.
        starts = [i for i, t in enumerate(ids)
                  if t not in self.special_ids and not (self.id_to_token(t) or "").startswith("##")]
        if len(starts) < 2:
            return len(ids)
        words = [self.id_to_token(ids[i]) for i in starts]
        h = len(starts) - 2
        while h > 0 and (words[h] in _GLUED_LEFT or words[h - 1] == "'"):
            h -= 1
        return len(ids) - starts[h]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "do_lower_case": self.do_lower_case}


class HFTokenizer(Tokenizer):
    """A plain `tokenizers` file, used exactly as its tokenizer.json describes."""

    kind = "hf"


_CLASSES = {"jieba_bpe": JiebaBPETokenizer, "bert": BertTokenizer, "hf": HFTokenizer}


# -------------------------------------------------- BERT decoding (ModelScope's BERT preprocessing)
def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (BertTokenizer's default): glue English punctuation."""
    for old, new in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(old, new)
    return text


_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip
_CHINESE_PUNCTUATION = frozenset(
    "＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､\u3000、〃〈〉《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
    "–—‘’‛“”„‟…‧﹏﹑﹔·！？｡。"
)
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _is_chinese_word(word: str) -> bool:
    # An empty word counts as Chinese (all() of nothing): ModelScope's behaviour, kept on purpose.
    return all(
        any(lo <= ord(c) <= hi for lo, hi in _CJK_RANGES)
        or c in _CHINESE_PUNCTUATION
        or c in _ASCII_PUNCTUATION
        for c in word
    )


def remove_space_between_chinese_chars(text: str) -> str:
    """ModelScope's post-processing of BERT output: join runs of Chinese words without spaces.

    Space-separated words made only of CJK ideographs and Chinese/ASCII punctuation are glued
    together; every other word keeps single spaces around it; the result is stripped.
    """
    out: list[str] = []
    run: list[str] = []
    for word in text.split(" "):
        if _is_chinese_word(word):
            run.append(word)
            continue
        if run:
            out.append("".join(run))
            run = []
        out.append(word)
    if run:
        out.append("".join(run))
    return " ".join(out).strip()


# ---------------------------------------------------------------------------------------- loading
def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer of a model directory (or a tokenizer.json / vocab.txt file itself).

    path may also be a ModelScope model id (`damo/nlp_gpt3_text-generation_1.3B`, see gpt3zh.hub).
    """
    path = resolve_model(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.is_file():
        directory, kind = path.parent, _kind_of_file(path)
        source = path
    else:
        directory, kind = path, detect_kind(path)
        source = path / _SOURCE_FILE[kind]
    cfg = _read_own_config(directory)
    if cfg is None or cfg["type"] != kind:
        # No gpt3zh config (or one for another file): a transformers-style tokenizer_config.json
        # may still say do_lower_case, which BertTokenizer.from_pretrained would honour.
        foreign = _read_json_if_exists(directory / CONFIG_NAME) if cfg is None else None
        cfg = {"do_lower_case": foreign.get("do_lower_case", True)} if isinstance(foreign, dict) else {}
    specials = {**_DEFAULT_SPECIALS[kind], **{k: v for k, v in cfg.items() if k.endswith("_token")}}
    if kind == "bert":
        return _load_bert(source, specials, do_lower_case=bool(cfg.get("do_lower_case", True)))
    return _load_tokenizer_json(source, kind, specials)


def detect_kind(directory: str | os.PathLike) -> str:
    """Which kind a model directory holds.

    1. tokenizer_config.json with "type" (written by `save`) decides.
    2. tokenizer.json with ModelScope's jieba marker in configuration.json, or with no
       configuration.json at all, is `jieba_bpe`.
    3. vocab.txt is `bert` (ModelScope single-process models; a transformers-style
       tokenizer_config.json without "type" is only read for `do_lower_case`).
    """
    directory = Path(directory)
    cfg = _read_own_config(directory)
    if cfg is not None:
        return cfg["type"]
    has_json, has_vocab = (directory / "tokenizer.json").is_file(), (directory / "vocab.txt").is_file()
    preprocessor = _modelscope_preprocessor(directory)
    if has_json and (preprocessor == JIEBA_PREPROCESSOR or (preprocessor is None and not has_vocab)):
        return "jieba_bpe"
    if has_vocab:
        return "bert"
    if has_json:
        raise TokenizerError(
            f"{directory}: tokenizer.json found but configuration.json names preprocessor "
            f"{preprocessor!r}, not {JIEBA_PREPROCESSOR!r}; write {CONFIG_NAME} with "
            f'{{"type": "jieba_bpe" | "hf"}} to say which kind it is'
        )
    raise FileNotFoundError(f"no tokenizer in {directory}: expected tokenizer.json or vocab.txt")


def written_by_gpt3zh_for_hf(directory: str | os.PathLike) -> bool:
    """Whether the directory's tokenizer_config.json is an HF export's, written by gpt3zh."""
    cfg = _read_json_if_exists(Path(directory) / CONFIG_NAME)
    return isinstance(cfg, dict) and "type" not in cfg and isinstance(cfg.get(HF_CONFIG_KEY), dict)


def _kind_of_file(path: Path) -> str:
    if path.suffix == ".txt":
        return "bert"
    if path.suffix == ".json":
        cfg = _read_own_config(path.parent)
        return cfg["type"] if cfg is not None and cfg["type"] != "bert" else "jieba_bpe"
    raise TokenizerError(f"{path}: expected a tokenizer.json or vocab.txt file, or a model directory")


def _read_json_if_exists(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None


def _read_own_config(directory: Path) -> dict[str, Any] | None:
    """gpt3zh's tokenizer config, or None if absent or written by someone else (no "type").

    It is the whole tokenizer_config.json, or in an HF export the object under HF_CONFIG_KEY.
    """
    path = directory / CONFIG_NAME
    cfg = _read_json_if_exists(path)
    if written_by_gpt3zh_for_hf(directory):
        cfg = cfg[HF_CONFIG_KEY]
    if not isinstance(cfg, dict) or "type" not in cfg:
        return None
    if cfg["type"] not in KINDS:
        raise TokenizerError(f"{path}: type {cfg['type']!r} is not one of {', '.join(KINDS)}")
    allowed = set(_DEFAULT_SPECIALS[cfg["type"]]) | {"type", "do_lower_case"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise TokenizerError(f"{path}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    for key, value in cfg.items():
        if key.endswith("_token") and value is not None and not isinstance(value, str):
            raise TokenizerError(f"{path}: {key} must be a string or null, got {value!r}")
    return cfg


def _modelscope_preprocessor(directory: Path) -> str | None:
    cfg = _read_json_if_exists(directory / "configuration.json")
    if not isinstance(cfg, dict):
        return None
    pre = cfg.get("preprocessor")
    return pre.get("type") if isinstance(pre, dict) else None


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    return path.read_bytes()


def _load_tokenizer_json(path: Path, kind: str, specials: dict[str, str | None]) -> Tokenizer:
    source = _read_bytes(path)
    backend = _backend_from_json(source, path)
    _check_specials(backend.get_vocab(with_added_tokens=True), specials, kind, path)
    return _CLASSES[kind](backend, source, specials)


def _backend_from_json(source: bytes, path: Path) -> tokenizers.Tokenizer:
    try:
        spec = json.loads(source.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(spec, dict) or "model" not in spec:
        raise TokenizerError(f"{path}: not a Hugging Face tokenizers file (no 'model' entry)")
    _upgrade_legacy_metaspace(spec)
    try:
        return tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as err:  # noqa: BLE001 (tokenizers raises a bare Exception for a bad file)
        raise TokenizerError(f"{path}: tokenizers cannot load it: {err}") from None


def _upgrade_legacy_metaspace(node: Any) -> None:
    """Give old Metaspace entries (add_prefix_space only) the prepend_scheme newer tokenizers need.

    Files written by tokenizers < 0.15 (ModelScope's 1.3B tokenizer.json among them) carry
    `add_prefix_space: false`; newer releases default prepend_scheme to "always" and reject the
    contradiction. The old meaning is "never prepend ▁, split on spaces": say so explicitly.
    """
    if isinstance(node, list):
        for item in node:
            _upgrade_legacy_metaspace(item)
    elif isinstance(node, dict):
        if node.get("type") == "Metaspace" and "add_prefix_space" in node and "prepend_scheme" not in node:
            node["prepend_scheme"] = "always" if node["add_prefix_space"] else "never"
        for value in node.values():
            _upgrade_legacy_metaspace(value)


def _check_specials(vocab: dict[str, int], specials: dict[str, str | None], kind: str, path: Path) -> None:
    """Every named special token must be in the vocabulary; the kind's required ones must be named."""
    missing = [f"{name} (set to null)" for name in _REQUIRED[kind] if specials.get(name) is None]
    missing += [f"{tok!r} ({name})" for name, tok in specials.items() if tok is not None and tok not in vocab]
    if missing:
        raise TokenizerError(f"{path}: the vocabulary lacks required special tokens: {', '.join(missing)}")


def _load_bert(path: Path, specials: dict[str, str | None], do_lower_case: bool) -> BertTokenizer:
    source = _read_bytes(path)
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{path}: not valid UTF-8 at byte {err.start}") from None
    # transformers' load_vocab: text mode (universal newlines), one token per line, id = line
    # number, a later duplicate wins.
    lines = io.StringIO(text, newline=None).readlines()
    vocab = {line.rstrip("\n"): i for i, line in enumerate(lines)}
    _check_specials(vocab, specials, "bert", path)
    backend = tokenizers.Tokenizer(
        models.WordPiece(vocab, unk_token=specials["unk_token"], max_input_chars_per_word=100)
    )
    # BertTokenizer's BasicTokenizer: clean control chars, space out CJK, lowercase + strip accents
    # (strip_accents=None follows lowercase in both libraries), split on whitespace and punctuation.
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=do_lower_case
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = specials["cls_token"], specials["sep_token"]
    backend.post_processor = processors.BertProcessing((sep, vocab[sep]), (cls, vocab[cls]))
    # transformers treats all five as special: matched whole in the input, dropped by
    # decode(skip_special_tokens=True), [UNK] included.
    names = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    toks = [specials[n] for n in names if specials.get(n) is not None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(toks)])
    return BertTokenizer(backend, source, specials, do_lower_case=do_lower_case)


# ------------------------------------------------------------------------------- char tokenizer
CHAR_SPECIALS = ("<pad>", "<sep>", "<|endoftext|>", "<unk>")


def train_char_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike | None = None, *, min_frequency: int = 1
) -> HFTokenizer:
    """A character-level `hf` tokenizer: one id per character seen >= min_frequency times.

    Ids: <pad>=0, <sep>=1, <|endoftext|>=2, <unk>=3, "\\n"=4 (always kept), then characters by
    descending count (ties by code point). Unseen characters encode to <unk>. Saved to out_dir
    when given.
    """
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(text)
    kept = sorted(
        (c for c, n in counts.items() if n >= min_frequency and c != "\n"), key=lambda c: (-counts[c], c)
    )
    vocab = {tok: i for i, tok in enumerate([*CHAR_SPECIALS, "\n", *kept])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # [\s\S], not ".": every character is a token, "\n" included.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # concatenate; the default decoder would join with spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAR_SPECIALS])
    specials = dict(_DEFAULT_SPECIALS["hf"])
    tok = HFTokenizer(backend, backend.to_str(pretty=True).encode("utf-8"), specials)
    if out_dir is not None:
        tok.save(out_dir)
    return tok


# -------------------------------------------------------------------------------------- helpers
def _batch_ids(backend: tokenizers.Tokenizer, inputs: list, **options: Any) -> list[list[int]]:
    # encode_batch_fast (tokenizers >= 0.20) skips computing offsets, which ids do not need.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(inputs, add_special_tokens=True, **options)]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename: a failure never leaves a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; tokenizer files are ordinary readable data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
