"""Evaluation metrics: masked and ModelScope (unmasked) perplexity, character-level ROUGE-L and BLEU-4.

Text metrics work on characters (whitespace dropped), the usual choice for Chinese, so scores do
not depend on a tokenizer or a word segmenter. Both sides are NFKC-normalised first: the JiebaBPE
tokenizer folds full-width forms (`？` -> `?`, `１` -> `1`), so a model's decoded text could never
match a reference's full-width punctuation otherwise.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------- perplexity
@dataclass
class PPLAccumulator:
    """Sums for two perplexities over a data set.

    masked: mean NLL over trained tokens only (target + <sep> in prompt mode; all real tokens in
    continuation mode), the quantity the training loss estimates.
    modelscope: ModelScope's `ppl` metric (ModelScope's PplMetric): per batch, the plain mean cross entropy
    over every position of the batch padded to sequence_length - 1 (prompt and 0-padding
    included), averaged over batches weighted by batch size. It depends on padding and batch size
    and is reported only for comparison with ModelScope's numbers.
    """

    nll_sum: float = 0.0
    tokens: int = 0
    ms_loss_sum: float = 0.0
    ms_rows: int = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, modelscope: bool = False):
        # logits (B, T, V); labels, mask (B, T)
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")  # (B*T,)
        m = mask.flatten()
        self.nll_sum += float(nll[m].double().sum())
        self.tokens += int(m.sum())
        if modelscope:
            self.ms_loss_sum += float(nll.double().mean()) * labels.shape[0]
            self.ms_rows += labels.shape[0]

    def result(self) -> dict[str, float]:
        loss = self.nll_sum / self.tokens if self.tokens else float("nan")
        out = {"loss": loss, "ppl": _exp(loss) if self.tokens else float("nan"), "tokens": self.tokens}
        if self.ms_rows:
            out["ppl_modelscope"] = _exp(self.ms_loss_sum / self.ms_rows)
        return out


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 or math.isnan(x) else math.inf  # math.exp raises past ~709.78


# -------------------------------------------------------------------------------------- text metrics
def _chars(text: str) -> list[str]:
    return [c for c in unicodedata.normalize("NFKC", text) if not c.isspace()]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) with one row of memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """Character-level ROUGE-L F1: P = LCS/|pred|, R = LCS/|ref|, F = 2PR/(P+R)."""
    p, r = _chars(pred), _chars(ref)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _ngrams(chars: list[str], n: int) -> Counter:
    return Counter(tuple(chars[i : i + n]) for i in range(len(chars) - n + 1))


@dataclass
class BleuStats:
    """Corpus statistics for BLEU: clipped n-gram matches and totals, lengths."""

    matches: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    totals: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    pred_len: int = 0
    ref_len: int = 0

    def add(self, pred: str, ref: str) -> None:
        p, r = _chars(pred), _chars(ref)
        self.pred_len += len(p)
        self.ref_len += len(r)
        for n in range(1, 5):
            pn, rn = _ngrams(p, n), _ngrams(r, n)
            self.matches[n - 1] += sum(min(c, rn[g]) for g, c in pn.items())
            self.totals[n - 1] += max(len(p) - n + 1, 0)

    def score(self) -> float:
        """BLEU-4, uniform weights, add-one smoothing for n >= 2 (Lin & Och 2004), brevity penalty."""
        if self.pred_len == 0 or self.matches[0] == 0:
            return 0.0
        log_p = math.log(self.matches[0] / self.totals[0])
        log_p += sum(math.log((self.matches[n] + 1) / (self.totals[n] + 1)) for n in range(1, 4))
        bp = 1.0 if self.pred_len > self.ref_len else math.exp(1 - self.ref_len / self.pred_len)
        return bp * math.exp(log_p / 4)


def bleu4(preds: list[str], refs: list[str]) -> float:
    """Corpus-level character BLEU-4 of predictions against one reference each."""
    stats = BleuStats()
    for p, r in zip(preds, refs, strict=True):
        stats.add(p, r)
    return stats.score()


def rouge_l_mean(preds: list[str], refs: list[str]) -> float:
    """Mean sentence-level character ROUGE-L F1."""
    scores = [rouge_l(p, r) for p, r in zip(preds, refs, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0
