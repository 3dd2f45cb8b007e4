"""`gpt3zh --help` and `gpt3zh COMMAND --help` answer without importing torch (about 2 s of start-up).

Each check runs in a fresh interpreter, since this test process has imported torch long ago.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpt3zh.cli import COMMANDS, build_parser

HEAVY = ("torch", "transformers", "tokenizers", "fastapi", "jieba", "numpy")
PROBE = f"""
import sys
from gpt3zh.cli import build_parser, main
if sys.argv[1:] == ["--build-only"]:
    build_parser()
else:
    try:
        main(sys.argv[1:])
    except SystemExit as exit:
        assert exit.code == 0, exit.code
print("HEAVY", *sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def _run(*argv: str) -> tuple[list[str], str]:
    """(heavy modules imported, stdout) of a fresh interpreter running the CLI with argv."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    *out, last = proc.stdout.splitlines()
    assert last.startswith("HEAVY")
    return last.split()[1:], "\n".join(out)


def test_building_the_parser_imports_nothing_heavy():
    assert _run("--build-only")[0] == []


def test_top_level_help_lists_every_command_without_heavy_imports():
    heavy, out = _run("--help")
    assert heavy == []
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_imports_nothing_heavy(command):
    heavy, out = _run(command, "--help")
    assert f"gpt3zh {command}" in out  # the command's own usage line: its flags were added
    assert heavy == []


def test_flags_are_added_when_a_command_is_chosen():
    parser = build_parser()
    args = parser.parse_args(["convert", "a", "b", "--to", "hf", "--dtype", "bfloat16"])
    assert (args.command, args.src, args.to, args.dtype) == ("convert", "a", "hf", "bfloat16")
    args = parser.parse_args(["generate", "床前", "--max-new-tokens", "5", "--no-do-sample"])
    assert (args.prompt, args.max_new_tokens, args.do_sample) == (["床前"], 5, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "a", "b", "--to", "onnx"])
