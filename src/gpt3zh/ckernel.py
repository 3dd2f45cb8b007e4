"""gpt3zh's CPU kernels (kernels/cpu.c), compiled on first use.

For one to MAX_ROWS input rows, `linear(x, weight, bias)` streams the weight once at close to the
machine's read bandwidth (see the C file), in float32 or bfloat16, optionally with GELU applied;
`attention` is a decode step's attention with its KV-cache write in one call (float32). It is
built with the machine's C compiler (`$CC`, else `cc`) as `-O3 -march=native -fopenmp`, linked
against the OpenMP runtime torch has loaded (one thread pool for both), checked against F.linear
once, and cached under
`$GPT3ZH_CACHE_DIR/kernels` (default `$XDG_CACHE_HOME/gpt3zh`, `~/.cache/gpt3zh`), keyed by the
source, compiler, flags, runtime and CPU. Where any of that is missing (no compiler, no OpenMP
runtime in torch, not Linux, a failed build or check) `load()` returns None and `unavailable()`
says why; callers then keep torch's own kernels. `GPT3ZH_CKERNEL=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_ROWS = 3  # above this many rows oneDNN's packed inner product is as fast (base preset, 4 rows)
ABI = 4
GELU = {None: 0, "none": 1, "tanh": 2}  # F.gelu's `approximate` -> the kernel's activation code
DTYPES = (torch.float32, torch.bfloat16)
FLAGS = ("-O3", "-march=native", "-fPIC", "-fopenmp")
_OMP = re.compile(r"/lib(gomp|iomp5|omp)[-.][^/]*\.so[^/]*$|/lib(gomp|iomp5|omp)\.so[^/]*$")

_reason = ""


class Kernel:
    """The loaded library: `linear` / `run` (few-row linear layers) and `attention` call it."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        if lib.gpt3zh_kernel_abi() != ABI:
            raise OSError(f"{path}: built for another kernel ABI")
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fns = {}
        for dtype, name, extra in ((torch.float32, "gpt3zh_linear_f32", [ctypes.c_int]),
                                   (torch.bfloat16, "gpt3zh_linear_bf16", [])):
            fn = getattr(lib, name)
            fn.argtypes = [p, p, i64, p, p, i64, i64, i64, ctypes.c_int, *extra]
            fn.restype = ctypes.c_int
            self._fns[dtype] = fn
        att = lib.gpt3zh_decode_attention_f32
        att.argtypes = [p, p, p, p, i64, i64, i64, i64, p, i64, ctypes.c_float, ctypes.c_int]
        att.restype = ctypes.c_int
        self._attention = att
        self.path, self._lib = path, lib

    # one loaded library per process: copies of a module holding it share it, a pickle reloads it
    def __deepcopy__(self, memo: dict) -> Kernel:
        return self

    def __copy__(self) -> Kernel:
        return self

    def __reduce__(self):
        return _reload, ()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               threads: int | None = None, gelu: str | None = None) -> torch.Tensor:
        """x (rows, in) @ weight (out, in).T + bias, rows <= MAX_ROWS; CPU tensors of one dtype
        (float32 or bfloat16), weight and bias contiguous, x's rows contiguous (checked: the kernel
        reads raw pointers). gelu "none" / "tanh": F.gelu(result, approximate=gelu), in the kernel
        for float32 (torch's erf formula), after it for bfloat16."""
        rows, n = x.shape[0], x.shape[-1]
        m = weight.shape[0]
        if not (x.dim() == 2 and 0 < rows <= MAX_ROWS and x.dtype == weight.dtype and x.dtype in DTYPES
                and x.stride(1) == 1 and weight.is_contiguous() and weight.shape[1] == n
                and x.device.type == "cpu" and weight.device.type == "cpu"
                and (bias is None or (bias.is_contiguous() and bias.shape == (m,) and bias.dtype == x.dtype))):
            raise ValueError(f"ckernel.linear: CPU x (1-{MAX_ROWS}, {n}) with contiguous rows, a contiguous "
                             f"weight (out, {n}) and bias (out,), all float32 or all bfloat16, expected; got x "
                             f"{tuple(x.shape)} {x.dtype} strides {x.stride()}, weight {tuple(weight.shape)} "
                             f"{weight.dtype}, bias {None if bias is None else (tuple(bias.shape), bias.dtype)}")
        if gelu not in GELU:
            raise ValueError(f"ckernel.linear: gelu must be one of {list(GELU)}, got {gelu!r}")
        return self.run(x, weight, bias, threads, gelu)

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            threads: int | None = None, gelu: str | None = None) -> torch.Tensor:
        """`linear` for callers that hold a contiguous float32 or bfloat16 weight and bias (checked
        once, by them): only x's layout and dtype are made to match here."""
        dtype = weight.dtype
        if x.stride(-1) != 1 or x.dtype != dtype:
            x = x.contiguous().to(dtype)
        rows, m = x.shape[0], weight.shape[0]
        y = torch.empty(rows, m, dtype=dtype)
        fused = dtype == torch.float32
        act = [GELU[gelu]] if fused else []
        err = self._fns[dtype](weight.data_ptr(), x.data_ptr(), x.stride(0), None if bias is None else bias.data_ptr(),
                               y.data_ptr(), m, weight.shape[1], rows,
                               torch.get_num_threads() if threads is None else threads, *act)
        if err:
            raise (ValueError(f"ckernel: {rows} rows; the kernel takes 1-{MAX_ROWS}") if err == -1 else
                   MemoryError(f"ckernel: no memory for {rows} x {weight.shape[1]} floats"))
        return y if fused or gelu is None else F.gelu(y, approximate=gelu)


    def attention(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                  threads: int | None = None) -> torch.Tensor:
        """One decode step's causal attention, float32: rows r = 0..B-1 of qkv (B, N * 3 * D), laid
        out [N][3][D] (the model's qkv layer), write their key and value at slot pos[r] of the
        caches (>= B, N, S, D) and attend to slots 0..pos[r]; pos is (B,) or (1,) (every row at one
        slot), int64. Returns (B, N * D), laid out [N][D]: F.scaled_dot_product_attention's result
        up to float rounding (1/sqrt(D) scale, no dropout)."""
        B = qkv.shape[0]
        cap, N, S, D = k_cache.shape
        if not (qkv.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and qkv.is_contiguous()
                and qkv.shape == (B, N * 3 * D) and k_cache.is_contiguous() and v_cache.is_contiguous()
                and v_cache.shape == k_cache.shape and B <= cap and pos.dtype == torch.int64
                and pos.is_contiguous() and pos.shape in ((B,), (1,))
                and all(t.device.type == "cpu" for t in (qkv, k_cache, v_cache, pos))):
            raise ValueError(f"ckernel.attention: float32 CPU qkv (B, {N * 3 * D}) and contiguous caches "
                             f"(>= B, N, S, D) with int64 pos (B,) or (1,) expected; got qkv {tuple(qkv.shape)} "
                             f"{qkv.dtype}, caches {tuple(k_cache.shape)} {k_cache.dtype} / {tuple(v_cache.shape)}, "
                             f"pos {tuple(pos.shape)} {pos.dtype}")
        y = torch.empty(B, N * D, dtype=torch.float32)
        if self._attention(qkv.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), y.data_ptr(), B, N, S, D,
                           pos.data_ptr(), 1 if pos.shape[0] == B and B > 1 else 0, D ** -0.5,
                           torch.get_num_threads() if threads is None else threads):
            raise IndexError(f"ckernel.attention: a slot in {pos.tolist()} is outside the cache's 0..{S - 1}")
        return y


def load() -> Kernel | None:
    """The kernel, built or taken from the cache on first call; None when it cannot be had here."""
    return _load()


def _reload() -> Kernel:
    kernel = load()
    if kernel is None:
        raise RuntimeError(f"gpt3zh's C kernel is unavailable in this process: {unavailable()}")
    return kernel


def unavailable() -> str:
    """Why load() gives None ('' when the kernel is loaded or not yet tried)."""
    return _reason


@functools.cache
def _load() -> Kernel | None:
    global _reason
    with _LOCK:  # (threads asking at once: one build)
        try:
            _reason = ""
            return _build_and_load()
        except _Unavailable as e:
            _reason = str(e)
            return None


_LOCK = threading.Lock()


class _Unavailable(Exception):
    pass


def _omp_runtimes() -> list[str]:
    """The OpenMP runtime libraries mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[-1].strip() for line in f if ".so" in line}
    except OSError:
        return []
    return sorted({os.path.realpath(p) for p in paths if _OMP.search(p)})


def _build_and_load() -> Kernel:
    if os.environ.get("GPT3ZH_CKERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        raise _Unavailable("turned off by GPT3ZH_CKERNEL=0")
    if not sys.platform.startswith("linux"):
        raise _Unavailable(f"built on Linux only (this is {sys.platform})")
    torch.get_num_threads()  # torch's OpenMP runtime is loaded with libtorch_cpu
    runtimes = _omp_runtimes()
    if len(runtimes) != 1:
        raise _Unavailable("torch's OpenMP runtime not found in this process" if not runtimes else
                           f"{len(runtimes)} OpenMP runtimes loaded ({', '.join(runtimes)}); a third would compete")
    runtime = runtimes[0]
    cc = os.environ.get("CC") or "cc"
    compiler = shutil.which(cc)
    if compiler is None:
        raise _Unavailable(f"no C compiler: {cc!r} is not on PATH (set CC)")
    source = resources.files("gpt3zh").joinpath("kernels/cpu.c").read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise _Unavailable(f"{compiler} --version failed: {e}") from None
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(), runtime.encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:20]
    cache = _cache_dir()
    target = cache / f"cpu-{key}.so"
    kernel = None
    if target.exists():
        try:
            kernel = Kernel(target)
        except OSError:  # a damaged cache entry (truncated, another ABI): built again below
            pass
    if kernel is None:
        _compile(compiler, source, runtime, target)
        try:
            kernel = Kernel(target)
        except OSError as e:
            raise _Unavailable(f"cannot load {target}: {e}") from None
    if len(_omp_runtimes()) != 1:
        raise _Unavailable(f"{target} brought a second OpenMP runtime ({', '.join(_omp_runtimes())})")
    _self_check(kernel)
    return kernel


def _compile(compiler: str, source: bytes, runtime: str, target: Path) -> None:
    """Build into a temporary directory next to `target`, then rename: a concurrent or failed
    build never leaves a partial library under the final name."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src, obj, lib = Path(tmp, "cpu.c"), Path(tmp, "cpu.o"), Path(tmp, "lib.so")
        src.write_bytes(source)
        steps = ([compiler, *FLAGS, "-c", str(src), "-o", str(obj)],
                 [compiler, "-shared", str(obj), runtime, f"-Wl,-rpath,{Path(runtime).parent}", "-lm", "-o", str(lib)])
        for cmd in steps:
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                raise _Unavailable(f"{' '.join(cmd)}: {e}") from None
            if done.returncode:
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                raise _Unavailable(f"{' '.join(cmd)} failed (exit {done.returncode}): {' | '.join(tail)}")
        os.replace(lib, target)


def _cache_dir() -> Path:
    root = os.environ.get("GPT3ZH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gpt3zh")
    d = Path(root, "kernels")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=d, prefix=".probe-")
        probe.close()
    except OSError:
        d = Path(tempfile.mkdtemp(prefix="gpt3zh-kernels-"))
    return d


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _self_check(kernel: Kernel) -> None:
    """The built kernels against F.linear on odd shapes (tails, bias, every row count, 1 and 2
    threads; bfloat16 against float32 math on the same bf16 values, rounded once)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(131, 77, generator=g)
    b = torch.randn(131, generator=g)
    for rows in range(1, MAX_ROWS + 1):
        x = torch.randn(rows, 90, generator=g)[:, 5:82]  # row stride 90, not 77
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
            want = F.linear(xd.float(), wd.float(), bd.float()).to(dtype).float()
            for threads in (1, 2):
                got = kernel.linear(xd, wd, bd, threads).float()
                if not torch.allclose(got, want, rtol=tol, atol=tol):
                    raise _Unavailable(f"{kernel.path} failed its check against F.linear ({dtype}, rows {rows}, "
                                       f"max error {(got - want).abs().max().item():.3g})")
