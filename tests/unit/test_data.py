"""trainer.data on real local files through the real datasets loaders, with real tokenizers."""

from __future__ import annotations

import csv
import json
import logging
import socket
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trainer import data
from trainer.config import DataConfig

EOT = "<|endoftext|>"
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "",  # blank rows are skipped: no tokens, no EOS
    "Return the sum of a and b.\n\nRaises ValueError when either is negative.",
    "   ",
    "Sphinx of black quartz, judge my vow — naïve café.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump!",
]


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own datasets cache, so nothing leaks between tests or runs."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny GPT-2 style byte-level BPE trained on the spot."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(DOCS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT)


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: doc}) + "\n" for doc in docs))
    return path


def texts(split: datasets.Dataset) -> list[str]:
    return list(split["text"])


def reference_stream(tokenizer, docs: list[str]) -> list[int]:
    """The obvious packing input: each non-blank document's ids, then EOS, all concatenated."""
    stream: list[int] = []
    for doc in docs:
        if doc.strip():
            stream += tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]
    return stream


def reference_blocks(stream: list[int], length: int, keep_tail: bool, pad: int) -> list[tuple[list[int], list[int]]]:
    blocks = []
    start = 0
    while start + length + 1 <= len(stream):
        window = stream[start : start + length + 1]
        blocks.append((window[:-1], window[1:]))
        start += length
    tail = stream[start:]
    if keep_tail and len(tail) >= 2:
        missing = length - (len(tail) - 1)
        blocks.append((tail[:-1] + [pad] * missing, tail[1:] + [-100] * missing))
    return blocks


# -- loading ------------------------------------------------------------------------
def _write_format(tmp_path: Path, suffix: str, docs: list[str]) -> Path:
    path = tmp_path / f"train{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(docs) + "\n")
    elif suffix == ".jsonl":
        write_jsonl(path, docs)
    elif suffix == ".csv":
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["id", "text"])
            writer.writerows(enumerate(docs))
    else:
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_local_files_of_each_format(tmp_path: Path, suffix: str) -> None:
    docs = [f"line {i} of the corpus" for i in range(40)]
    path = _write_format(tmp_path, suffix, docs)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", ["held out text"])
    splits = data.load_text_datasets(DataConfig(train_file=str(path), eval_file=str(eval_path)), seed=0)
    assert texts(splits["train"]) == docs
    assert texts(splits["eval"]) == ["held out text"]


def test_comma_separated_files_are_concatenated(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", ["a1", "a2"])
    second = write_jsonl(tmp_path / "b.jsonl", ["b1"])
    cfg = DataConfig(train_file=f"{first}, {second}", eval_file=str(second))
    assert data.load_text_datasets(cfg, seed=0)["train"]["text"] == ["a1", "a2", "b1"]


def test_unknown_file_type_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported data file type"):
        data.load_text_datasets(DataConfig(train_file=str(tmp_path / "x.xml")), seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        data.load_text_datasets(DataConfig(train_file=str(tmp_path / "nope.jsonl")), seed=0)
    with pytest.raises(ValueError, match="either --dataset or --train_file"):
        data.load_text_datasets(DataConfig(dataset_name=str(tmp_path), train_file=str(tmp_path / "x.xml")), seed=0)


def test_dataset_directory_uses_its_validation_split(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [f"train {i}" for i in range(10)])
    write_jsonl(folder / "validation.jsonl", ["valid 0", "valid 1"])
    splits = data.load_text_datasets(DataConfig(dataset_name=str(folder)), seed=0)
    assert splits["train"].num_rows == 10
    assert texts(splits["eval"]) == ["valid 0", "valid 1"]


def test_save_to_disk_directory_first_eval_name_wins(tmp_path: Path) -> None:
    saved = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["t0", "t1", "t2"]}),
        test=datasets.Dataset.from_dict({"text": ["test"]}),
        dev=datasets.Dataset.from_dict({"text": ["dev"]}),
    )
    saved.save_to_disk(tmp_path / "saved")
    splits = data.load_text_datasets(DataConfig(dataset_name=str(tmp_path / "saved")), seed=0)
    assert texts(splits["train"]) == ["t0", "t1", "t2"]
    assert texts(splits["eval"]) == ["test"]  # test comes before dev in EVAL_SPLIT_NAMES


def test_save_to_disk_single_dataset_is_train(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(20)]}).save_to_disk(tmp_path / "one")
    splits = data.load_text_datasets(DataConfig(dataset_name=str(tmp_path / "one"), eval_split_ratio=0.1), seed=0)
    assert (splits["train"].num_rows, splits["eval"].num_rows) == (18, 2)


def test_split_off_eval_is_deterministic_and_seeded(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [f"document {i}" for i in range(100)])
    cfg = DataConfig(train_file=str(path), eval_split_ratio=0.1)
    first = data.load_text_datasets(cfg, seed=3)
    again = data.load_text_datasets(cfg, seed=3)
    other = data.load_text_datasets(cfg, seed=4)
    assert first["eval"].num_rows == 10 and first["train"].num_rows == 90
    assert texts(first["eval"]) == texts(again["eval"])
    assert texts(first["eval"]) != texts(other["eval"])
    assert sorted(texts(first["train"]) + texts(first["eval"])) == sorted(f"document {i}" for i in range(100))


def test_missing_text_column_names_the_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ["a", "b", "c"], column="content")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content'\].*--text_column"):
        data.load_text_datasets(DataConfig(train_file=str(path), eval_file=str(path)), seed=0)


def test_offline_hub_name_is_a_clear_error_without_network(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    attempts: list[object] = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in a unit test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        with pytest.raises(ValueError, match=r"(?s)offline.*--dataset DIR.*--train_file"):
            data.load_text_datasets(DataConfig(dataset_name="wikitext"), seed=0)
    assert "wikitext-2-raw-v1" in caplog.text  # the README's bare --dataset wikitext gets its config
    assert attempts == []


# -- tokenising and packing ---------------------------------------------------------
def test_packing_matches_the_reference(tmp_path: Path, tokenizer) -> None:
    train_docs, eval_docs = DOCS * 3, DOCS[2:5]
    cfg = DataConfig(
        train_file=str(write_jsonl(tmp_path / "train.jsonl", train_docs)),
        eval_file=str(write_jsonl(tmp_path / "eval.jsonl", eval_docs)),
        max_seq_length=8,
    )
    train, evaluation = data.build_lm_datasets(cfg, tokenizer, seed=0)
    eos = tokenizer.eos_token_id
    for split, docs, keep_tail in ((train, train_docs, False), (evaluation, eval_docs, True)):
        expected = reference_blocks(reference_stream(tokenizer, docs), 8, keep_tail, pad=eos)
        assert split.column_names == ["input_ids", "labels"]
        assert len(split) == len(expected)
        rows = split[:]
        assert rows["input_ids"].dtype == torch.int64 and rows["input_ids"].shape == (len(expected), 8)
        assert rows["input_ids"].tolist() == [inputs for inputs, _ in expected]
        assert rows["labels"].tolist() == [labels for _, labels in expected]
    # The eval stream is the non-blank documents, each followed by EOS; every token after
    # the first is a label exactly once.
    rows = evaluation[:]
    labels = rows["labels"][rows["labels"] != -100].tolist()
    expected_text = "".join(doc + EOT for doc in eval_docs if doc.strip())
    assert tokenizer.decode([rows["input_ids"][0, 0].item()] + labels) == expected_text


def test_labels_are_inputs_shifted_by_one(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", DOCS * 4)
    cfg = DataConfig(train_file=str(path), eval_file=str(path), max_seq_length=5)
    train, _ = data.build_lm_datasets(cfg, tokenizer, seed=0)
    rows = train[:]
    assert torch.equal(rows["input_ids"][:, 1:], rows["labels"][:, :-1])
    assert torch.equal(rows["input_ids"][1:, 0], rows["labels"][:-1, -1])  # windows overlap by one token


def test_eval_tail_is_padded_and_capped(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", DOCS * 4)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", ["fox"])  # a few tokens: one short block
    cfg = DataConfig(train_file=str(path), eval_file=str(eval_path), max_seq_length=16)
    _, evaluation = data.build_lm_datasets(cfg, tokenizer, seed=0)
    stream = reference_stream(tokenizer, ["fox"])
    row = evaluation[0]
    n = len(stream) - 1
    assert len(evaluation) == 1
    assert row["input_ids"].tolist() == stream[:-1] + [tokenizer.eos_token_id] * (16 - n)
    assert row["labels"].tolist() == stream[1:] + [-100] * (16 - n)
    cfg = DataConfig(train_file=str(path), eval_file=str(path), max_seq_length=4, max_eval_blocks=3)
    assert len(data.build_lm_datasets(cfg, tokenizer, seed=0)[1]) == 3


def test_pack_blocks_edges() -> None:
    stream = torch.arange(9).numpy().astype("int32")  # 9 tokens = 2 full windows of 4+1 exactly
    inputs, labels = data.pack_blocks(stream, 4, keep_tail=True, pad_id=-1)
    assert inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and labels.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    inputs, labels = data.pack_blocks(stream[:3], 4, keep_tail=True, pad_id=-1)
    assert inputs.tolist() == [[0, 1, -1, -1]] and labels.tolist() == [[1, 2, -100, -100]]
    assert data.pack_blocks(stream[:3], 4, keep_tail=False, pad_id=-1)[0].shape == (0, 4)


def test_too_little_data_says_how_many_tokens(tmp_path: Path, tokenizer) -> None:
    short = write_jsonl(tmp_path / "short.jsonl", ["fox"])
    n = len(reference_stream(tokenizer, ["fox"]))
    cfg = DataConfig(train_file=str(short), eval_file=str(short), max_seq_length=64)
    message = rf"holds {n} tokens.*max_seq_length=64.*lower --max_seq_length or add more data"
    with pytest.raises(ValueError, match=message):
        data.build_lm_datasets(cfg, tokenizer, seed=0)
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "  ", "\n"])
    with pytest.raises(ValueError, match="holds 0 tokens"):
        data.build_lm_datasets(DataConfig(train_file=str(blank), eval_file=str(short)), tokenizer, seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty: no rows, 0 tokens"):
        data.build_lm_datasets(DataConfig(train_file=str(empty)), tokenizer, seed=0)
    with pytest.raises(ValueError, match="1 row.*too few to split off an eval set.*--eval_file"):
        data.build_lm_datasets(DataConfig(train_file=str(short)), tokenizer, seed=0)


def test_second_run_reuses_the_tokenised_cache(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", DOCS * 4)
    cfg = DataConfig(train_file=str(path), max_seq_length=8)
    first, first_eval = data.build_lm_datasets(cfg, tokenizer, seed=0)
    tokenizer("warm the tokenizer up", truncation=True, max_length=2)  # call state must not change the cache key

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenised again instead of loading the cache")

    monkeypatch.setattr(data, "_tokenize_batch", must_not_run)
    second, second_eval = data.build_lm_datasets(cfg, tokenizer, seed=0)
    assert torch.equal(first[:]["input_ids"], second[:]["input_ids"])
    assert torch.equal(first_eval[:]["labels"], second_eval[:]["labels"])


def test_vocabulary_beyond_uint16(tmp_path: Path) -> None:
    vocab = {f"w{i}": i for i in range(70_000)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w69999")
    path = write_jsonl(tmp_path / "train.jsonl", ["w65535 w65536 w3 w69998"] * 3)
    cfg = DataConfig(train_file=str(path), eval_file=str(path), max_seq_length=4)
    train, _ = data.build_lm_datasets(cfg, big, seed=0)
    assert train[0]["input_ids"].tolist() == [65535, 65536, 3, 69998]
    assert train[0]["labels"].tolist() == [65536, 3, 69998, 69999]


def test_inputs_and_labels_are_two_views_of_one_token_buffer(tmp_path: Path, tokenizer) -> None:
    """The map path holds the token stream once (4 bytes a token), not inputs and labels as two copies."""
    path = write_jsonl(tmp_path / "train.jsonl", DOCS * 4)
    train, _ = data.build_lm_datasets(DataConfig(train_file=str(path), eval_file=str(path), max_seq_length=5),
                                      tokenizer, seed=0)
    inputs, labels = (train.data.column(name).chunk(0).values for name in ("input_ids", "labels"))
    token = inputs.type.byte_width
    # The same memory, one token apart (zero-copy views of the stream), not a second array.
    assert labels.buffers()[1].address + labels.offset * token == inputs.buffers()[1].address + (inputs.offset + 1) * token


# -- streaming ------------------------------------------------------------------------------------
def stream_rows(stream: datasets.IterableDataset) -> list[tuple[list[int], list[int]]]:
    return [(row["input_ids"].tolist(), row["labels"].tolist()) for row in stream]


def test_streamed_blocks_are_the_packing_reference_per_document_batch(tmp_path: Path, tokenizer) -> None:
    docs = DOCS * 6
    cfg = DataConfig(train_file=str(write_jsonl(tmp_path / "train.jsonl", docs)), streaming=True,
                     eval_file=str(write_jsonl(tmp_path / "eval.jsonl", DOCS[2:5])), max_seq_length=8,
                     stream_batch_documents=len(DOCS))
    train, evaluation = data.build_streaming_datasets(cfg, tokenizer, seed=0, rank=0, world_size=1)
    expected = []
    for start in range(0, len(docs), len(DOCS)):  # each batch of documents packed on its own, its tail dropped
        expected += reference_blocks(reference_stream(tokenizer, docs[start : start + len(DOCS)]), 8, False, pad=0)
    assert stream_rows(train) == expected
    map_eval = data.build_lm_datasets(DataConfig(train_file=cfg.train_file, eval_file=cfg.eval_file, max_seq_length=8),
                                      tokenizer, seed=0)[1]
    assert evaluation[:]["input_ids"].tolist() == map_eval[:]["input_ids"].tolist()  # eval: the map path's blocks


def test_ranks_stream_disjoint_shards_that_cover_the_corpus(tmp_path: Path, tokenizer) -> None:
    for shard in range(4):
        write_jsonl(tmp_path / f"part-{shard}.jsonl", [f"{doc} {shard}" for doc in DOCS])
    # One document per packing batch: the blocks do not depend on which documents a rank reads together.
    cfg = DataConfig(train_file=str(tmp_path / "part-*.jsonl"), streaming=True, max_seq_length=4,
                     eval_file=str(tmp_path / "part-0.jsonl"), stream_batch_documents=1)
    everything = stream_rows(data.build_streaming_datasets(cfg, tokenizer, seed=0, rank=0, world_size=1)[0])
    ranks = [stream_rows(data.build_streaming_datasets(cfg, tokenizer, seed=0, rank=r, world_size=2)[0])
             for r in range(2)]
    # Together the ranks hold each block as often as the one stream does: none read twice, none left out.
    assert ranks[0] and ranks[1] and sorted(ranks[0] + ranks[1]) == sorted(everything)


def test_held_out_documents_never_reach_training(tmp_path: Path, tokenizer) -> None:
    docs = [f"Document number {i}: {DOCS[i % len(DOCS)]}" for i in range(200)]
    cfg = DataConfig(train_file=str(write_jsonl(tmp_path / "train.jsonl", docs)), streaming=True,
                     eval_split_ratio=0.2, max_seq_length=4, stream_batch_documents=1)
    train, evaluation = data.build_streaming_datasets(cfg, tokenizer, seed=0, rank=0, world_size=1)
    held_out = {doc for doc in docs if data._text_hash(doc) < 0.2 * 2**32}
    assert 10 < len(held_out) < 80
    trained = {tokenizer.decode(ids + labels[-1:]) for ids, labels in stream_rows(train)}
    assert not any(doc in text for doc in held_out for text in trained) and len(evaluation) > 0
