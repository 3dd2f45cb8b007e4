"""The `gpt3zh` command line: one subcommand per function, registered in COMMANDS.

Each subcommand is a pair (add_arguments(parser), run(args) -> exit code). Heavy imports happen
inside `run`, so `gpt3zh --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .config import PRESETS, ConfigError, GPTConfig


class CLIError(Exception):
    """A user mistake: printed as `gpt3zh: error: ...`, exit code 2."""


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def _count_params_on_meta(cfg: GPTConfig) -> int:
    import torch

    from .model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- info
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="a model directory (any supported format)")
    p.add_argument("--preset", choices=list(PRESETS), help="describe a preset instead of a directory")
    p.add_argument("--json", action="store_true", help="print JSON")


def _info_run(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.preset is None):
        raise CLIError("info: give either a model directory PATH or --preset NAME")
    if args.preset:
        cfg, fmt, extra = PRESETS[args.preset], "preset", {"preset": args.preset}
    else:
        from .checkpoint import describe

        desc = describe(args.path)
        cfg, fmt, extra = desc.config, desc.format, desc.extra
    params = _count_params_on_meta(cfg)
    assert params == cfg.num_params, (params, cfg.num_params)
    info = {
        "format": fmt,
        "params": params,
        "bf16_bytes": 2 * params,
        "config": cfg.to_dict(),
        **extra,
    }
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return 0
    print(f"format      {fmt}")
    for key, value in extra.items():
        print(f"{key:<11} {value}")
    print(f"params      {params:,}")
    print(f"bf16 size   {_human_bytes(2 * params)}")
    print(
        f"shape       {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, "
        f"ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}, {cfg.gelu} GELU"
    )
    return 0


Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]

COMMANDS: dict[str, Command] = {
    "info": (_info_args, _info_run, "parameter count, size and format of a preset or model directory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt3zh", description="Chinese GPT-3 toolkit")
    parser.add_argument("--version", action="version", version="gpt3zh 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][1](args)
    except (CLIError, ConfigError, FileNotFoundError, ValueError) as err:
        print(f"gpt3zh {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
