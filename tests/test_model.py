import subprocess
import sys

import pytest
import torch

from gpt3zh.config import PRESETS, ConfigError, GPTConfig
from gpt3zh.model import GPT


def test_kv_cache_equals_full_forward(tiny_config):
    model = GPT(tiny_config).eval()
    x = torch.randint(0, tiny_config.vocab_size, (2, 11))
    full = model(x)
    model.setup_kv_cache(2, 32)
    steps = [model(x[:, :5], cache_pos=torch.arange(5))]
    steps += [model(x[:, t : t + 1], cache_pos=torch.tensor([t])) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


def test_per_row_cache_positions_match_shared_positions(tiny_config):
    model = GPT(tiny_config).eval()
    x = torch.randint(0, tiny_config.vocab_size, (3, 7))
    model.setup_kv_cache(3, 16)
    shared = model(x, cache_pos=torch.arange(7))
    model.setup_kv_cache(3, 16)
    per_row = model(x, cache_pos=torch.arange(7).expand(3, 7))
    torch.testing.assert_close(per_row, shared, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_formula_matches_meta_model(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params


def test_1_3B_param_count():
    assert PRESETS["1.3B"].num_params == 1_317_654_528


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="d_model=100 is not divisible by n_head=12"):
        GPTConfig(d_model=100, n_head=12)
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(ConfigError, match="gelu"):
        GPTConfig(gelu="relu")
    with pytest.raises(ConfigError, match="unknown preset '1.3b'; did you mean '1.3B'"):
        GPTConfig.from_preset("1.3b")


def test_gelu_variant_changes_logits(tiny_config):
    erf = GPT(tiny_config).eval()
    tanh = GPT(tiny_config.replace(gelu="tanh")).eval()
    tanh.load_state_dict(erf.state_dict())
    x = torch.randint(0, tiny_config.vocab_size, (1, 8))
    assert not torch.allclose(erf(x), tanh(x), atol=1e-7)


def test_importing_the_model_pulls_in_nothing_else():
    code = (
        "import sys, gpt3zh.model; "
        "bad = [m for m in sys.modules if m.startswith(('gpt3zh.training', 'gpt3zh.parallel', "
        "'gpt3zh.serve', 'tokenizers', 'jieba', 'transformers', 'torch.distributed.tensor'))]; "
        "print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
