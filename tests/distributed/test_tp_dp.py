"""Tensor and data parallelism equal one process: logits, gradients and an optimizer step."""

import copy

import pytest
import torch

from gpt3zh.config import GPTConfig
from gpt3zh.model import GPT
from gpt3zh.parallel import ParallelDims, build_mesh, full_tensor, parallelize, token_losses

from .launch import spawn

pytestmark = pytest.mark.distributed

CFG = GPTConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=16, dropout=0.0, attn_dropout=0.0)


def _reference(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(CFG)
    idx = torch.randint(0, CFG.vocab_size, (4, 12))
    targets = torch.randint(0, CFG.vocab_size, (4, 12))
    return model, idx, targets


def _tp_worker(rank, world):
    for vocab_parallel in (False, True):
        _check_tp(world, vocab_parallel)


def _check_tp(world, vocab_parallel):
    ref, idx, targets = _reference()
    model = parallelize(copy.deepcopy(ref), build_mesh(ParallelDims(dp=1, tp=world), "cpu"), vocab_parallel)
    assert model.blocks[0].attn.qkv.weight.to_local().shape == (3 * CFG.d_model // world, CFG.d_model)

    ref_logits = ref(idx)
    token_losses(ref_logits, targets).mean().backward()
    logits = model(idx)
    token_losses(logits, targets).mean().backward()

    torch.testing.assert_close(full_tensor(logits), ref_logits, rtol=0, atol=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(full_tensor(p.grad), q.grad, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_tp2_logits_and_gradients_equal_one_process():
    spawn(_tp_worker, 2, timeout=120)


def _step(model, idx, targets):
    # eps=1e-3: the key bias gets a zero gradient in exact math (softmax ignores it), so its computed
    # gradient is rounding noise that Adam with a tiny eps would blow up to a full lr-sized step.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)
    token_losses(model(idx), targets).mean().backward()
    opt.step()
    return opt


def _step_worker(rank, world, dp, tp):
    ref, idx, targets = _reference()
    model = parallelize(copy.deepcopy(ref), build_mesh(ParallelDims(dp=dp, tp=tp), "cpu"), vocab_parallel=tp > 1)
    rows = slice(rank // tp * 4 // dp, (rank // tp + 1) * 4 // dp)  # this dp rank's share of the batch
    _step(model, idx[rows], targets[rows])
    _step(ref, idx, targets)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(full_tensor(p.detach()), q.detach(), rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dp,tp", [(2, 1), (2, 2)])
def test_dp_step_on_split_batch_equals_one_process_full_batch(dp, tp):
    spawn(_step_worker, dp * tp, dp, tp, timeout=180)
