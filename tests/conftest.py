import os
from pathlib import Path

import pytest
import torch

from gpt3zh.config import GPTConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPT3ZH_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
FIXTURES = Path(__file__).resolve().parent / "parity" / "fixtures"


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(vocab_size=128, n_layer=2, n_head=4, d_model=32, max_seq_len=64, dropout=0.0, attn_dropout=0.0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def require_shared() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA
