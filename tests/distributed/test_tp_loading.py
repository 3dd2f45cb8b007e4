"""Loading straight into the tensor-parallel serving layout: each rank's slices, from every format.

The reference is the whole model (`load_model`) cut by the serving layout's table
(`parallel.shard_dims`): a rank must end up with exactly those tensors, bit for bit, whatever the
format and the number of Megatron shards it was saved with, and must read only its own file where
the format allows it. The DCP test writes a checkpoint as the distributed trainer does (FSDP2 over
dp x TP, `get_state_dict` + `dcp.save`) and loads it under a real 4-rank gloo group.
"""

import json

import pytest
import torch

from gpt3zh.checkpoint import load_model, save_model
from gpt3zh.checkpoint.errors import CheckpointError
from gpt3zh.checkpoint.sharded import describe_source, read_tp_shard, read_whole
from gpt3zh.config import GPTConfig
from gpt3zh.model import GPT
from gpt3zh.parallel import shard_dims

from .launch import spawn

CONFIG = GPTConfig(vocab_size=96, n_layer=2, n_head=4, d_model=32, max_seq_len=32)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def _expected(model: GPT, rank: int, tp: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        dim = shard_dims(model)[name]
        out[name] = t if dim is None else t.chunk(tp, dim)[rank]
    return out


def _assert_slices(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].shape == t.shape and torch.equal(got[name], t), name
        assert got[name].is_contiguous(), name


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_megatron_shards_at_any_tp_give_each_rank_its_slice(model, tmp_path, shards, tp):
    d = save_model(model, tmp_path / "m", format="megatron", tp=shards)
    src = describe_source(d)
    for rank in range(tp):
        state, read = read_tp_shard(src, shard_dims(model), rank, tp)
        _assert_slices(state, _expected(model, rank, tp))
        own = [f"mp_rank_{j:02d}_model_states.pt" for j in range(shards)
               if rank * shards // tp <= j < -(-(rank + 1) * shards // tp)]
        assert read.startswith(f"read {', '.join(own)} of {shards} Megatron shards"), read
    if shards == tp > 1:  # each rank its own file, plus the embedding rows of the others
        assert read == f"read mp_rank_{tp - 1:02d}_model_states.pt of {tp} Megatron shards " \
                       f"(and the vocab embedding's rows from {tp - 1} more)"


def test_gpt3zh_safetensors_reads_slices_and_single_files_load_then_slice(model, tmp_path):
    for fmt in ("gpt3zh", "modelscope", "hf"):
        d = save_model(model, tmp_path / fmt, format=fmt)
        src = describe_source(d)
        for rank in range(2):
            state, read = read_tp_shard(src, shard_dims(model), rank, 2)
            _assert_slices(state, _expected(load_model(d), rank, 2))
        if fmt == "gpt3zh":
            assert read == "read its slices of model.safetensors"
        else:
            assert "read the whole" in read


def test_cast_on_read_and_bad_arguments(model, tmp_path):
    d = save_model(model, tmp_path / "m", format="megatron", tp=2)
    state, _ = read_tp_shard(describe_source(d), shard_dims(model), 1, 2, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert torch.equal(state["blocks.0.mlp.fc.weight"], _expected(model, 1, 2)["blocks.0.mlp.fc.weight"].bfloat16())
    with pytest.raises(CheckpointError, match="rank 2 is outside tensor parallelism 2"):
        read_tp_shard(describe_source(d), shard_dims(model), 2, 2)
    with pytest.raises(CheckpointError, match="split does not name the model's tensors"):
        read_tp_shard(describe_source(d), {"tok_emb.weight": None}, 0, 2)


def test_a_bad_shard_file_is_named(model, tmp_path):
    d = save_model(model, tmp_path / "m", format="megatron", tp=2)
    bad = d / "model" / "mp_rank_01_model_states.pt"
    sd = torch.load(bad, weights_only=True)["module"]
    sd.pop("language_model.encoder.final_layernorm.bias")
    torch.save({"module": sd}, bad)
    with pytest.raises(CheckpointError, match=r"(?s)mp_rank_01_model_states\.pt: .*missing keys \(1\): "
                                              r"language_model.encoder.final_layernorm.bias"):
        read_tp_shard(describe_source(d), shard_dims(model), 1, 2)


# ------------------------------------------------------------------------------ in a real process group
def _dcp_worker(rank, world, model_dir, step_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from gpt3zh.parallel import (
        ParallelDims,
        build_mesh,
        load_tp_inference,
        parallelize,
        tensor_parallel_model,
    )

    # the trainer's layout and save calls: dp=2 x tp=2, vocab-parallel, FSDP2 over dp
    trained = parallelize(load_model(model_dir), build_mesh(ParallelDims(dp=2, tp=2), "cpu"), vocab_parallel=True)
    optimizer = torch.optim.AdamW(trained.parameters())
    model_sd, optim_sd = get_state_dict(trained, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=f"{step_dir}/dcp")
    if rank == 0:
        meta = {"step": 2, "config": {"model": {"path": model_dir, "preset": None, "overrides": {}}, "tokenizer": None},
                "parallel": {"dp": 2, "tp": 2}}
        with open(f"{step_dir}/meta.json", "w") as f:
            json.dump(meta, f)
    torch.distributed.barrier()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    for src in (step_dir, model_dir):  # DCP saved at 2 x 2, and the 4-shard Megatron directory, served at tp 4
        got, read = load_tp_inference(describe_source(src), mesh)
        want = tensor_parallel_model(load_model(model_dir), mesh)
        for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters(), strict=True):
            assert a.shape == b.shape and torch.equal(a, b), (src, name)
        assert [type(m) for m in got.modules()] == [type(m) for m in want.modules()]
    assert read == (f"read mp_rank_{rank:02d}_model_states.pt of 4 Megatron shards "
                    "(and the vocab embedding's rows from 3 more)")


@pytest.mark.slow
@pytest.mark.distributed
def test_dcp_and_megatron_load_straight_into_the_tp4_serving_layout(model, tmp_path):
    d = save_model(model, tmp_path / "m", format="megatron", tp=4)
    (tmp_path / "step-00000002").mkdir()
    spawn(_dcp_worker, 4, str(d), str(tmp_path / "step-00000002"), timeout=150)
    # and whole, in one process without a process group (`gpt3zh serve --model STEP_DIR`)
    whole = read_whole(describe_source(tmp_path / "step-00000002"))
    for name, t in model.state_dict().items():
        assert torch.equal(whole.state_dict()[name], t), name
