"""CPU decoding speed of the fast path: gpt3zh fp32 eager, compiled, int8, int8+compiled, against
transformers GPT2LMHeadModel fp32 on the same weights (built in memory from the HF name table).

    .venv/bin/python benchmarks/fast_cpu.py --preset base --runs 3 --threads 2
    .venv/bin/python benchmarks/fast_cpu.py --ppl-model work_dirs/poetry_small/checkpoints/step-00002000

Batch 1 (default), greedy, a random 32-token prompt, 128 new tokens. Every variant runs in this one
process and the runs are interleaved (run r of each before run r+1 of any) after a warm-up that also
compiles, so load from other processes hits them all alike; the median is reported. Prints tok/s,
the speed relative to transformers, and how many of the 128 tokens equal fp32 eager's (compiled
fp32 must match all; int8 changes numerics, so its agreement is reported, not required).

--ppl-model also reports the int8 perplexity change on ../shared/data/poetry/test.jsonl: a model
directory, or a training checkpoint directory (checkpoints/step-N with state.pt + meta.json).
Without it the perplexity is measured on the random-init model and says so.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from _timing import interleaved

from gpt3zh import generation
from gpt3zh.config import PRESETS, GenerationConfig, GenerationDefaults, GPTConfig
from gpt3zh.engine import STATIC_BUCKET, Request, TokenEvent
from gpt3zh.inference import prepare
from gpt3zh.model import GPT
from gpt3zh.quantize import quantize_int8

ROOT = Path(__file__).resolve().parents[1]
POETRY_TEST = ROOT.parent / "shared" / "data" / "poetry" / "test.jsonl"


def hf_from_model(model: GPT, dtype=torch.float32):
    """transformers GPT2LMHeadModel with `model`'s weights, built in memory (no files written)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt3zh.checkpoint import configs, tables

    cfg = model.config
    hf_cfg, _ = configs.config_to_hf(cfg, GenerationDefaults(), "float32")
    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config(**hf_cfg))
    sd = tables.to_foreign({k: v.detach().to(dtype) for k, v in model.state_dict().items()}, tables.HF, cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF export: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.generation_config.eos_token_id = None  # both sides generate exactly `new` tokens
    hf.generation_config.pad_token_id = 0
    return hf.to(model.tok_emb.weight.device).eval()


def hf_greedy(hf, prompts: torch.Tensor, new: int) -> list[list[int]]:
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False)
    return out[:, prompts.shape[1]:].tolist()


def gpt3zh_greedy(model, prompts: torch.Tensor, new: int, cache_len=None, **inference) -> list[list[int]]:
    """The new tokens (B, new) of greedy generation without stop ids, through gpt3zh.generation.run."""
    prepared = prepare(model, **inference)
    cfg = GenerationConfig(max_new_tokens=new)
    reqs = [Request(row, cfg, index=i) for i, row in enumerate(prompts.tolist())]
    out: list[list[int]] = [[] for _ in reqs]
    for events in generation.run(prepared, reqs, cache_len=cache_len):
        for ev in events:
            if isinstance(ev, TokenEvent):
                out[ev.request.index].append(ev.token_id)
    return out


def bucketed(need: int, limit: int) -> int:
    """The cache length a compiled engine uses for `need` slots (so a warm-up compiles the same graph)."""
    return min(limit, -(-need // STATIC_BUCKET) * STATIC_BUCKET)


def agreement(out: list[list[int]], ref: list[list[int]]) -> str:
    """Tokens equal to the reference before the first difference, over all rows."""
    same = sum(next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r)) for o, r in zip(out, ref))
    total = sum(len(r) for r in ref)
    return f"{same}/{total}" + ("" if same == total else " (prefix)")


def speed_table(model: GPT, batch: int, prompt_len: int, new: int, runs: int, with_hf: bool) -> None:
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len))
    # The warm-up decodes 4 tokens into the cache length of the timed run, so it compiles the graph
    # the timed runs use.
    cache_len = bucketed(prompt_len + new - 1, model.config.max_seq_len)

    def ours(**opts):
        prepared = prepare(model, **opts)  # held here: prepare() caches one variant per model
        return lambda warmup=False: gpt3zh_greedy(prepared, prompts, 4 if warmup else new,
                                                  cache_len if warmup and opts.get("compile") else None)

    impls = {
        "gpt3zh fp32 eager": ours(),
        "gpt3zh fp32 compiled": ours(compile=True),
        "gpt3zh int8 eager": ours(quantize="int8"),
        "gpt3zh int8 compiled": ours(quantize="int8", compile=True),
    }
    if with_hf:
        hf = hf_from_model(model)
        impls["transformers fp32"] = lambda warmup=False: hf_greedy(hf, prompts, 4 if warmup else new)
    results = interleaved(impls, runs)
    ref = results["gpt3zh fp32 eager"][1]
    base_s = results["transformers fp32"][0] if with_hf else None
    print(f"{'impl':<24} {'batch':>5} {'median s':>9} {'tok/s':>8} {'vs HF fp32':>10} {'warm-up s':>9}  same tokens as fp32 eager")
    for name, (secs, out, warm) in results.items():
        rel = f"{base_s / secs:>9.2f}x" if base_s else f"{'-':>10}"
        print(f"{name:<24} {batch:>5} {secs:>9.3f} {batch * new / secs:>8.1f} {rel} {warm:>9.1f}  {agreement(out, ref)}",
              flush=True)


# ------------------------------------------------------------------------------------------ perplexity
def load_for_ppl(path: str | None, preset_cfg: GPTConfig):
    """(model, tokenizer or None, description)."""
    import gpt3zh

    if path is None:
        assets = ROOT / "src" / "gpt3zh" / "assets" / "poetry-small"
        if assets.is_dir():
            path = str(assets)
    if path is None:
        torch.manual_seed(0)
        return GPT(preset_cfg).eval(), None, "random-init model (no trained poetry model available)"
    p = Path(path)
    if (p / "state.pt").is_file():  # a training checkpoint: model weights + the run's config
        meta = json.loads((p / "meta.json").read_text())
        mcfg = meta["config"]["model"]
        cfg = GPTConfig.from_preset(mcfg["preset"], **mcfg["overrides"])
        model = GPT(cfg)
        model.load_state_dict(torch.load(p / "state.pt", weights_only=True, map_location="cpu")["model"])
        tok_dir = ROOT / meta["config"]["tokenizer"]
        return model.eval(), gpt3zh.load_tokenizer(tok_dir), f"training checkpoint {p} (step {meta['step']})"
    return gpt3zh.load_model(p).eval(), gpt3zh.load_tokenizer(p), f"model {p}"


@torch.inference_mode()
def poetry_nll(model: GPT, rows: list[list[int]]) -> tuple[float, int]:
    """Summed next-token NLL and token count over each row (one row at a time, no padding)."""
    total, n = 0.0, 0
    for ids in rows:
        idx = torch.tensor([ids[: model.config.max_seq_len]])
        logits = model(idx[:, :-1]).float()  # (1, T-1, V)
        total += torch.nn.functional.cross_entropy(logits[0], idx[0, 1:], reduction="sum").item()
        n += idx.shape[1] - 1
    return total, n


def ppl_report(path: str | None, preset_cfg: GPTConfig, max_rows: int) -> None:
    model, tok, what = load_for_ppl(path, preset_cfg)
    lines = POETRY_TEST.read_text(encoding="utf-8").splitlines()[:max_rows]
    texts = [json.loads(line)["src_txt"] for line in lines]
    if tok is not None:
        rows = [tok.encode(t) + [tok.eod_id] for t in texts]
    else:  # no tokenizer that matches random weights: fixed pseudo-random ids of the same lengths
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, model.config.vocab_size, (len(t),), generator=g).tolist() for t in texts]
    rows = [r for r in rows if len(r) >= 2]
    nll32, n = poetry_nll(model, rows)
    nll8, _ = poetry_nll(quantize_int8(model), rows)
    ppl32, ppl8 = math.exp(nll32 / n), math.exp(nll8 / n)
    print(f"# int8 perplexity on {POETRY_TEST.name} ({len(rows)} rows, {n} tokens), {what}")
    print(f"fp32 ppl {ppl32:.4f}   int8 ppl {ppl8:.4f}   change {100 * (ppl8 / ppl32 - 1):+.3f}%", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--no-speed", action="store_true", help="only the perplexity check")
    ap.add_argument("--ppl-model", default=None, help="model dir or training checkpoint dir for the int8 ppl check")
    ap.add_argument("--ppl-rows", type=int, default=400, help="test rows for the ppl check (default 400)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset].replace(dropout=0.0, attn_dropout=0.0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  threads "
          f"{torch.get_num_threads()}  {platform.processor() or platform.machine()}")
    print("# NOTE: shared machine (other jobs running): compare rows of one table, not absolute figures")
    if not args.no_speed:
        print(f"# preset {args.preset}, random init (seed 0), greedy, prompt {args.prompt_len} tokens, "
              f"{args.new_tokens} new tokens, median of {args.runs} interleaved runs after a warm-up (+compile)")
        torch.manual_seed(0)
        speed_table(GPT(cfg).eval(), args.batch, args.prompt_len, args.new_tokens, args.runs, not args.no_hf)
    ppl_report(args.ppl_model, cfg, args.ppl_rows)


if __name__ == "__main__":
    main()
