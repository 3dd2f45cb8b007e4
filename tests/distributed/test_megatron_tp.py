"""A real 4-shard ModelScope Megatron checkpoint under tensor parallelism: training layouts
(tp = 1, 2, 4, with FSDP beside tp = 2) give the one-process logits, the inference layout gives the
one-process greedy tokens, and the Megatron shard round trip tp 1 -> 2 -> 4 -> 1 is exact."""

from pathlib import Path

import pytest
import torch

from gpt3zh.checkpoint import describe, load_model, save_model
from gpt3zh.generation import generate
from gpt3zh.parallel import ParallelDims, build_mesh, full_tensor, parallelize, tensor_parallel_model

from .launch import spawn

pytestmark = pytest.mark.distributed

MEGATRON_TP4 = Path(__file__).resolve().parents[1] / "parity" / "fixtures" / "megatron_tp4"
PROMPTS = [[11, 250, 17, 3, 999], [5, 6]]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (2, 24), generator=g)


def _worker(rank, world, path):
    idx = _inputs()
    ref = load_model(path)
    with torch.no_grad():
        want = ref(idx)
    want_tokens = generate(ref, PROMPTS, max_new_tokens=12)
    for dp, tp in ((1, 4), (2, 2)):
        mesh = build_mesh(ParallelDims(dp=dp, tp=tp), "cpu")
        model = parallelize(load_model(path), mesh, vocab_parallel=True)
        assert model.blocks[0].attn.qkv.weight.to_local().shape[0] == 3 * 64 // (tp * dp)  # tp, then FSDP
        with torch.no_grad():
            got = full_tensor(model(idx))
        # fp32, summation split across shards: a few ulps of logits up to ~5 in size (so rtol 1e-6)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5, msg=f"dp={dp} tp={tp}")

        inference = tensor_parallel_model(load_model(path), mesh["tp"])
        assert inference.blocks[0].mlp.fc.weight.shape == (256 // tp, 64)  # plain local tensors
        assert generate(inference, PROMPTS, max_new_tokens=12) == want_tokens, (dp, tp)


def test_megatron_tp4_checkpoint_under_tp_matches_one_process():
    spawn(_worker, 4, str(MEGATRON_TP4), timeout=150)


def test_megatron_shards_round_trip_1_2_4_1_exactly(tmp_path):
    model = load_model(MEGATRON_TP4)
    want = model.state_dict()
    for i, tp in enumerate((1, 2, 4, 1)):
        out = save_model(model, tmp_path / f"step{i}_tp{tp}", format="megatron", tp=tp)
        assert describe(out).extra["tp"] == tp
        model = load_model(out)
        for name, t in model.state_dict().items():
            assert torch.equal(t, want[name]), (tp, name)


def test_generate_cli_with_tp2_under_torchrun_prints_the_one_process_text(tmp_path, capsys):
    import subprocess
    import sys

    from gpt3zh.cli import main
    from gpt3zh.config import GPTConfig
    from gpt3zh.model import GPT
    from gpt3zh.tokenizer import train_char_tokenizer

    from .launch import torchrun_env

    text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
    tok = train_char_tokenizer([text])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=32))
    save_model(model, tmp_path / "m", tokenizer=tok)
    args = ["generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "10", "--no-do-sample", "--json",
            "床前", "举头望"]
    assert main(args) == 0
    want = capsys.readouterr().out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gpt3zh",
           *args, "--tp", "2"]
    run = subprocess.run(cmd, check=False, env=torchrun_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == want  # rank 0 alone prints, the same text
