"""gpt3zh.hugepages: large CPU tensors on transparent huge pages, values and sharing unchanged, and
load_pretrained's CPU weights placed that way."""

import gc
import io

import pytest
import torch

from gpt3zh import hugepages
from gpt3zh.checkpoint.api import load_pretrained, save_model
from gpt3zh.config import GPTConfig
from gpt3zh.model import GPT

needs_thp = pytest.mark.skipif(not hugepages.enabled(), reason=f"transparent huge pages are {hugepages.mode()!r}")
MiB = 2**20


@needs_thp
def test_empty_is_aligned_exact_and_on_huge_pages():
    t = hugepages.empty((3 * MiB,), torch.float32)  # 12 MiB
    assert t.data_ptr() % hugepages.PAGE == 0 and t.is_contiguous()
    assert t.untyped_storage().nbytes() == 12 * MiB  # exactly its bytes: a save writes nothing more
    t.fill_(1.5)
    assert hugepages.huge_bytes(t) >= 10 * MiB  # (the kernel may leave a page small under pressure)
    buf = io.BytesIO()
    torch.save(t, buf)
    assert buf.tell() < 12 * MiB + 4096
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), t)
    assert hugepages.empty((0, 4), torch.float32).shape == (0, 4)


@needs_thp
def test_the_mapping_lives_as_long_as_the_tensor():
    def make():
        return hugepages.empty((MiB,), torch.float32).fill_(2.0)

    t = make()
    gc.collect()
    assert float(t.sum()) == 2.0 * MiB  # nothing freed under it
    view = t[10:20]
    del t
    gc.collect()
    assert torch.equal(view, torch.full((10,), 2.0))  # a view keeps it too


@needs_thp
def test_place_keeps_values_names_and_sharing():
    big, small = torch.randn(1024, 1024), torch.randn(8)
    base = torch.randn(2048, 512)
    views = {"a": base[:1024], "b": base[1024:]}  # two views into one storage: left as they are
    sd = {"w": big, "w_again": big, "s": small, **views, "i": torch.arange(MiB)}
    want = {k: v.clone() for k, v in sd.items()}
    out = hugepages.place(sd)
    assert out is sd  # in place, one tensor at a time
    for k in want:
        assert torch.equal(sd[k], want[k]) and sd[k].dtype == want[k].dtype
    assert sd["w"] is sd["w_again"] and sd["w"] is not big and sd["w"].data_ptr() % hugepages.PAGE == 0
    assert sd["i"] is not want["i"] and sd["i"].dtype == torch.int64
    assert sd["s"] is small  # under 2 MiB: as it was
    assert sd["a"] is views["a"] and sd["b"] is views["b"]
    assert hugepages.huge_bytes(sd["w"]) >= 2 * MiB


@needs_thp
def test_place_model_keeps_the_parameters_and_the_tied_head():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=4096, n_layer=1, n_head=4, d_model=256, max_seq_len=32)
    model = GPT(cfg).eval()
    params = dict(model.named_parameters())
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(idx)
    moved = hugepages.place_model(model)
    assert moved == 4096 * 256 * 4  # the 4 MiB embedding (tied with the head); the rest is smaller
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.tok_emb.weight.data_ptr() % hugepages.PAGE == 0
    assert model.head.weight is model.tok_emb.weight
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, rtol=0, atol=0)
    loss = model(idx)[0].sum()
    loss.backward()  # trains as before
    assert model.tok_emb.weight.grad is not None


@needs_thp
def test_load_pretrained_places_the_cpu_weights(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=4096, n_layer=1, n_head=4, d_model=256, max_seq_len=32)
    model = GPT(cfg).eval()
    save_model(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m").model
    emb = loaded.tok_emb.weight
    assert emb.data_ptr() % hugepages.PAGE == 0 and hugepages.huge_bytes(emb) >= 2 * MiB
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # a placed model saves (safetensors, torch.save) and shares (torch.multiprocessing) as any other
    save_model(loaded, tmp_path / "again")
    again = load_pretrained(tmp_path / "again").model
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))
    buf = io.BytesIO()
    torch.save(loaded.state_dict(), buf)
    assert buf.tell() < 1.1 * sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    emb.share_memory_()
    assert emb.is_shared() and torch.equal(emb, model.tok_emb.weight)


def test_nothing_changes_where_huge_pages_are_off(monkeypatch):
    monkeypatch.setattr(hugepages, "mode", lambda: "never")
    t = torch.randn(1024, 1024)
    sd = {"w": t}
    assert hugepages.place(sd)["w"] is t
    model = torch.nn.Linear(1024, 1024)
    ptr = model.weight.data_ptr()
    assert hugepages.place_model(model) == 0 and model.weight.data_ptr() == ptr
