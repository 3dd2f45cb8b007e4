"""EleutherAI's lm-evaluation-harness against a real `gpt3zh serve` (uvicorn on 127.0.0.1), offline.

`lm-eval run --model local-completions` (a subprocess, as a user runs it) evaluates two local tasks
(tests/lm_eval_tasks/): a multiple-choice one (loglikelihood requests: echo + logprobs) and a
generate_until one, with data made from the shared poetry test split: a poem's first line as the
context, its second line as the answer, and three second lines of other poems of the same length
as the distractors. lm-eval counts context tokens with the server's own tokenizer
(`tokenizer_backend=remote`: /tokenize), so no Hugging Face tokenizer, hub or data set is needed.

Its numbers are checked against gpt3zh's own: every choice's log-likelihood (gpt3zh.scoring),
acc / acc_norm (gpt3zh.evaluation.evaluate_choices) and each greedy continuation (gpt3zh.generate).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, require_shared

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the [dev] extra")
pytest.importorskip("fastapi", reason="the server is in the [serve] extra")

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
ITEMS = 16


def poetry_rows(data: Path, tok) -> tuple[list[dict], list[dict]]:
    """(multiple-choice rows, generation rows) from the first poems whose opening couplet "A，B。"
    has lines of 5 or 7 characters that the model's tokenizer knows."""
    couplets = []
    for line in (data / "poetry" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["src_txt"]
        a, comma, rest = text.partition("，")
        b, stop, _ = rest.partition("。")
        if comma and stop and len(a) == len(b) in (5, 7) and tok.unk_id not in tok.encode(a + b):
            couplets.append((a, b))
    mc, gen = [], []
    for i, (a, b) in enumerate(couplets[:ITEMS]):
        others = [y + "。" for x, y in couplets[ITEMS:] if len(y) == len(b) and y != b]
        choices = [others[(3 * i + k) % len(others)] for k in range(3)]
        gold = i % 4
        choices.insert(gold, b + "。")
        mc.append({"context": a + "，", "choices": choices, "gold": gold})
        gen.append({"context": a + "，", "target": b})
    return mc, gen


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def served():
    from gpt3zh.assets import default_model_path
    from gpt3zh.checkpoint import load_pretrained
    from gpt3zh.serve import ServeConfig, create_app
    from gpt3zh.tokenizer import load_tokenizer
    from serving import BackgroundServer

    path = default_model_path()
    loaded, tok = load_pretrained(path), load_tokenizer(path)
    app = create_app(loaded.model, tok, ServeConfig(max_batch=8, max_queue=256), "poetry-small", loaded.generation)
    with BackgroundServer(app) as srv:
        yield srv, loaded, tok


def run_lm_eval(url: str, workdir: Path, context: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OPENAI"))}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(workdir / "hf"),
               PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    model_args = (f"model=poetry-small,base_url={url}/v1/completions,tokenizer_backend=remote,"
                  f"tokenized_requests=True,max_length={context},max_retries=1")
    cmd = [shutil.which("lm-eval") or "lm-eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--tasks", "gpt3zh_poetry_mc,gpt3zh_poetry_gen", "--include_path", str(TASKS),
           "--batch_size", "8", "--output_path", str(workdir / "out"), "--log_samples", "--seed", "1234"]
    if not Path(cmd[0]).is_absolute():  # the console script beside this interpreter
        cmd[0] = str(Path(sys.executable).with_name("lm-eval"))
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = sorted((workdir / "out").rglob("results_*.json"))
    assert results, done.stderr[-3000:]
    samples = {task: [json.loads(line) for line in next((workdir / "out").rglob(f"samples_{task}_*.jsonl"))
                      .read_text(encoding="utf-8").splitlines()]
               for task in ("gpt3zh_poetry_mc", "gpt3zh_poetry_gen")}
    return {"results": json.loads(results[-1].read_text(encoding="utf-8"))["results"], "samples": samples}


@pytest.mark.slow
def test_lm_eval_scores_equal_gpt3zhs_own(served, tmp_path):
    from gpt3zh.evaluation import evaluate_choices
    from gpt3zh.generation import generate
    from gpt3zh.scoring import loglikelihood

    srv, loaded, tok = served
    mc, gen = poetry_rows(require_shared(), tok)
    write_jsonl(tmp_path / "poetry_mc.jsonl", mc)
    write_jsonl(tmp_path / "poetry_gen.jsonl", gen)
    out = run_lm_eval(srv.url, tmp_path, loaded.model.config.max_seq_len)

    # multiple choice: every (context, choice) log-likelihood, then acc and acc_norm
    ours = evaluate_choices(loaded.model, tok, mc)
    mine = loglikelihood(loaded.model, tok, [(r["context"], c) for r in mc for c in r["choices"]])
    theirs = {(s["doc"]["context"], tuple(s["doc"]["choices"])): [float(r[0][0]) for r in s["resps"]]
              for s in out["samples"]["gpt3zh_poetry_mc"]}
    assert len(theirs) == ITEMS
    k = 0
    for row in mc:
        lls = theirs[(row["context"], tuple(row["choices"]))]
        for ll in lls:
            assert abs(ll - mine[k].logprob) < 1e-4, (row, ll, mine[k])  # one batch vs another: float sums
            k += 1
    scores = out["results"]["gpt3zh_poetry_mc"]
    assert (scores["acc,none"] == pytest.approx(ours["acc"])
            and scores["acc_norm,none"] == pytest.approx(ours["acc_norm"]))

    # generate_until: lm-eval's greedy continuations are gpt3zh.generate's, cut at "。"
    for s in out["samples"]["gpt3zh_poetry_gen"]:
        ids = tok.encode(s["doc"]["context"])
        new = generate(loaded.model, [ids], max_new_tokens=16, eos_token_id=tok.sep_id)[0][len(ids):]
        text = tok.decode(new).split("。")[0]
        assert s["resps"][0][0] == text, s
    exact = sum(tok.decode(generate(loaded.model, [tok.encode(r["context"])], max_new_tokens=16,
                                    eos_token_id=tok.sep_id)[0][len(tok.encode(r["context"])):]).split("。")[0]
                == r["target"] for r in gen) / len(gen)
    assert out["results"]["gpt3zh_poetry_gen"]["exact_match,none"] == pytest.approx(exact)
