"""Start real gloo process groups on CPU for the distributed tests.

`spawn(fn, world_size, *args)` runs `fn(rank, world_size, *args)` in `world_size` fresh processes
that share a file-based rendezvous, and fails the test (instead of hanging) after `timeout` seconds.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def _entry(rank: int, fn, world_size: int, init_file: str, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)  # 2 cores shared by every rank: avoid oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, timeout: float = 120) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _entry, args=(fn, world_size, os.path.join(tmp, "rdzv"), args), nprocs=world_size, join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    raise TimeoutError(f"{fn.__name__} with {world_size} ranks did not finish in {timeout}s")
        except mp.ProcessRaisedException as err:  # keep the rank's own traceback, drop the launcher's
            raise AssertionError(str(err)) from None


def torchrun_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a `torchrun` subprocess: the repo's src on the path, one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env.update(extra or {})
    return env
