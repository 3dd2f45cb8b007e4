"""Files shipped inside the package: the embedded default model `poetry-small/`.

`default_model_path()` is the one place that knows where it lives; the pipeline, the CLI and the
server use it when no model is named.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "poetry-small"


def default_model_path() -> Path:
    """The embedded default model directory (a gpt3zh model with a char-level tokenizer).

    Raises FileNotFoundError, saying what to do, when the package was installed without it.
    """
    path = Path(__file__).resolve().parent / DEFAULT_MODEL_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is not installed: {path} has no config.json. "
            "Pass a model directory explicitly (model=PATH, or --model PATH on the command line)."
        )
    return path
