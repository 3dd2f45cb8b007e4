"""Tensor and data parallelism equal one process: logits, gradients and an optimizer step."""

import copy
import json

import pytest
import torch

from gpt3zh.config import GPTConfig
from gpt3zh.model import GPT
from gpt3zh.parallel import ParallelDims, build_mesh, full_tensor, local_tensor, parallelize, token_losses
from gpt3zh.planning import plan_layout

from .launch import spawn

pytestmark = pytest.mark.distributed

CFG = GPTConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=16, dropout=0.0, attn_dropout=0.0)


def _reference(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(CFG)
    idx = torch.randint(0, CFG.vocab_size, (4, 12))
    targets = torch.randint(0, CFG.vocab_size, (4, 12))
    return model, idx, targets


def _tp_worker(rank, world, out_dir):
    for vocab_parallel in (False, True):
        _check_tp(world, vocab_parallel)
    _step_worker(rank, world, world, 1, out_dir)  # the same two ranks as dp=2: one start for both tests


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
        torch.testing.assert_close(full_tensor(p.grad), q.grad, rtol=0, atol=1e-5, msg=name)


def test_tp2_logits_and_gradients_equal_one_process_and_dp2_step_equals_full_batch(tmp_path):
    spawn(_tp_worker, 2, tmp_path, timeout=150)
    _check_plan(tmp_path, dp=2, tp=1)


def _step(model, idx, targets):
    # eps=1e-3: the key bias gets a zero gradient in exact math (softmax ignores it), so its computed
    # gradient is rounding noise that Adam with a tiny eps would blow up to a full lr-sized step.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)
    token_losses(model(idx), targets).mean().backward()
    opt.step()
    return opt


def _bytes(tensors) -> int:
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


def _step_worker(rank, world, dp, tp, out_dir):
    ref, idx, targets = _reference()
    model = parallelize(copy.deepcopy(ref), build_mesh(ParallelDims(dp=dp, tp=tp), "cpu"), vocab_parallel=tp > 1)
    rows = slice(rank // tp * 4 // dp, (rank // tp + 1) * 4 // dp)  # this dp rank's share of the batch
    opt = _step(model, idx[rows], targets[rows])
    _step(ref, idx, targets)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(full_tensor(p.detach()), q.detach(), rtol=0, atol=1e-5, msg=name)
    held = {  # what this rank really holds after a step
        "params": _bytes(model.parameters()),
        "grads": _bytes(p.grad for p in model.parameters()),
        "optimizer": _bytes(t for state in opt.state.values() for t in state.values()),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(held))


def test_2x2_step_on_split_batch_equals_one_process_full_batch(tmp_path):
    spawn(_step_worker, 4, 2, 2, tmp_path, timeout=180)
    _check_plan(tmp_path, dp=2, tp=2)


def _check_plan(tmp_path, dp, tp):
    # `gpt3zh plan` (meta model, fake process group) predicts exactly those bytes on every rank
    for rank in range(dp * tp):
        plan = plan_layout(CFG, ParallelDims(dp=dp, tp=tp), rank=rank, param_dtype=torch.float32)
        held = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (plan.params, plan.grads, plan.optimizer) == (held["params"], held["grads"], held["optimizer"]), rank
