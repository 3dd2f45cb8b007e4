"""gpt3zh.compat.modelscope.MsDataset: the model cards' dataset calls on local copies of real data.

The cards load hub datasets by name ('chinese-poetry-collection', 'DuReader_robust-QG'). Here the
same names are local directories holding the shared poetry / question-generation rows with the
hub's column names (text1, text2), so each card line runs exactly as written. Sockets are refused:
nothing may reach the network.
"""

import csv
import json
import socket

import datasets  # the `modelscope` extra, part of `dev`
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import require_shared
from gpt3zh.compat.modelscope import DatasetNotFoundError, MsDataset
from gpt3zh.tokenizer import load_tokenizer
from gpt3zh.training.data import DataError, load_token_rows, rows_from_dataset, tokenize_dataset

N_TRAIN, N_EVAL = 60, 20


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("test_compat_msdataset: network access is not allowed in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # datasets' Arrow cache goes to this test's directory, not the user's ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(require_shared() / "modelscope-gpt3-1.3B")


def read_jsonl(path, n):
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def same_tokens(a, b) -> bool:
    return (a.mode == b.mode and (a.ids == b.ids).all() and (a.offsets == b.offsets).all()
            and (a.starts == b.starts).all())


# ------------------------------------------------------------------------------- the model cards
def test_poetry_card_continuation(tmp_path, monkeypatch, tok):
    data = require_shared() / "poetry"
    train_rows, test_rows = read_jsonl(data / "sample.jsonl", N_TRAIN), read_jsonl(data / "test.jsonl", N_EVAL)
    write_jsonl(tmp_path / "chinese-poetry-collection" / "train.jsonl", [{"text1": r["src_txt"]} for r in train_rows])
    write_jsonl(tmp_path / "chinese-poetry-collection" / "test.jsonl", [{"text1": r["src_txt"]} for r in test_rows])
    monkeypatch.chdir(tmp_path)

    # model-card-gpt3-1.3B.md, finetune_poetry.py, verbatim
    dataset_dict = MsDataset.load('chinese-poetry-collection')
    train_dataset = dataset_dict['train'].remap_columns(
        {'text1': 'src_txt'})
    eval_dataset = dataset_dict['test'].remap_columns({'text1': 'src_txt'})

    assert set(dataset_dict) == {"train", "test"} and all(isinstance(v, MsDataset) for v in dataset_dict.values())
    assert isinstance(train_dataset, datasets.Dataset)  # remap_columns returns the Dataset, as ModelScope's
    assert (len(train_dataset), len(eval_dataset)) == (N_TRAIN, N_EVAL)
    assert train_dataset["src_txt"][:] == [r["src_txt"] for r in train_rows]
    # the trainer's rows: src_txt only -> continuation, every label trained; same tokens as the file
    tokens = tokenize_dataset(train_dataset, tok, 128)
    assert tokens.mode == "continuation" and (tokens.starts == 0).all()
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"src_txt": r["src_txt"]} for r in train_rows])
    assert same_tokens(tokens, load_token_rows(plain, tok, 128))


def test_dureader_card_prompt_to_target(tmp_path, monkeypatch, tok):
    data = require_shared() / "qg"
    train_rows, dev_rows = read_jsonl(data / "train.jsonl", N_TRAIN), read_jsonl(data / "dev.jsonl", N_EVAL)
    assert all(r["src_txt"].endswith("\n") for r in train_rows + dev_rows)  # the card's map adds it back

    def hub_form(rows):  # the hub dataset's columns, without the '\n' the card appends
        return [{"text1": r["src_txt"][:-1], "text2": r["tgt_txt"]} for r in rows]

    write_jsonl(tmp_path / "DuReader_robust-QG" / "train.jsonl", hub_form(train_rows))
    write_jsonl(tmp_path / "DuReader_robust-QG" / "validation.jsonl", hub_form(dev_rows))
    monkeypatch.chdir(tmp_path)

    # model-card-gpt3-1.3B.md, finetune_dureader.py, verbatim
    dataset_dict = MsDataset.load('DuReader_robust-QG')

    train_dataset = dataset_dict['train'].remap_columns({'text1': 'src_txt', 'text2': 'tgt_txt'}) \
        .map(lambda example: {'src_txt': example['src_txt'] + '\n'})
    eval_dataset = dataset_dict['validation'].remap_columns({'text1': 'src_txt', 'text2': 'tgt_txt'}) \
        .map(lambda example: {'src_txt': example['src_txt'] + '\n'})

    assert train_dataset.to_list() == [{"src_txt": r["src_txt"], "tgt_txt": r["tgt_txt"]} for r in train_rows]
    assert len(eval_dataset) == N_EVAL
    # src_txt + tgt_txt -> the prompt is masked: training starts at the last prompt position
    tokens = tokenize_dataset(eval_dataset, tok, 256)
    prompts = [len(tok.encode(r["src_txt"])) for r in dev_rows]
    assert tokens.mode == "prompt" and tokens.starts.tolist() == [min(p, 256) - 1 for p in prompts]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{k: r[k] for k in ("src_txt", "tgt_txt")} for r in dev_rows])
    assert same_tokens(tokens, load_token_rows(plain, tok, 256))


def test_base_card_in_memory_dataset():
    # model-card-gpt3-base.txt, verbatim
    from datasets import Dataset
    src_dataset_dict = {
        'src_txt': [
            '测试文本1', '测试文本2', '测试文本3'
        ]
    }
    src_dataset = MsDataset(Dataset.from_dict(src_dataset_dict))

    assert len(src_dataset) == 3 and list(src_dataset) == [{"src_txt": f"测试文本{i}"} for i in (1, 2, 3)]
    assert rows_from_dataset(src_dataset) == [{"src_txt": f"测试文本{i}"} for i in (1, 2, 3)]


@pytest.mark.parametrize("name", ["chinese-poetry-collection", "DuReader_robust-QG", "damo/some-dataset"])
def test_a_hub_name_says_what_was_tried_and_how_to_pass_local_files(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        MsDataset.load(name)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert f"MsDataset.load({name!r})" in msg and f"Tried: {tmp_path / name} (no such file or directory)" in msg
    assert "downloads no datasets" in msg and "MsDataset.load('json', data_files={'train':" in msg
    expected_id = name if "/" in name else f"modelscope/{name}"
    assert f"the ModelScope hub dataset {expected_id!r}" in msg
    with pytest.raises(DatasetNotFoundError, match=f"the Hugging Face hub dataset {name!r}"):
        MsDataset.load(name, hub="huggingface")


# ------------------------------------------------------------------------------ local data forms
@pytest.fixture
def qg_rows():
    return read_jsonl(require_shared() / "qg" / "dev.jsonl", 12)


def test_json_builder_with_splits_and_split_argument(tmp_path, qg_rows):
    files = {"train": str(write_jsonl(tmp_path / "a.jsonl", qg_rows[:8])),
             "test": str(write_jsonl(tmp_path / "b.jsonl", qg_rows[8:]))}
    splits = MsDataset.load("json", data_files=files)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "test": 4}
    test = MsDataset.load("json", data_files=files, split="test")
    assert isinstance(test, MsDataset) and test.to_hf_dataset().to_list() == qg_rows[8:]
    one = MsDataset.load("json", data_files=files["train"])  # one split: an MsDataset, as ModelScope
    assert isinstance(one, MsDataset) and len(one) == 8


def test_single_files_jsonl_csv_tsv_parquet(tmp_path, qg_rows):
    rows = [{"src_txt": r["src_txt"], "tgt_txt": r["tgt_txt"]} for r in qg_rows]
    rows.append({"src_txt": 'ASCII, "quoted"\ttab', "tgt_txt": "a,b"})  # csv quoting; .tsv must split on tabs
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    for ext, sep in (("csv", ","), ("tsv", "\t")):
        paths[ext] = tmp_path / f"d.{ext}"
        with paths[ext].open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, ["src_txt", "tgt_txt"], delimiter=sep)
            w.writeheader()
            w.writerows(rows)
    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    for ext, path in paths.items():
        ds = MsDataset.load(str(path))
        assert isinstance(ds, MsDataset) and ds.to_hf_dataset().to_list() == rows, ext
        assert MsDataset.load(str(path), split="train").to_hf_dataset().to_list() == rows, ext


def test_the_dataset_interface(tmp_path, qg_rows):
    ds = MsDataset.load(str(write_jsonl(tmp_path / "d.jsonl", qg_rows)))
    assert len(ds) == 12 and ds[0] == qg_rows[0] and ds[2:4]["tgt_txt"] == [r["tgt_txt"] for r in qg_rows[2:4]]
    assert list(ds["id"]) == [r["id"] for r in qg_rows] and list(ds) == qg_rows
    assert ds.column_names == list(qg_rows[0])
    assert isinstance(ds.to_hf_dataset(), datasets.Dataset) and ds.ds_instance is ds.to_hf_dataset()
    mapped = ds.map(lambda r: {"src_txt": r["src_txt"].upper()})
    assert isinstance(mapped, MsDataset) and mapped[0]["src_txt"] == qg_rows[0]["src_txt"].upper()
    targets = MsDataset(ds.to_hf_dataset(), target="tgt_txt")
    assert list(targets) == [r["tgt_txt"] for r in qg_rows]
    values = MsDataset.load(["床前明月光", "疑是地上霜"])
    assert list(values) == ["床前明月光", "疑是地上霜"] and values.column_names == ["target"]


def test_a_saved_datasets_directory(tmp_path, qg_rows):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(qg_rows[:8]),
                               "validation": datasets.Dataset.from_list(qg_rows[8:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    loaded = MsDataset.load(str(tmp_path / "saved"))
    assert {k: len(v) for k, v in loaded.items()} == {"train": 8, "validation": 4}
    assert MsDataset.load(str(tmp_path / "saved"), split="validation").to_hf_dataset().to_list() == qg_rows[8:]
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: train, validation\)"):
        MsDataset.load(str(tmp_path / "saved"), split="test")


# ------------------------------------------------------------------------------------ bad inputs
def test_bad_local_inputs_name_the_file(tmp_path, qg_rows):
    good = str(write_jsonl(tmp_path / "d.jsonl", qg_rows))
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetNotFoundError, match=f"data file {missing} not found"):
        MsDataset.load("json", data_files={"train": good, "test": missing})
    with pytest.raises(DatasetNotFoundError, match=r"is a URL; gpt3zh reads local files only"):
        MsDataset.load("json", data_files="https://example.com/train.jsonl")
    with pytest.raises(ValueError, match=r"'json' builder needs data_files="):
        MsDataset.load("json")
    with pytest.raises(ValueError, match=r"d\.jsonl.*Unknown split \"test\""):
        MsDataset.load(good, split="test")
    (tmp_path / "d.xlsx").write_bytes(b"not a table")
    with pytest.raises(ValueError, match=r"d\.xlsx: unknown data file type '\.xlsx'"):
        MsDataset.load(str(tmp_path / "d.xlsx"))
    with pytest.raises(TypeError, match=r"one split; got a DatasetDict"):
        MsDataset(datasets.DatasetDict({"train": datasets.Dataset.from_list(qg_rows)}))
    with pytest.raises(ValueError, match=r"text1"):  # the card's rename on data without the hub's columns
        MsDataset.load(good).remap_columns({"text1": "src_txt"})
    with pytest.raises(ValueError, match=r"target 'nope' is not a column"):
        MsDataset(datasets.Dataset.from_list(qg_rows), target="nope")


def test_training_rows_need_src_txt():
    hub_columns = MsDataset(datasets.Dataset.from_dict({"text1": ["问题"], "text2": ["答案"]}))
    with pytest.raises(DataError, match=r"no column 'src_txt' \(columns: text1, text2\).*remap_columns"):
        rows_from_dataset(hub_columns, "train_dataset")
    with pytest.raises(DataError, match=r"row 1 has no column 'src_txt' \(columns: text1\)"):
        tokenize_dataset([{"text1": "问题"}], None, 16)
    with pytest.raises(DataError, match=r"expected a datasets.Dataset, an MsDataset or a list of dicts, got str"):
        rows_from_dataset("train.jsonl")
    with pytest.raises(DataError, match=r"no rows"):
        rows_from_dataset(datasets.Dataset.from_dict({"src_txt": []}))
    # extra columns are dropped; a list of dicts keeps its rows
    ds = datasets.Dataset.from_dict({"src_txt": ["问题"], "tgt_txt": ["答案"], "id": [7]})
    assert rows_from_dataset(ds) == [{"src_txt": "问题", "tgt_txt": "答案"}]
    assert rows_from_dataset([{"src_txt": "床前明月光"}]) == [{"src_txt": "床前明月光"}]
