"""Training parts on tiny in-memory models: config, data positions, loss, accumulation, resume-free pieces."""

import json
import math

import numpy as np
import pytest
import torch

from gpt3zh.config import ConfigError, GPTConfig
from gpt3zh.model import GPT
from gpt3zh.training.config import load_config, valid_keys
from gpt3zh.training.data import (
    DataError,
    collate,
    detect_mode,
    epoch_batches,
    load_token_rows,
    read_rows,
    shard,
    tokenize_rows,
)
from gpt3zh.training.loop import Trainer, token_loss_sum
from gpt3zh.training.metrics import BleuStats, PPLAccumulator, bleu4, lcs_length, rouge_l
from gpt3zh.training.optim import (
    BF16AdamW,
    apply_activation_checkpointing,
    param_groups,
    stochastic_round_bf16,
)
from gpt3zh.training.schedules import noam, warmup_cosine


class CharTok:
    """A stand-in tokenizer (one id per character) for tests of data layout, not of tokenization."""

    def __init__(self, text: str):
        self.itos = ["<cls>", "<sep>", "<unk>", "<pad>"] + sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.sep_id, self.vocab_size = 1, len(self.itos)

    def encode(self, text):
        return [self.stoi.get(c, 2) for c in text]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models spend their time in OpenMP hand-offs; one thread is faster and immune to a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


BASE = {
    "model": {"preset": "base", "n_layer": 2, "n_head": 2, "d_model": 32, "vocab_size": 64, "max_seq_len": 32},
    "tokenizer": "unused",
    "dataset": {"train": "unused.jsonl"},
    "train": {"progress_bar": False},
}


def tiny_model(dropout=0.0, vocab=64):
    cfg = GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=32, dropout=dropout,
                    attn_dropout=dropout)
    return GPT(cfg)


# ------------------------------------------------------------------------------------------ config
def test_config_overrides_win_and_types_are_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {preset: base, n_layer: 2}\ntokenizer: tok\ndataset: {train: a.jsonl}\n"
        "train:\n  max_epochs: 3\n  optimizer: {type: AdamW, lr: 3e-4, options: {grad_clip: {max_norm: 2.0}}}\n"
        "  dataloader: {batch_size_per_gpu: 4, workers_per_gpu: 1}\nevaluation: {metrics: ppl}\n"
        "megatron: {world_size: 2, tensor_model_parallel_size: 2}\n"
    )
    cfg = load_config(path, ["train.max_epochs=5", "train.optimizer.lr=1e-3", "model.n_layer=3"])
    assert cfg.train.max_epochs == 5 and cfg.train.optimizer.lr == 1e-3
    assert cfg.train.optimizer.options.grad_clip.max_norm == 2.0
    assert cfg.model.gpt_config().n_layer == 3 and cfg.evaluation.metrics == ["ppl"]
    assert cfg.megatron.tensor_model_parallel_size == 2
    jpath = tmp_path / "c.json"
    jpath.write_text(json.dumps(cfg.to_dict()))
    assert load_config(jpath) == cfg
    assert load_config(cfg.to_dict(), {"train": {"seed": 7}}).train.seed == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=3", "unknown config key 'train.max_step'; did you mean 'train.max_steps'"),
        ("train.optimzer.lr=1", "did you mean 'train.optimizer.lr'"),
        ("evaluaton.metrics=ppl", "did you mean 'evaluation.metrics'"),
        ("model.n_layers=2", "did you mean 'model.n_layer'"),
        ("train.max_steps=abc", "train.max_steps: expected int or null, got 'abc'"),
        ("train.precision=fp8", "train.precision: expected one of 'fp32', 'bf16', 'fp16'"),
        ("megatron.tensor_model_parallel_size=3", "world_size=1 is not divisible by tensor_model_parallel_size=3"),
        ("megatron.world_size=two", "megatron.world_size: expected int"),
        ("train.param_dtype=bf16", "needs train.precision=bf16"),
        ("noequals", "expected KEY=VALUE"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(BASE, [override])


def test_noam_warmup_takes_the_model_cards_name():
    card = {**BASE, "train": {"lr_scheduler": {"type": "noam", "warmup": 200}}}
    assert load_config(card).train.lr_scheduler.warmup_steps == 200
    # an override of either name wins over the file's other name
    assert load_config(card, ["train.lr_scheduler.warmup_steps=50"]).train.lr_scheduler.warmup_steps == 50
    with_steps = {**BASE, "train": {"lr_scheduler": {"warmup_steps": 20}}}
    assert load_config(with_steps, ["train.lr_scheduler.warmup=100"]).train.lr_scheduler.warmup_steps == 100
    both = {**BASE, "train": {"lr_scheduler": {"warmup": 200, "warmup_steps": 50}}}
    with pytest.raises(ConfigError, match="warmup=200 and warmup_steps=50 disagree"):
        load_config(both)


def test_config_unknown_key_in_file_is_reported_with_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: base}\ntokenizer: t\ndataset: {train: a}\ntrain: {dataloder: {}}\n")
    with pytest.raises(ConfigError, match="'train.dataloder'; did you mean 'train.dataloader'"):
        load_config(path)
    assert "train.optimizer.options.grad_clip.max_norm" in valid_keys()


# -------------------------------------------------------------------------------------------- data
def test_bad_data_files_are_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src_txt": "a"}\n\n{"src_txt": "b"\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 3: malformed JSON"):
        read_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_rows(empty)
    rows = [{"text1": "a"}, {"text1": "b"}]
    with pytest.raises(DataError, match=r"row 1 has no column 'src_txt' \(columns: text1\).*remap_columns"):
        detect_mode(rows, "x.jsonl")
    with pytest.raises(DataError, match="row 2 column 'tgt_txt' must be a string, got int"):
        detect_mode([{"src_txt": "a", "tgt_txt": "b"}, {"src_txt": "c", "tgt_txt": 3}], "x.jsonl")
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.jsonl")


def test_csv_json_and_remap(tmp_path):
    (tmp_path / "d.csv").write_text("text1,text2\n问题,答案\n")
    (tmp_path / "d.json").write_text(json.dumps([{"text1": "问题", "text2": "答案"}], ensure_ascii=False))
    remap = {"text1": "src_txt", "text2": "tgt_txt"}
    for name in ("d.csv", "d.json"):
        rows = read_rows(tmp_path / name, remap)
        assert rows == [{"src_txt": "问题", "tgt_txt": "答案"}] and detect_mode(rows, name) == "prompt"


def test_saved_datasets_dir(tmp_path):
    try:
        import datasets
    except ImportError:  # optional dependency: without it a directory gets a clear message
        (tmp_path / "ds").mkdir()
        with pytest.raises(DataError, match=r"needs the `datasets` package.*or export it to JSONL"):
            read_rows(tmp_path / "ds")
        return
    datasets.Dataset.from_list([{"text1": "问题", "text2": "答案"}]).save_to_disk(str(tmp_path / "ds"))
    rows = read_rows(tmp_path / "ds", {"text1": "src_txt", "text2": "tgt_txt"})
    assert rows == [{"src_txt": "问题", "tgt_txt": "答案"}]


def _spec_mask(n_src, n_tgt, L, mode):
    """spec §8.2 verbatim: ones over max_length - 1 positions, then zero what is not trained."""
    t_len = n_src + (n_tgt if mode == "prompt" else 0) + 1
    prompts_len, inputs_len = min(n_src, L), min(t_len, L)
    mask = np.ones(L - 1, dtype=bool)
    j = np.arange(L - 1)
    if mode == "continuation":
        mask[j >= prompts_len] = False
    else:
        mask[(j >= inputs_len - 1) | (j < prompts_len - 1)] = False
    return mask


@pytest.mark.parametrize("mode", ["continuation", "prompt"])
def test_loss_mask_positions_match_spec(mode):
    L = 12
    cases = [(3, 2), (5, 6), (11, 3), (12, 2), (15, 4), (4, 0), (1, 1)]
    rows = [{"src_txt": "甲" * s, "tgt_txt": "乙" * g} for s, g in cases]
    tok = CharTok("甲乙")
    data = tokenize_rows(rows, tok, L, mode)
    batch = collate(data, range(len(rows)), pad_to=L - 1)
    for b, (s, g) in enumerate(cases):
        assert batch.mask[b].numpy().tolist() == _spec_mask(s, g, L, mode).tolist(), (s, g)
        t = (tok.encode("甲" * s) + (tok.encode("乙" * g) if mode == "prompt" else []) + [1])[:L]
        t += [0] * (L - len(t))  # ModelScope pads with 0
        assert batch.tokens[b].tolist() == t[:-1] and batch.labels[b].tolist() == t[1:]


def test_dynamic_padding_gives_the_same_loss_as_full_padding():
    rows = [{"src_txt": "春眠不觉晓"[:k], "tgt_txt": "处处闻啼鸟"[: 5 - k]} for k in range(1, 5)]
    tok = CharTok("".join(r["src_txt"] + r["tgt_txt"] for r in rows))
    data = tokenize_rows(rows, tok, 16, "prompt")
    model = tiny_model()
    short, full = collate(data, range(4)), collate(data, range(4), pad_to=15)
    assert short.tokens.shape[1] < full.tokens.shape[1]
    torch.testing.assert_close(token_loss_sum(model, short), token_loss_sum(model, full), rtol=1e-6, atol=1e-6)


def test_prompt_labels_do_not_change_the_loss():
    rows = [{"src_txt": "白日依山尽", "tgt_txt": "黄河入海流"}, {"src_txt": "欲穷千里目", "tgt_txt": "更上"}]
    tok = CharTok("".join(r["src_txt"] + r["tgt_txt"] for r in rows))
    batch = collate(tokenize_rows(rows, tok, 16, "prompt"), [0, 1])
    model = tiny_model()
    before = token_loss_sum(model, batch)
    prompt_pos = ~batch.mask
    batch.labels[prompt_pos] = torch.randint(4, tok.vocab_size, (int(prompt_pos.sum()),))
    assert torch.equal(token_loss_sum(model, batch), before)
    batch.labels[batch.mask] = (batch.labels[batch.mask] + 1) % tok.vocab_size  # trained labels do count
    assert not torch.equal(token_loss_sum(model, batch), before)


def test_token_cache_is_reused_and_keyed(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"src_txt": "床前明月光"}\n{"src_txt": "疑是地上霜"}\n')
    tok = CharTok("床前明月光疑是地上霜")
    a = load_token_rows(f, tok, 8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 1
    b = load_token_rows(f, tok, 8, cache_dir=tmp_path / "cache")
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.starts, b.starts) and b.mode == "continuation"
    load_token_rows(f, tok, 4, cache_dir=tmp_path / "cache")  # another sequence length: another entry
    f.write_text('{"src_txt": "举头望明月"}\n')
    c = load_token_rows(f, tok, 8, cache_dir=tmp_path / "cache")  # the file changed: re-tokenized
    assert len(c) == 1 and len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 3


def test_epoch_batches_are_seeded_cover_all_rows_and_shard():
    lengths = list(np.random.RandomState(0).randint(2, 50, size=103))
    a = epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(103))
    batch = a[0]
    assert shard(batch, 0, 2) + shard(batch, 1, 2) == batch[0::2] + batch[1::2]
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in a])
    spread_random = np.mean([np.ptp([lengths[i] for i in b]) for b in epoch_batches(lengths, 8, 1, 0, bucket=False)])
    assert spread < spread_random / 2  # bucketing groups similar lengths


# -------------------------------------------------------------------------------------------- loss
class GradCapture(torch.optim.Optimizer):
    """Records the gradients the trainer hands to `step` (the optimizer is not under test)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def _trainer(**train):
    cfg = load_config(BASE, {"train": {"optimizer": {"options": {"grad_clip": {"max_norm": None}}}, **train}})
    return Trainer(cfg)


def _step_grads(model, batches, trainer):
    opt = GradCapture(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.train_step(model, opt, scaler, batches)
    return opt.grads


def test_k_micro_batches_equal_one_big_batch():
    rows = [{"src_txt": "床前明月光疑是地上霜举头望明月"[: 3 + 2 * i]} for i in range(6)]
    tok = CharTok("床前明月光疑是地上霜举头望明月")
    data = tokenize_rows(rows, tok, 20, "continuation")
    model = tiny_model()
    trainer = _trainer()
    big = _step_grads(model, [collate(data, range(6))], trainer)
    micro = _step_grads(model, [collate(data, [0, 1]), collate(data, [2, 3, 4]), collate(data, [5])], trainer)
    for g1, g2 in zip(big, micro):
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-6)


def test_overfits_a_tiny_batch():
    rows = [{"src_txt": "床前明月光"}, {"src_txt": "疑是地上霜"}, {"src_txt": "举头望明月"}]
    tok = CharTok("床前明月光疑是地上霜举头望明月")
    batch = collate(tokenize_rows(rows, tok, 16, "continuation"), range(3))
    model = tiny_model()
    trainer = _trainer(optimizer={"lr": 3e-3})
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    first = trainer.train_step(model, opt, scaler, [batch])[0]
    for _ in range(150):
        loss = trainer.train_step(model, opt, scaler, [batch])[0]
    assert first > 3.0 and loss < 0.05


def test_activation_checkpointing_keeps_names_and_gradients():
    torch.manual_seed(0)
    ref = tiny_model(dropout=0.1)
    ac = tiny_model(dropout=0.1)
    ac.load_state_dict(ref.state_dict())
    apply_activation_checkpointing(ac)
    assert list(ac.state_dict()) == list(ref.state_dict())
    x = torch.randint(0, 64, (2, 12))
    grads = []
    for m in (ref, ac):
        torch.manual_seed(5)  # the same dropout masks; checkpoint replays them in the recompute
        m(x).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-6)


def test_no_weight_decay_on_biases_norms_embeddings():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2
                       and "emb" not in n}
    assert no_decay["weight_decay"] == 0.0 and "tok_emb.weight" not in decayed


def test_stochastic_rounding_is_unbiased_and_bf16_adamw_trains():
    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of a bf16 ulp above 1.0
    r = stochastic_round_bf16(x).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.mean().item() - x[0].item()) < 5 * (2**-7) * math.sqrt(0.25 * 0.75 / 200_000)
    model = tiny_model().to(torch.bfloat16)
    opt = BF16AdamW(param_groups(model, 0.0), lr=3e-3)
    x = torch.randint(0, 64, (4, 10))
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_schedules():
    assert noam(0, 100) == pytest.approx(100**-1.5) and noam(99, 100) == pytest.approx(100**-0.5)
    assert noam(399, 100) == pytest.approx(400**-0.5)
    assert noam(9, 100) == pytest.approx(10 * 100**-1.5)
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(99, 10, 100, 0.1) == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------- metrics
def test_rouge_l_and_bleu_by_hand():
    assert lcs_length(list("今天天气好"), list("今天是好天气")) == 4  # 今天天气
    assert rouge_l("今天天气好", "今天是好天气") == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))
    assert rouge_l("今 天", "今天") == 1.0 and rouge_l("", "今天") == 0.0
    assert rouge_l("什么?", "什么？") == 1.0  # JiebaBPE decodes full-width ？ as ?: compared after NFKC
    # 猫坐在垫子上 vs 猫坐在地毯上: 1-grams 4/6, 2-grams 2/5, 3-grams 1/4, 4-grams 0/3; equal lengths
    expected = (4 / 6 * (2 + 1) / (5 + 1) * (1 + 1) / (4 + 1) * (0 + 1) / (3 + 1)) ** 0.25
    assert bleu4(["猫坐在垫子上"], ["猫坐在地毯上"]) == pytest.approx(expected)
    # brevity penalty: prediction 3 chars against 6 -> exp(1 - 6/3); clipped counts
    s = BleuStats()
    s.add("猫猫猫", "猫坐在地毯上")
    assert s.matches[0] == 1 and s.totals[0] == 3
    bp = math.exp(1 - 6 / 3)
    assert s.score() == pytest.approx(bp * (1 / 3 * 1 / 3 * 1 / 2) ** 0.25)
    assert bleu4(["猫坐在地毯上"], ["猫坐在地毯上"]) == pytest.approx(1.0)


def test_ppl_by_hand():
    acc = PPLAccumulator()
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 3.0, 1.0]]])  # (1, 3, 4)
    labels = torch.tensor([[0, 3, 1]])
    mask = torch.tensor([[True, True, False]])
    acc.update(logits, labels, mask, modelscope=True)
    nll = [-(2 - math.log(math.exp(2) + 3)), math.log(4), -(1 - math.log(3 * math.e + math.exp(3)))]
    out = acc.result()
    assert out["tokens"] == 2
    assert out["loss"] == pytest.approx((nll[0] + nll[1]) / 2)
    assert out["ppl"] == pytest.approx(math.exp((nll[0] + nll[1]) / 2))
    assert out["ppl_modelscope"] == pytest.approx(math.exp(sum(nll) / 3))  # every position counts


def test_evaluate_ppl_matches_row_by_row_computation():
    from gpt3zh.evaluation import evaluate_ppl

    rows = [{"src_txt": "春眠不觉晓", "tgt_txt": "处处闻啼鸟"}, {"src_txt": "夜来", "tgt_txt": "风雨声花落知多少"}]
    tok = CharTok("".join(r["src_txt"] + r["tgt_txt"] for r in rows))
    data = tokenize_rows(rows, tok, 16, "prompt")
    model = tiny_model().eval()
    out = evaluate_ppl(model, data, batch_size=2, device="cpu", pad_to=15)
    total, count = 0.0, 0
    for r in rows:  # each row alone, unpadded; NLL of each target token and <sep> from log-softmax
        src, tgt = tok.encode(r["src_txt"]), tok.encode(r["tgt_txt"]) + [1]
        ids = torch.tensor([src + tgt])
        logp = torch.log_softmax(model(ids[:, :-1])[0].double(), -1)
        for k, target in enumerate(tgt):
            total -= logp[len(src) - 1 + k, target].item()
            count += 1
    assert out["tokens"] == count
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["chars"] == sum(len(r["tgt_txt"]) for r in rows)
    lean = evaluate_ppl(model, data, batch_size=2, device="cpu")  # head on trained positions only
    assert lean["tokens"] == count and "ppl_modelscope" not in lean
    assert lean["loss"] == pytest.approx(total / count, rel=1e-5)


def test_truncated_rows_count_only_the_kept_characters():
    from gpt3zh.tokenizer import train_char_tokenizer
    from gpt3zh.training.data import tokenize_rows

    tok = train_char_tokenizer(["床前明月光疑是地上霜举头望低思故乡"])
    rows = [{"src_txt": "床前明月光疑是地上霜"}, {"src_txt": "举头望"}]
    data = tokenize_rows(rows, tok, 6, "continuation")
    assert data.truncated == 1
    assert data.chars.tolist() == [6, 3]  # 6 of 10 characters kept in the cut row
    prompt = tokenize_rows([{"src_txt": "床前明", "tgt_txt": "月光疑是地上霜"}], tok, 6, "prompt")
    assert prompt.chars.tolist() == [3]  # 3 of the 7 target characters fit after the 3-token prompt


# ------------------------------------------------------------------------------ reliability: inputs
def test_invalid_utf8_names_the_file_and_the_byte_offset(tmp_path):
    # past the first 8 KiB: a text-mode reader reports an offset inside its own read buffer
    good = "".join(json.dumps({"src_txt": f"床前明月光{i}"}, ensure_ascii=False) + "\n" for i in range(400))
    for name, head, tail in [("d.jsonl", good + '{"src_txt": "', '"}\n'),
                             ("d.csv", "src_txt\n" + "床前明月光\n" * 2000 + '"', '"\n'),
                             ("d.json", "[" + "{},\n" * 3000 + '{"src_txt": "', '"}]')]:
        path = tmp_path / name
        path.write_bytes(head.encode() + b"\xff" + tail.encode())
        at = len(head.encode())
        with pytest.raises(DataError, match=rf"{name}: not UTF-8 text: byte 0xff at byte offset {at} "
                                            rf"\(line {head.count(chr(10)) + 1}\)"):
            read_rows(path)
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"train:\n  seed: 1 # \xe5\x90\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text: byte 0xe5 at byte offset 19 \(line 2\)"):
        load_config(cfg)


def test_utf8_bom_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.jsonl").write_bytes(bom + '{"src_txt": "问题"}\n'.encode())
    (tmp_path / "d.csv").write_bytes(bom + "src_txt,tgt_txt\n问题,答案\n".encode())
    (tmp_path / "d.json").write_bytes(bom + '[{"src_txt": "问题"}]'.encode())
    assert read_rows(tmp_path / "d.jsonl") == [{"src_txt": "问题"}]
    assert read_rows(tmp_path / "d.csv") == [{"src_txt": "问题", "tgt_txt": "答案"}]  # not "\ufeffsrc_txt"
    assert read_rows(tmp_path / "d.json") == [{"src_txt": "问题"}]
    (tmp_path / "c.yaml").write_bytes(bom + b"model: {preset: base}\ntokenizer: t\ndataset: {train: a}\n")
    assert load_config(tmp_path / "c.yaml").tokenizer == "t"


def test_parquet_is_read_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")  # the `data` extra
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text1": ["问题", "再问"], "text2": ["答案", None]}), tmp_path / "d.parquet")
    rows = read_rows(tmp_path / "d.parquet", {"text1": "src_txt", "text2": "tgt_txt"})
    assert rows == [{"src_txt": "问题", "tgt_txt": "答案"}, {"src_txt": "再问", "tgt_txt": None}]
    assert detect_mode(rows, "d.parquet") == "mixed"  # a null target is no target
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="bad.parquet: cannot read as parquet"):
        read_rows(tmp_path / "bad.parquet")


def test_mixed_rows_are_tokenized_per_row_as_modelscope():
    # the first row has no target: before, the whole file became continuation and row 2's
    # tgt_txt was dropped without a word
    L = 12
    rows = [{"src_txt": "甲甲甲"}, {"src_txt": "甲甲", "tgt_txt": "乙乙乙"}, {"src_txt": "甲", "tgt_txt": None}]
    tok = CharTok("甲乙")
    assert detect_mode(rows, "x") == "mixed"
    data = tokenize_rows(rows, tok, L, "mixed")
    assert data.with_target == 1
    batch = collate(data, range(3), pad_to=L - 1)
    assert batch.mask[0].tolist() == _spec_mask(3, 0, L, "continuation").tolist()
    assert batch.mask[1].tolist() == _spec_mask(2, 3, L, "prompt").tolist()
    assert batch.mask[2].tolist() == _spec_mask(1, 0, L, "continuation").tolist()
    assert batch.tokens[1, :6].tolist() == tok.encode("甲甲乙乙乙") + [1]  # the target is in the row
    assert data.chars.tolist() == [3, 3, 1]  # scored text: src for continuation rows, tgt for the prompt row


def test_model_overrides_dotted_key_works_like_the_shorthand():
    a = load_config(BASE, ["model.overrides.n_layer=3"])
    b = load_config(BASE, ["model.n_layer=3"])
    assert a.model.gpt_config() == b.model.gpt_config() and a.model.gpt_config().n_layer == 3
    with pytest.raises(ConfigError, match="not divisible by n_head=5"):  # accepted as a key, checked as a value
        load_config(BASE, ["model.overrides.n_head=5"])
    with pytest.raises(ConfigError, match="did you mean 'model.overrides.n_head'"):
        load_config(BASE, ["model.overrides.n_heads=2"])
    both = {**BASE, "model": {"preset": "base", "n_layer": 2, "overrides": {"n_layer": 4}}}
    with pytest.raises(ConfigError, match=r"n_layer is given twice .*model.n_layer=2, model.overrides.n_layer=4"):
        load_config(both)
    assert load_config(both, ["model.overrides.n_layer=5"]).model.gpt_config().n_layer == 5  # the override wins


@pytest.mark.parametrize("override, key", [
    ("train.optimizer.lr=.inf", "train.optimizer.lr"), ("train.optimizer.lr=.nan", "train.optimizer.lr"),
    ("train.optimizer.eps=-.inf", "train.optimizer.eps"),
    ("train.optimizer.options.grad_clip.max_norm=.inf", "train.optimizer.options.grad_clip.max_norm"),
])
def test_non_finite_numbers_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"{key}: expected a finite number"):
        load_config(BASE, [override])


def test_overwrite_and_resume_are_exclusive():
    with pytest.raises(ConfigError, match="train.overwrite=true .* cannot be combined with train.resume"):
        load_config(BASE, ["train.overwrite=true", "train.resume=true"])


def test_checkpoints_are_ordered_and_pruned_by_step_number(tmp_path):
    from gpt3zh.training.loop.trainer import _checkpoints, _prune

    # 9 digits sort before 8 by name: pruning by name would delete the newest checkpoint
    for step in (99_999_998, 99_999_999, 100_000_000):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / "state.pt").write_bytes(b"x")
    assert [p.name for p in _checkpoints(tmp_path)] == ["step-99999998", "step-99999999", "step-100000000"]
    _prune(tmp_path, keep_last=1, best={"step": 99_999_998}, step=100_000_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-100000000", "step-99999998"]  # newest + best
