"""Crash safety and bad input, through real `gpt3zh` processes.

- A tiny real training run is SIGKILLed at named moments (before, during and after a checkpoint
  save, while pruning, while exporting, while replacing an export; `gpt3zh.failpoints`), resumed
  with train.resume=true after each kill, and must end with the weights of an uninterrupted run,
  bit for bit, and no half-written file left behind.
- A table of bad inputs for train / eval / info / convert / export: each exits 2 with one line
  naming the path or field, no traceback, and leaves existing checkpoints and outputs as they were.
  A full disk is a file size limit (RLIMIT_FSIZE gives EFBIG, handled as ENOSPC) and, where this
  process may mount one, a small tmpfs (a real ENOSPC).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from gpt3zh.cli import main
from gpt3zh.training import train
from test_train_e2e import POEMS, char_config

SRC = ROOT / "src"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child processes (OMP_NUM_THREADS=1): the same float sums
    yield
    torch.set_num_threads(n)


@pytest.fixture
def setup(tmp_path):
    from gpt3zh.tokenizer import train_char_tokenizer

    train_char_tokenizer(POEMS + ["问答：？"], tmp_path / "tok")
    rows = [{"src_txt": POEMS[i % 5][: 6 + (7 * i) % 19]} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"src_txt": p}, ensure_ascii=False) + "\n" for p in POEMS))
    return tmp_path


def write_config(root: Path, name: str = "c.json", **train_section) -> Path:
    path = root / name
    path.write_text(json.dumps(char_config(root, **train_section), ensure_ascii=False))
    return path


def gpt3zh(*args: str, failpoint: str | None = None, fsize: int | None = None, timeout: float = 120):
    """The real command line in a fresh process (optionally armed to SIGKILL itself, or with a
    file size limit standing in for a full disk)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("GPT3ZH_FAILPOINT", None)
    if failpoint:
        env["GPT3ZH_FAILPOINT"] = failpoint

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "gpt3zh", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit if fsize else None, check=False)


def tree(d: Path) -> dict[str, str]:
    """sha256 of every file under d, by relative path."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work)) for p in work.rglob(".*") if ".tmp" in p.name or ".trash" in p.name
                  or ".old-" in p.name)


# ------------------------------------------------------------------------------------ crash safety
@pytest.mark.slow
def test_killed_at_any_moment_then_resumed_ends_bitwise_equal(setup):
    root = setup
    sections = {"max_steps": 6, "save_interval": 2, "keep_last": 2, "eval_interval": 3}
    train(char_config(root, work_dir=str(root / "ref"), **sections))  # uninterrupted, in this process
    config = str(write_config(root, work_dir=str(root / "run"), **sections))
    work, ckpt = root / "run", root / "run" / "checkpoints"

    def killed(failpoint, *overrides):
        done = gpt3zh("train", config, *overrides, failpoint=failpoint)
        assert done.returncode == -signal.SIGKILL, done.stderr
        return done

    killed("checkpoint.write@1")  # during the first save: nothing to resume yet
    assert not list(ckpt.glob("step-*")) and (ckpt / ".tmp-step-00000002").is_dir()
    done = killed("train.step@3", "train.resume=true")
    assert "no checkpoint in" in done.stderr and "starting at step 0" in done.stderr
    assert ".tmp-step-00000002" in done.stderr  # reported as cleaned up
    killed("checkpoint.write@1", "train.resume=true")  # during the save of step 4
    assert [p.name for p in ckpt.glob("step-*")] == ["step-00000002"] and (ckpt / ".tmp-step-00000004").is_dir()
    killed("checkpoint.prune@1", "train.resume=true")  # step 6 saved, step 2 being deleted
    assert (ckpt / ".trash-step-00000002").is_dir()
    killed("output.write@1", "train.resume=true")  # the export written, not yet renamed
    assert not (work / "output").exists() and list(work.glob(".output.tmp-*"))
    done = gpt3zh("train", config, "train.resume=true")
    assert done.returncode == 0, done.stderr
    assert (work / "output").is_dir() and leftovers(work) == []
    killed("output.replace@1", "train.resume=true")  # the old export moved aside, the new one not in place
    assert not (work / "output").exists() and list(work.glob(".output.old-*"))
    done = gpt3zh("train", config, "train.resume=true")
    assert done.returncode == 0, done.stderr

    assert leftovers(work) == []
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000004", "step-00000006"]
    assert tree(work / "output") == tree(root / "ref" / "output")  # the exported weights, bit for bit
    a = torch.load(ckpt / "step-00000006" / "state.pt", weights_only=True)
    b = torch.load(root / "ref" / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
    steps = [json.loads(line)["step"] for line in (work / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once, after all the rewinds


# --------------------------------------------------------------------------------------- bad input
@pytest.fixture
def trained(setup):
    """A finished run (checkpoints + output) whose files every bad input must leave alone."""
    root = setup
    train(char_config(root, max_steps=4, save_interval=2))
    return root


def one_error_line(err: str, command: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"gpt3zh {command}: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def bad_inputs(root: Path) -> list[tuple[str, list[str], list[str]]]:
    """(command, argv, fragments the one error line must hold) for the in-process table."""
    (root / "latin1.jsonl").write_bytes(b'{"src_txt": "caf\xe9"}\n')
    (root / "empty.jsonl").write_text('{"src_txt": ""}\n')
    (root / "notadir").write_text("a file")
    cfg = str(root / "bad.json")
    (root / "bad.json").write_text(json.dumps(char_config(root, max_steps=2, work_dir=str(root / "fresh"))))
    used = str(root / "used.json")
    (root / "used.json").write_text(json.dumps(char_config(root, max_steps=2)))  # the trained run's work_dir
    run, out, step = root / "run", str(root / "run" / "output"), str(root / "run" / "checkpoints" / "step-00000004")
    return [
        ("train", [used], [f"train.work_dir {run} already holds a run", "train.overwrite=true"]),
        ("train", [used, "train.resume=true", "train.max_steps=2"], ["step-00000004 is at step 4, past", "max_steps"]),
        ("train", [used, "train.resume=true", "model.n_layer=3"],
         ["state.pt was saved for another model architecture"]),
        ("train", [cfg, "train.optimizer.lr=.inf"], ["train.optimizer.lr: expected a finite number"]),
        ("train", [cfg, "model.overrides.n_heads=2"], ["did you mean 'model.overrides.n_head'"]),
        ("train", [cfg, f"dataset.train={root / 'latin1.jsonl'}"],
         ["latin1.jsonl: not UTF-8 text: byte 0xe9 at byte offset 16"]),
        ("train", [cfg, f"dataset.eval={root / 'empty.jsonl'}"], ["empty.jsonl: no token to score"]),
        ("train", [cfg, f"train.work_dir={root / 'notadir' / 'run'}"],
         [f"train.work_dir {root / 'notadir' / 'run'}: cannot be written", "Not a directory"]),
        ("train", [cfg, f"train.work_dir={root / 'notadir'}"], ["exists and is not a directory"]),
        ("train", [cfg, "train.resume=/nope"], ["/nope is not a checkpoint"]),
        ("eval", ["--model", out, "--data", str(root / "empty.jsonl")], ["empty.jsonl: no token to score"]),
        ("eval", ["--model", out, "--data", str(root / "latin1.jsonl")], ["latin1.jsonl: not UTF-8 text"]),
        ("eval", ["--model", str(root / "nope"), "--data", str(root / "eval.jsonl")],
         ["nope: no such model directory"]),
        ("eval", ["--model", out, "--data", str(root / "eval.jsonl"), "--metric", "rouge"],
         ["eval.jsonl row 1 has no tgt_txt"]),
        ("info", [str(root / "nope")], ["nope: no such model directory"]),
        ("info", [str(root / "tok")], ["config.json: file not found"]),
        ("convert", [out, str(root / "notadir"), "--to", "hf"], ["notadir: exists and is not a directory"]),
        ("convert", [out, str(root / "notadir" / "x"), "--to", "hf"], ["notadir/x: cannot be created: ", "is a file"]),
        ("convert", [step, str(root / "x"), "--to", "megatron", "--tp", "3"], ["tensor parallelism 3 does not divide"]),
        ("export", [str(root / "run" / "checkpoints"), str(root / "x")], ["checkpoints/config.json: file not found"]),
        ("export", [step, str(root / "tok")], ["refusing to overwrite a non-empty directory"]),
    ]


def test_bad_inputs_exit_2_with_one_line_and_damage_nothing(trained, capsys):
    root = trained
    before = tree(root / "run" / "checkpoints") | {f"output/{k}": v for k, v in tree(root / "run" / "output").items()}
    tok_before = tree(root / "tok")
    for command, argv, fragments in bad_inputs(root):
        assert main([command, *argv]) == 2, (command, argv)
        captured = capsys.readouterr()
        one_error_line(captured.err, command, *fragments)
    after = tree(root / "run" / "checkpoints") | {f"output/{k}": v for k, v in tree(root / "run" / "output").items()}
    assert after == before and tree(root / "tok") == tok_before
    assert not (root / "fresh" / "checkpoints").exists() and not (root / "x").exists()


def test_info_on_mismatched_weights_exits_2_in_a_real_process(trained):
    from safetensors.torch import load_file, save_file

    d = root_copy = trained / "cut"
    assert main(["export", str(trained / "run" / "checkpoints" / "step-00000004"), str(d)]) == 0
    sd = load_file(d / "model.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("blocks.1.")}, d / "model.safetensors")
    done = gpt3zh("info", str(root_copy))
    assert done.returncode == 2 and "MISMATCH" in done.stdout
    one_error_line(done.stderr, "info", f"{d}: the weights do not match its config", "missing keys (12)")


def _checked_run_dir(root: Path) -> dict[str, str]:
    return tree(root / "run" / "checkpoints") | {f"output/{k}": v for k, v in tree(root / "run" / "output").items()}


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_the_previous_checkpoints(trained):
    root = trained
    before = _checked_run_dir(root)
    # 100 kB: the log, the cache and the tokenizer fit, a checkpoint's state.pt (~370 kB) does not
    done = gpt3zh("train", str(write_config(root, max_steps=6, save_interval=2)), "train.resume=true", fsize=100_000)
    assert done.returncode == 2
    one_error_line(done.stderr, "train",
                   f"{root / 'run' / 'checkpoints' / 'step-00000006'}: cannot write: no space left")
    assert _checked_run_dir(root) == before and leftovers(root / "run") == []
    step = str(root / "run" / "checkpoints" / "step-00000004")
    for command, argv in [("export", [step, str(root / "exp")]),
                          ("convert", [step, str(root / "ms"), "--to", "modelscope"])]:
        done = gpt3zh(command, *argv, fsize=50_000)
        assert done.returncode == 2, done.stderr
        one_error_line(done.stderr, command, f"{argv[1]}: cannot write: no space left")
        assert not Path(argv[1]).exists() and not list(root.glob(f".{Path(argv[1]).name}.tmp-*"))


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, check=False).returncode == 0


def test_enospc_on_a_small_tmpfs(setup):
    root = setup
    disk = root / "disk"
    if not _mount_tmpfs(disk, "size=600k"):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the RLIMIT_FSIZE test covers EFBIG")
    try:
        # 600 kB: the first checkpoint (~0.4 MB with its tokenizer) fits, the second does not
        done = gpt3zh("train", str(write_config(root, max_steps=4, save_interval=2, work_dir=str(disk / "run"))))
        assert done.returncode == 2
        one_error_line(done.stderr, "train", "cannot write: no space left on device")
        assert sorted(p.name for p in (disk / "run" / "checkpoints").glob("step-*")) == ["step-00000002"]
        assert leftovers(disk / "run") == []
        assert main(["export", str(disk / "run" / "checkpoints" / "step-00000002"), str(root / "exp")]) == 0
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_read_only_work_dir_is_one_line(setup):
    root = setup
    ro = root / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
    elif not _mount_tmpfs(ro, "ro,size=64k"):  # root writes through chmod; a read-only mount stops it
        pytest.skip("running as root without the right to mount: a read-only directory cannot be made here")
    try:
        done = gpt3zh("train", str(write_config(root, max_steps=2, work_dir=str(ro / "run"))))
        assert done.returncode == 2
        one_error_line(done.stderr, "train", f"train.work_dir {ro / 'run'}: cannot be written")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
        else:
            ro.chmod(0o755)
