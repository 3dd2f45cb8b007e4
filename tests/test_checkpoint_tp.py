"""Named transforms (qkv layout, Conv1D) and tensor-parallel split / merge / reshard."""

import pytest
import torch
import torch.nn.functional as F

from gpt3zh.checkpoint import CheckpointError, merge_state_dicts, reshard, split_state_dict
from gpt3zh.checkpoint.tables import MEGATRON, expand, partition_dim, to_foreign
from gpt3zh.checkpoint.transforms import conv1d_transpose, qkv_blocked_to_per_head, qkv_per_head_to_blocked
from gpt3zh.model import GPT

N, D, H_IN = 4, 3, 5


def _labelled_qkv_per_head():
    """Rows labelled 100*which + 10*head + d, laid out [N, 3, D] (gpt3zh / Megatron)."""
    rows = [100 * which + 10 * head + d for head in range(N) for which in range(3) for d in range(D)]
    return torch.tensor(rows, dtype=torch.float32)


def test_qkv_per_head_to_blocked_matches_the_modelscope_split():
    bias = _labelled_qkv_per_head()
    blocked = qkv_per_head_to_blocked(bias, N)
    # ModelScope single / HF: q = [0:H), k = [H:2H), v = [2H:3H), each [N, D]
    expected = [100 * which + 10 * head + d for which in range(3) for head in range(N) for d in range(D)]
    assert blocked.tolist() == expected


def test_qkv_transform_moves_whole_weight_rows_and_inverts_exactly():
    w = torch.randn(3 * N * D, H_IN)
    labels = _labelled_qkv_per_head()
    blocked = qkv_per_head_to_blocked(w, N)
    blocked_labels = qkv_per_head_to_blocked(labels, N)
    for r in range(3 * N * D):  # each weight row travels with its bias label
        src = (labels == blocked_labels[r]).nonzero().item()
        assert torch.equal(blocked[r], w[src])
    assert torch.equal(qkv_blocked_to_per_head(blocked, N), w)


def test_conv1d_transpose_computes_the_same_linear_map():
    w, x = torch.randn(7, 5), torch.randn(2, 5)
    conv_w = conv1d_transpose(w, 1)  # HF Conv1D: y = x @ W, W is (in, out)
    assert conv_w.shape == (5, 7)
    torch.testing.assert_close(x @ conv_w, F.linear(x, w), rtol=0, atol=1e-6)
    assert torch.equal(conv1d_transpose(conv_w, 1), w)


def test_partition_dims_follow_megatron_for_both_namings():
    assert partition_dim("tok_emb.weight") == 0
    assert partition_dim("blocks.3.attn.qkv.bias") == 0
    assert partition_dim("blocks.3.attn.proj.weight") == 1
    assert partition_dim("blocks.3.attn.proj.bias") is None
    assert partition_dim("language_model.encoder.layers.11.mlp.dense_4h_to_h.weight") == 1
    assert partition_dim("language_model.encoder.layers.0.mlp.dense_h_to_4h.bias") == 0
    assert partition_dim("language_model.embedding.position_embeddings.weight") is None
    with pytest.raises(CheckpointError, match="not a gpt3zh or Megatron parameter name"):
        partition_dim("blocks.0.attn.c_attn.weight")


@pytest.fixture
def full_sd(tiny_config):
    return GPT(tiny_config).state_dict()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_gives_each_rank_whole_heads(tiny_config, full_sd, tp):
    shards = split_state_dict(full_sd, tp, n_head=tiny_config.n_head)
    assert len(shards) == tp
    heads_per_rank, D = tiny_config.n_head // tp, tiny_config.head_dim
    per_head = full_sd["blocks.0.attn.qkv.weight"].view(tiny_config.n_head, 3, D, -1)  # (N, 3, D, H)
    for r, shard in enumerate(shards):
        mine = per_head[r * heads_per_rank : (r + 1) * heads_per_rank].reshape(-1, tiny_config.d_model)
        assert torch.equal(shard["blocks.0.attn.qkv.weight"], mine)
        cols = tiny_config.d_model // tp  # row-parallel proj: this rank's input features
        assert torch.equal(shard["blocks.0.attn.proj.weight"],
                           full_sd["blocks.0.attn.proj.weight"][:, r * cols : (r + 1) * cols])
        assert shard["tok_emb.weight"].shape[0] == tiny_config.vocab_size // tp
        assert shard["blocks.1.ln_2.weight"] is full_sd["blocks.1.ln_2.weight"]


@pytest.mark.parametrize("k,n", [(1, 4), (4, 1), (2, 4), (4, 2), (2, 2)])
def test_reshard_k_to_n_equals_a_direct_split(tiny_config, full_sd, k, n):
    heads = tiny_config.n_head
    resharded = reshard(split_state_dict(full_sd, k, n_head=heads), n, n_head=heads)
    direct = split_state_dict(full_sd, n, n_head=heads)
    for a, b in zip(resharded, direct, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    merged = merge_state_dicts(resharded)
    assert all(torch.equal(merged[key], full_sd[key]) for key in full_sd)


def test_split_works_on_megatron_names(tiny_config, full_sd):
    mg = to_foreign(full_sd, MEGATRON, tiny_config)
    shards = split_state_dict(mg, 2, n_head=tiny_config.n_head)
    name = next(r.theirs for r in expand(MEGATRON, 2) if r.ours == "blocks.1.mlp.fc.weight")
    assert shards[1][name].shape == (tiny_config.ffn_dim // 2, tiny_config.d_model)
    assert all(torch.equal(merge_state_dicts(shards)[key], mg[key]) for key in mg)


def test_split_refuses_partial_heads(tiny_config, full_sd):
    with pytest.raises(CheckpointError, match="tp=8 does not divide n_head=4"):
        split_state_dict(full_sd, 8, n_head=tiny_config.n_head)


def test_split_refuses_an_indivisible_vocab(tiny_config):
    sd = GPT(tiny_config.replace(vocab_size=130)).state_dict()
    with pytest.raises(CheckpointError,
                       match="tok_emb.weight: size 130 along partition dim 0 is not divisible by tp=4"):
        split_state_dict(sd, 4, n_head=tiny_config.n_head)


def test_merge_refuses_replicated_tensors_that_differ(tiny_config, full_sd):
    shards = split_state_dict(full_sd, 2, n_head=tiny_config.n_head)
    shards[1] = dict(shards[1], **{"ln_f.bias": shards[1]["ln_f.bias"] + 1})
    with pytest.raises(CheckpointError, match="ln_f.bias is replicated across TP ranks but shard 1 differs"):
        merge_state_dicts(shards)


def test_merge_refuses_shards_with_different_keys(tiny_config, full_sd):
    shards = split_state_dict(full_sd, 2, n_head=tiny_config.n_head)
    del shards[1]["ln_f.bias"]
    with pytest.raises(CheckpointError, match="shard 1 and shard 0 hold different keys: ln_f.bias"):
        merge_state_dicts(shards)
