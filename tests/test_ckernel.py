"""gpt3zh's C kernel (gpt3zh.ckernel, kernels/cpu.c): equal to F.linear on every shape it
takes, built once and cached, and every way it can be missing gives a reason and torch's kernels."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt3zh import ckernel

HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None


@pytest.fixture
def kernel():
    k = ckernel.load()
    if k is None:
        pytest.skip(f"the C kernel does not build here: {ckernel.unavailable()}")
    return k


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A load() that builds again, into an empty cache under tmp_path; the process's own kernel is
    restored afterwards."""
    monkeypatch.setenv("GPT3ZH_CACHE_DIR", str(tmp_path))
    ckernel._load.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    ckernel._load.cache_clear()


@pytest.mark.skipif(not (HAVE_CC and sys.platform.startswith("linux")), reason="needs Linux and a C compiler")
def test_the_kernel_builds_where_there_is_a_compiler():
    assert ckernel.load() is not None, ckernel.unavailable()
    assert ckernel.unavailable() == ""
    assert len(ckernel._omp_runtimes()) == 1  # torch's own OpenMP runtime, shared


@pytest.mark.parametrize("m, n", [(2304, 768), (768, 3072), (131, 77), (63, 40), (5, 16), (64, 31), (1, 1)])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_equals_f_linear(kernel, m, n, rows):
    g = torch.Generator().manual_seed(m * 7 + n + rows)
    w, b = torch.randn(m, n, generator=g), torch.randn(m, generator=g)
    x = torch.randn(rows, n + 9, generator=g)[:, 4:4 + n]  # rows strided n + 9 apart
    for threads in (1, 2, 3):
        for bias in (b, None):
            got, want = kernel.linear(x, w, bias, threads), F.linear(x, w, bias)
            assert got.shape == (rows, m) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * n ** 0.5)
    # the default thread count is torch's; a weight updated in place is read as it is now
    torch.testing.assert_close(kernel.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5 * n ** 0.5)
    w.mul_(-2)
    torch.testing.assert_close(kernel.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5 * n ** 0.5)


@pytest.mark.parametrize("m, n", [(3072, 768), (768, 3072), (131, 77), (63, 40), (1, 1)])
@pytest.mark.parametrize("rows", [1, 3])
def test_bfloat16_equals_float32_math_rounded_once(kernel, m, n, rows):
    g = torch.Generator().manual_seed(m + n + rows)
    w, b = torch.randn(m, n, generator=g).bfloat16(), torch.randn(m, generator=g).bfloat16()
    x = torch.randn(rows, n + 3, generator=g).bfloat16()[:, 1:1 + n]
    want = F.linear(x.float(), w.float(), b.float())  # the exact products of the bf16 values, summed in fp32
    for threads in (1, 2):
        got = kernel.linear(x, w, b, threads)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, m)
        # one rounding to bf16 (half an ulp: 2^-9 relative) plus fp32 summation-order differences
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-5 * n ** 0.5)
    assert torch.equal(kernel.linear(x, w), kernel.linear(x.contiguous(), w))
    nan = w.clone()
    nan[0, 0] = float("nan")
    assert kernel.linear(x, nan)[:, 0].isnan().all()  # NaN stays NaN through the rounding


def test_bad_inputs_are_refused_before_the_kernel_reads_them(kernel):
    w, x = torch.randn(8, 16), torch.randn(1, 16)
    bad = {
        "too many rows": (torch.randn(ckernel.MAX_ROWS + 1, 16), w, None),
        "float64 input": (x.double(), w, None),
        "bfloat16 weight, float32 input": (x, w.bfloat16(), None),
        "float16": (x.half(), w.half(), None),
        "bfloat16 bias, float32 weight": (x, w, torch.randn(8).bfloat16()),
        "a transposed weight": (x, torch.randn(16, 8).t(), None),
        "in features differ": (torch.randn(1, 15), w, None),
        "bias of the wrong length": (x, w, torch.randn(7)),
        "columns not contiguous": (torch.randn(1, 32)[:, ::2], w, None),
    }
    for what, (xi, wi, bi) in bad.items():
        with pytest.raises(ValueError, match=r"ckernel.linear: CPU x \(1-3, \d+\)") as e:
            kernel.linear(xi, wi, bi)
        assert str(tuple(xi.shape)) in str(e.value), what
    with pytest.raises(ValueError, match="5 rows; the kernel takes 1-3"):  # the C side checks too
        kernel.run(torch.randn(5, 16), w)


def test_copies_share_the_kernel_and_a_pickle_reloads_it(kernel):
    import copy
    import pickle

    assert copy.deepcopy(kernel) is kernel and copy.copy(kernel) is kernel
    assert pickle.loads(pickle.dumps(kernel)) is kernel


@pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler")
def test_built_once_then_loaded_from_the_cache(fresh):
    code = ("import sys, torch; from gpt3zh import ckernel; k = ckernel.load(); "
            "print(k.path if k else 'NONE ' + ckernel.unavailable())")
    env = {**os.environ, "GPT3ZH_CACHE_DIR": str(fresh)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    path = first.stdout.strip()
    assert path.startswith(str(fresh / "kernels")) and path.endswith(".so"), first.stdout + first.stderr
    stamp = os.stat(path).st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert second.stdout.strip() == path and os.stat(path).st_mtime_ns == stamp  # not built again
    assert [p.name for p in (fresh / "kernels").iterdir()] == [os.path.basename(path)]  # no build leftovers
    # a damaged cache entry (a truncated library) is built again, not used and not fatal
    with open(path, "r+b") as f:
        f.truncate(100)
    third = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert third.stdout.strip() == path and os.path.getsize(path) > 100


@pytest.mark.parametrize("setting, reason", [
    ({"GPT3ZH_CKERNEL": "0"}, "turned off by GPT3ZH_CKERNEL=0"),
    ({"CC": "/nonexistent/cc"}, "no C compiler: '/nonexistent/cc' is not on PATH (set CC)"),
    ({"CC": "false"}, "cpu.c -o "),  # a "compiler" that fails: the command and its exit status
])
def test_unavailable_says_why(fresh, monkeypatch, setting, reason):
    for k, v in setting.items():
        monkeypatch.setenv(k, v)
    assert ckernel.load() is None
    assert reason in ckernel.unavailable()
    if setting.get("CC") == "false":
        assert ckernel.unavailable().endswith("failed (exit 1): ")
    assert not list(fresh.glob("kernels/*"))  # nothing built, nothing left


@pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler")
def test_a_failed_build_leaves_nothing_behind(fresh, monkeypatch, tmp_path):
    cc = tmp_path / "badcc"
    cc.write_text("#!/bin/sh\nfor a; do case $a in --version) echo badcc 1.0; exit 0;; esac; done\n"
                  "echo 'badcc: error: out of cheese' >&2; exit 3\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    assert ckernel.load() is None
    assert "failed (exit 3): badcc: error: out of cheese" in ckernel.unavailable()
    assert list((fresh / "kernels").iterdir()) == []  # no partial library, no build directory


@pytest.mark.parametrize("rows, n_head, head_dim, slots",
                         [(1, 12, 64, 48), (3, 4, 8, 7), (2, 3, 20, 1), (1, 2, 16, 1500)])
def test_decode_attention_equals_the_cache_write_and_sdpa(kernel, rows, n_head, head_dim, slots):
    """One token per row at a slot, attending to the slots before it: the C call against
    KVCache.update + F.scaled_dot_product_attention on copies of the same cache."""
    from gpt3zh.model import KVCache

    g = torch.Generator().manual_seed(rows * 100 + slots)
    N, D, S = n_head, head_dim, slots + 5
    qkv = torch.randn(rows, N * 3 * D, generator=g)
    cache = KVCache(rows + 1, S, N, D, torch.float32, "cpu")  # one spare row: must stay untouched
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    k2, v2 = cache.k.clone(), cache.v.clone()
    for pos in (torch.tensor([slots - 1]), torch.arange(slots - rows, slots) if slots >= rows else None):
        if pos is None:
            continue
        kc, vc = cache.k.clone(), cache.v.clone()
        got = kernel.attention(qkv, kc, vc, pos, threads=2)
        ref_cache = KVCache(rows + 1, S, N, D, torch.float32, "cpu")
        ref_cache.k.copy_(k2)
        ref_cache.v.copy_(v2)
        q, k, v = qkv.view(rows, 1, N, 3, D).permute(3, 0, 2, 1, 4).unbind(0)
        want = []
        for r in range(rows):  # each row alone: its own slot, the slots before it
            p = pos[r if pos.numel() > 1 else 0]
            kr, vr = ref_cache.update(p.view(1), k[r:r + 1], v[r:r + 1], torch.tensor([r]), int(p) + 1)
            want.append(F.scaled_dot_product_attention(q[r:r + 1], kr, vr).reshape(N * D))
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kc, ref_cache.k, rtol=0, atol=0)  # the same slots written, nothing else
        torch.testing.assert_close(vc, ref_cache.v, rtol=0, atol=0)
    with pytest.raises(IndexError, match=rf"a slot in \[{S}\] is outside the cache's 0..{S - 1}"):
        kernel.attention(qkv, cache.k, cache.v, torch.tensor([S]))
    with pytest.raises(ValueError, match="ckernel.attention: float32 CPU qkv"):
        kernel.attention(qkv.double(), cache.k, cache.v, torch.tensor([0]))
    with pytest.raises(ValueError, match="ckernel.attention: float32 CPU qkv"):
        kernel.attention(qkv, cache.k, cache.v, torch.tensor([0], dtype=torch.int32))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_in_the_kernel_equals_f_gelu(kernel, approximate):
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(3072, 768, generator=g) * 0.05, torch.randn(3072, generator=g)
    for rows in (1, 2, 3):
        x = torch.randn(rows, 768, generator=g)
        for threads in (1, 2):
            got = kernel.linear(x, w, b, threads, gelu=approximate)
            pre = kernel.linear(x, w, b, threads)
            want = F.gelu(pre, approximate=approximate)
            # torch's own float32 GELU is within ~1.2e-6 of the exact value; the kernel's within 5e-7
            torch.testing.assert_close(got, want, rtol=0, atol=2.5e-6)
            exact = F.gelu(pre.double(), approximate=approximate)
            assert (got.double() - exact).abs().max() <= 6e-7
    # the whole range: saturation, tiny values, an odd length (the vector tail)
    z = torch.cat([torch.linspace(-30, 30, 30), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4, 88.0])])
    got = kernel.linear(z[None], torch.eye(37), None, 1, gelu=approximate)[0]
    torch.testing.assert_close(got, F.gelu(z, approximate=approximate), rtol=1e-6, atol=2.5e-6)
    for v in (float("nan"), float("inf"), -float("inf")):  # one at a time (0 * inf is NaN in a matmul)
        got = kernel.linear(torch.tensor([[v]]), torch.ones(1, 1), None, 1, gelu=approximate)
        torch.testing.assert_close(got, F.gelu(torch.tensor([[v]]), approximate=approximate), equal_nan=True)
    with pytest.raises(ValueError, match="gelu must be one of"):
        kernel.linear(z[None], torch.eye(37), None, 1, gelu="erf")
    xb = torch.randn(1, 768, generator=g).bfloat16()  # bfloat16: F.gelu after the kernel
    got = kernel.linear(xb, w.bfloat16(), b.bfloat16(), gelu=approximate)
    assert torch.equal(got, F.gelu(kernel.linear(xb, w.bfloat16(), b.bfloat16()), approximate=approximate))
