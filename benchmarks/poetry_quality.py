"""Quality of a poetry model (by default the embedded one): character-level PPL against a unigram
baseline, and the form check of sampled continuations of classic openings.

    python benchmarks/poetry_quality.py [--model DIR] [--samples 20] [--limit N] [--json]

Character-level PPL = exp(total NLL / total characters) on ../shared/data/poetry/test.jsonl, where
the NLL is summed over every trained token (each character and the closing <sep>). The baseline is
a unigram model estimated on train.jsonl with add-one smoothing, reported two ways: over raw
characters, and over the model's own token ids (rare characters merged into <unk> exactly as the
model sees them — the stricter baseline, used for the "<= 1/3" check).

Form check: for each of the classic openings below, sample a continuation with the model's default
sampling settings (its config's top_k / top_p / temperature; seed = the sample index). It passes when
the continuation (cut at <sep>/eod) is made of complete lines, each exactly as long as the prompt's
line and each ending in ， or 。, with at least two lines; a last line cut short by the token limit is
ignored.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
POETRY = ROOT.parent / "shared" / "data" / "poetry"
OPENINGS = [
    "床前明月光，", "春眠不觉晓，", "白日依山尽，", "红豆生南国，", "千山鸟飞绝，",
    "空山不见人，", "独坐幽篁里，", "移舟泊烟渚，", "松下问童子，", "向晚意不适，",
    "朝辞白帝彩云间，", "两个黄鹂鸣翠柳，", "月落乌啼霜满天，", "故人西辞黄鹤楼，", "渭城朝雨浥轻尘，",
    "独在异乡为异客，", "清明时节雨纷纷，", "远上寒山石径斜，", "黄河远上白云间，", "秦时明月汉时关，",
]
_LINE = re.compile(r"([^，。]*)([，。])")


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    texts = [json.loads(line)["src_txt"] for line in path.open(encoding="utf-8")]
    return texts[:limit] if limit else texts


def unigram_ppl(train: list[str], test: list[str], unit) -> float:
    """exp(mean -log p(u)) over the units of `test`, p add-one smoothed on `train` (+1 unseen class)."""
    counts = collections.Counter(u for t in train for u in unit(t))
    total, classes = sum(counts.values()), len(counts) + 1
    nll = n = 0
    for text in test:
        for u in unit(text):
            nll -= math.log((counts.get(u, 0) + 1) / (total + classes))
            n += 1
    return math.exp(nll / n)


@torch.inference_mode()
def score_texts(model, tok, texts: list[str]) -> tuple[float, int, int]:
    """(total NLL, scored tokens, scored characters): every token of `text + <sep>` after the first.

    Poems longer than the context are scored in consecutive windows of max_seq_len tokens, each
    window starting with no earlier context (which can only raise the NLL): nothing is cut off, so
    every character of the test set counts.
    """
    L = model.config.max_seq_len
    windows, chars = [], 0
    for text in texts:
        ids = tok.encode(text) + [tok.sep_id]
        windows += [ids[start : start + L] for start in range(0, len(ids) - 1, L - 1)]
        chars += len(text)
    windows.sort(key=len)
    nll, n_tok = 0.0, 0
    for i in range(0, len(windows), 32):  # right-padded batches: causal, so padding changes nothing
        batch = windows[i : i + 32]
        width = max(map(len, batch))
        x = torch.tensor([w + [0] * (width - len(w)) for w in batch])  # (B, T)
        y = torch.tensor([w[1:] + [-100] * (width - len(w)) for w in batch])  # (B, T-1)
        logits = model(x[:, :-1]).float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                                 reduction="sum").item()
        n_tok += int((y != -100).sum())
    return nll, n_tok, chars


def form_ok(prompt: str, continuation: str, truncated: bool) -> bool:
    line_len = len(prompt.rstrip("，。"))
    lines = _LINE.findall(continuation)
    rest = _LINE.sub("", continuation)
    if rest and not truncated:  # text after the last punctuation that was not cut by the limit
        return False
    return len(lines) >= 2 and all(len(body) == line_len for body, _ in lines)


def sample_continuations(model, tok, gen, n: int, max_new_tokens: int = 64) -> list[dict]:
    """n seeded samples with the model directory's sampling defaults `gen` (GenerationDefaults)."""
    from gpt3zh.generation import generate

    stops = sorted({tok.sep_id, tok.eod_id, gen.eod_id})
    out = []
    for i in range(n):
        prompt = OPENINGS[i % len(OPENINGS)]
        ids = tok.encode(prompt)
        row = generate(model, [ids], max_new_tokens=max_new_tokens, do_sample=True, top_k=gen.top_k,
                       top_p=gen.top_p, temperature=gen.temperature, eos_token_id=stops, seed=i)[0]
        new = row[len(ids):]
        stopped = bool(new) and new[-1] in stops
        text = tok.decode(new[:-1] if stopped else new)
        out.append({"prompt": prompt, "continuation": text, "ok": form_ok(prompt, text, not stopped)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the embedded poetry-small model)")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--limit", type=int, help="score only the first N test poems")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from gpt3zh.checkpoint import load_pretrained
    from gpt3zh.tokenizer import load_tokenizer

    model_dir = Path(args.model) if args.model else ROOT / "src" / "gpt3zh" / "assets" / "poetry-small"
    loaded = load_pretrained(model_dir, dtype=torch.float32)
    model, gen = loaded.model, loaded.generation
    tok = load_tokenizer(model_dir)
    train, test = read_texts(POETRY / "train.jsonl"), read_texts(POETRY / "test.jsonl", args.limit)

    nll, n_tok, chars = score_texts(model, tok, test)
    char_ppl = math.exp(nll / chars)
    uni_chars = unigram_ppl(train, test, lambda t: t)
    uni_ids = unigram_ppl(train, test, tok.encode)
    samples = sample_continuations(model, tok, gen, args.samples)
    report = {
        "model": str(model_dir),
        "test_poems": len(test),
        "tokens": n_tok,
        "chars": chars,
        "loss_per_token": nll / n_tok,
        "token_ppl": math.exp(nll / n_tok),
        "char_ppl": char_ppl,
        "bits_per_char": nll / (math.log(2) * chars),
        "unigram_char_ppl_raw": uni_chars,
        "unigram_char_ppl_model_ids": uni_ids,
        "ppl_ratio": char_ppl / min(uni_chars, uni_ids),
        "form_pass": sum(s["ok"] for s in samples),
        "form_total": len(samples),
        "sampling": {k: getattr(gen, k) for k in ("top_k", "top_p", "temperature")},
        "samples": samples,
    }
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        for k, v in report.items():
            if k != "samples":
                print(f"{k:<28} {v:.4f}" if isinstance(v, float) else f"{k:<28} {v}")
        for s in samples:
            print(f"  [{'ok' if s['ok'] else '--'}] {s['prompt']}{s['continuation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
