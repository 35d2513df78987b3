"""Text in, packed language-modelling blocks out.

``load_text_datasets`` finds the raw text (a hub dataset, a local dataset directory,
or local files) and picks the train and eval splits. ``build_lm_datasets`` tokenises
it, appends EOS after every document and packs the token stream into blocks of
``L = max_seq_length`` positions. Labels are already shifted (docs/method.md §4): block ``i``
is the window ``tokens[i*L : i*L + L + 1]``, ``input_ids = window[:-1]`` and
``labels = window[1:]``, so consecutive windows overlap by one token and every
token after the first is a label exactly once.

    train_set, eval_set = build_lm_datasets(config.data, tokenizer, seed=42)
    train_set[0]["input_ids"].shape  # torch.Size([L]), int64

With ``streaming`` (``build_streaming_datasets``) the training set is a
``datasets.IterableDataset`` of the same blocks, read, tokenised and packed on the
fly where it is iterated (the loader's workers), this rank's share only; its
position is the loader's ``state_dict()``, saved with every checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import datasets.distributed
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.utils.data
from datasets.exceptions import DatasetNotFoundError
from datasets.fingerprint import Hasher
from huggingface_hub.errors import LocalEntryNotFoundError

from trainer.config import DataConfig
from trainer.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test", "dev")
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
WIKITEXT_NAMES = ("wikitext", "Salesforce/wikitext")
WIKITEXT_DEFAULT_CONFIG = "wikitext-2-raw-v1"
_TOKENIZE_VERSION = "sdce-tokenize-v1"  # bump when _tokenize_batch changes: it keys the datasets cache


# -- raw text -----------------------------------------------------------------------
def load_text_datasets(cfg: DataConfig, *, seed: int) -> datasets.DatasetDict:
    """The raw text as ``{"train", "eval"}``, both holding ``cfg.text_column``.

    Eval is, in order: ``eval_file`` when given, else the source's first split named
    validation/valid/val/test/dev, else ``eval_split_ratio`` of the train rows split
    off with ``seed``.
    """
    if cfg.dataset_name and cfg.train_file:
        raise ValueError("pass either --dataset or --train_file, not both")
    if cfg.dataset_name:
        source = _load_named(cfg.dataset_name, cfg.dataset_config)
    else:
        source = datasets.DatasetDict(train=_load_files(cfg.train_file))
    train = _train_split(source, cfg)
    if cfg.eval_file:
        eval_set = _load_files(cfg.eval_file)
    elif eval_name := next((name for name in EVAL_SPLIT_NAMES if name in source), None):
        eval_set = source[eval_name]
    else:
        train, eval_set = _split_off_eval(train, cfg.eval_split_ratio, seed)
    splits = datasets.DatasetDict(train=train, eval=eval_set)
    for name, split in splits.items():
        if cfg.text_column not in split.column_names:
            raise ValueError(
                f"the {name} data has no column {cfg.text_column!r}; its columns are {split.column_names}: "
                "pass --text_column with one of them"
            )
    return splits


def _load_named(name: str, config_name: str | None) -> datasets.DatasetDict:
    """A local dataset directory (data files or ``save_to_disk`` output) or a hub dataset."""
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        return datasets.load_dataset(str(path), config_name)
    if path.is_file():
        return datasets.DatasetDict(train=_load_files(str(path)))
    if name in WIKITEXT_NAMES and config_name is None:
        config_name = WIKITEXT_DEFAULT_CONFIG
        log.info("dataset %s: no --dataset_config given, using %s", name, config_name)
    try:
        return datasets.load_dataset(name, config_name)
    # datasets turns offline mode and network failures into ConnectionError; a hub file
    # missing from the local cache while offline surfaces as LocalEntryNotFoundError.
    except (ConnectionError, LocalEntryNotFoundError) as err:
        offline = datasets.config.HF_HUB_OFFLINE
        why = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else "it is unreachable"
        raise ValueError(
            f"dataset {name!r} is not a local directory and the Hugging Face Hub cannot be used: {why} ({err}). "
            "Pass a local dataset directory with --dataset DIR, or local files with --train_file PATH[,PATH] "
            f"({', '.join(sorted(set(BUILDERS)))})"
        ) from err
    except DatasetNotFoundError as err:
        raise ValueError(
            f"dataset {name!r} is neither a local directory nor a dataset on the Hugging Face Hub ({err}): "
            "check the name, or pass --train_file PATH"
        ) from err


def _load_files(spec: str | None) -> datasets.Dataset:
    """One dataset from comma-separated local files of one format (picked by extension)."""
    paths = [Path(p.strip()).expanduser() for p in (spec or "").split(",") if p.strip()]
    if not paths:
        raise ValueError(f"no file named in {spec!r}: pass --train_file PATH[,PATH]")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"data file {str(path)!r} does not exist")
    suffixes = {path.suffix.lower() for path in paths}
    unknown = suffixes - set(BUILDERS)
    if unknown:
        raise ValueError(f"unsupported data file type {sorted(unknown)}: use one of {', '.join(BUILDERS)}")
    if all(path.stat().st_size == 0 for path in paths):
        raise ValueError(f"data file(s) {spec!r} are empty: no rows, 0 tokens; add data")
    builders = {BUILDERS[suffix] for suffix in suffixes}
    if len(builders) > 1:
        raise ValueError(f"files {spec!r} mix formats {sorted(builders)}: give files of one format per option")
    files = [str(path.resolve()) for path in paths]
    return datasets.load_dataset(builders.pop(), data_files={"train": files}, split="train")


def _train_split(source: datasets.DatasetDict, cfg: DataConfig) -> datasets.Dataset:
    if "train" in source:
        return source["train"]
    if len(source) == 1:
        return next(iter(source.values()))
    raise ValueError(f"dataset {cfg.dataset_name!r} has no 'train' split; its splits are {list(source)}")


def _split_off_eval(train: datasets.Dataset, ratio: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    if train.num_rows < 2:
        raise ValueError(
            f"the training data has {train.num_rows} row(s), too few to split off an eval set: "
            "add data or pass --eval_file"
        )
    parts = train.train_test_split(test_size=ratio, seed=seed)
    held_out = parts["test"].num_rows
    log.info("no eval split: held out %d of %d rows (eval_split_ratio=%s)", held_out, train.num_rows, ratio)
    return parts["train"], parts["test"]


# -- tokens and blocks --------------------------------------------------------------
def build_lm_datasets(cfg: DataConfig, tokenizer: Any, *, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Tokenised, packed train and eval sets with columns ``input_ids`` and ``labels``.

    Each row holds ``max_seq_length`` int64 ids (torch format). The train set drops the
    incomplete last block; the eval set keeps it, padding ``input_ids`` with the pad
    (else EOS) id and ``labels`` with IGNORE_INDEX, and stops after ``max_eval_blocks`` blocks.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token: set one (it separates documents)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    raw = load_text_datasets(cfg, seed=seed)
    length = cfg.max_seq_length
    train_tokens, train_stream = _tokenize(raw["train"], tokenizer, cfg, eos_id)
    if len(train_stream) < length + 1:
        raise ValueError(
            f"the training data holds {len(train_stream)} tokens, fewer than one block of max_seq_length={length} "
            "(+1 for the shifted labels): lower --max_seq_length or add more data"
        )
    eval_tokens, eval_stream = _tokenize(raw["eval"], tokenizer, cfg, eos_id)
    if len(eval_stream) < 2:
        raise ValueError(f"the eval data holds {len(eval_stream)} tokens; it needs at least 2: add eval data")
    inputs, labels = pack_blocks(train_stream, length, keep_tail=False, pad_id=pad_id)
    train = _blocks_dataset(inputs, labels, "train", [train_tokens, length])
    inputs, labels = pack_blocks(eval_stream, length, keep_tail=True, pad_id=pad_id)
    recipe = [eval_tokens, length, pad_id, cfg.max_eval_blocks]
    evaluation = _blocks_dataset(inputs[: cfg.max_eval_blocks], labels[: cfg.max_eval_blocks], "eval", recipe)
    log.info(
        "data: train %d tokens -> %d blocks of %d; eval %d tokens -> %d blocks",
        len(train_stream), train.num_rows, length, len(eval_stream), evaluation.num_rows,
    )
    return train.with_format("torch"), evaluation.with_format("torch")


def _tokenize_batch(batch: dict[str, list], *, tokenizer: Any, text_column: str, eos_id: int) -> dict[str, list]:
    """Token ids of each non-blank document, EOS appended; blank rows produce no row."""
    texts = [text for text in batch[text_column] if isinstance(text, str) and text.strip()]
    if not texts:
        return {"input_ids": []}
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return {"input_ids": [doc + [eos_id] for doc in ids]}


def _tokenize(split: datasets.Dataset, tokenizer: Any, cfg: DataConfig, eos_id: int) -> tuple[str, np.ndarray]:
    """The tokenised split's fingerprint and its token stream."""
    # An explicit fingerprint: hashing the tokenizer object itself is not stable across
    # calls, and a stable one lets datasets reuse the cached result on the next run.
    recipe = [split._fingerprint, tokenizer_fingerprint(tokenizer), cfg.text_column, eos_id, _TOKENIZE_VERSION]
    fingerprint = Hasher.hash(recipe)
    tokenized = split.map(
        _tokenize_batch,
        batched=True,
        num_proc=cfg.preprocessing_num_workers,
        remove_columns=split.column_names,
        fn_kwargs={"tokenizer": tokenizer, "text_column": cfg.text_column, "eos_id": eos_id},
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )
    return fingerprint, token_stream(tokenized)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the tokenizer's ids (not its padding/truncation state)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(tokenizer)
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    blob = json.dumps([type(tokenizer).__name__, state], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def token_stream(tokenized: datasets.Dataset) -> np.ndarray:
    """All ids of a tokenised split, documents in row order, as one int32 array."""
    column = tokenized.with_format("arrow")[:].column("input_ids")
    return pc.list_flatten(column).to_numpy().astype(np.int32, copy=False)


def pack_blocks(stream: np.ndarray, length: int, *, keep_tail: bool, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and shifted labels, each (blocks, length), from windows of ``length + 1`` tokens.

    With ``keep_tail`` the last, short window (at least 2 tokens) becomes one more block,
    inputs padded with ``pad_id`` and labels with IGNORE_INDEX.
    """
    full = max(len(stream) - 1, 0) // length
    inputs = stream[: full * length].reshape(full, length)
    labels = stream[1 : full * length + 1].reshape(full, length)
    tail = stream[full * length :]
    if keep_tail and len(tail) >= 2:
        tail_inputs = np.full((1, length), pad_id, dtype=stream.dtype)
        tail_labels = np.full((1, length), IGNORE_INDEX, dtype=stream.dtype)
        tail_inputs[0, : len(tail) - 1] = tail[:-1]
        tail_labels[0, : len(tail) - 1] = tail[1:]
        inputs, labels = np.concatenate([inputs, tail_inputs]), np.concatenate([labels, tail_labels])
    return inputs, labels


def _blocks_dataset(inputs: np.ndarray, labels: np.ndarray, split: str, recipe: list) -> datasets.Dataset:
    """An in-memory dataset over the packed arrays; ``recipe`` (what they derive from) names its fingerprint."""
    length = inputs.shape[1]
    table = pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(inputs.reshape(-1)), length),
            "labels": pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1)), length),
        }
    )
    fingerprint = Hasher.hash([split, *recipe])
    table = datasets.table.InMemoryTable(table)
    return datasets.Dataset(table, split=datasets.NamedSplit(split), fingerprint=fingerprint)


# -- streaming ----------------------------------------------------------------------
DEFAULT_STREAM_EVAL_BLOCKS = 256


def build_streaming_datasets(
    cfg: DataConfig, tokenizer: Any, *, seed: int, rank: int, world_size: int
) -> tuple[datasets.IterableDataset, datasets.Dataset]:
    """This rank's stream of training blocks (``input_ids``, ``labels``, as ``build_lm_datasets``) and a fixed eval set.

    The eval set is ``eval_file``, else the source's validation split, else the documents
    whose text hashes into the ``eval_split_ratio`` share (left out of training): its first
    ``max_eval_blocks`` blocks (default 256), read once at start-up, the same on every rank.
    Each batch of ``stream_batch_documents`` documents is packed alone (EOS after each, windows of
    L + 1 tokens), so a batch's last partial block is dropped.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token: set one (it separates documents)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    splits = _stream_splits(cfg)
    train, held_out = splits["train"], splits.get("eval")
    if held_out is None:  # hold out a share of the documents, decided by their text (every rank agrees)
        threshold = int(cfg.eval_split_ratio * 2**32)
        held_out = train.filter(lambda row: _text_hash(row[cfg.text_column]) < threshold)
        train = train.filter(lambda row: _text_hash(row[cfg.text_column]) >= threshold)
    pack = {"tokenizer": tokenizer, "text_column": cfg.text_column, "eos_id": eos_id, "length": cfg.max_seq_length}
    blocks = datasets.distributed.split_dataset_by_node(train, rank=rank, world_size=world_size).map(
        _pack_batch, batched=True, batch_size=cfg.stream_batch_documents, fn_kwargs=pack,
        remove_columns=list(train.column_names or [cfg.text_column]),
    )
    evaluation = _stream_eval_set(held_out, cfg, pack, pad_id)
    log.info("data: streaming %s (rank %d of %d), eval %d blocks of %d", cfg.dataset_name or cfg.train_file,
             rank, world_size, evaluation.num_rows, cfg.max_seq_length)
    return blocks.with_format("torch"), evaluation


def _stream_splits(cfg: DataConfig) -> dict[str, datasets.IterableDataset]:
    """The raw training stream and, where the source has one, its eval stream (or the eval_file's)."""
    if cfg.dataset_name and cfg.train_file:
        raise ValueError("pass either --dataset or --train_file, not both")
    if cfg.dataset_name and not Path(cfg.dataset_name).expanduser().exists():
        source = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config, streaming=True)
    else:
        source = datasets.IterableDatasetDict(train=_stream_files(cfg.train_file or cfg.dataset_name))
    if "train" not in source:
        raise ValueError(f"dataset {cfg.dataset_name!r} has no 'train' split; its splits are {list(source)}")
    splits = {"train": source["train"]}
    if cfg.eval_file:
        splits["eval"] = _stream_files(cfg.eval_file)
    elif eval_name := next((name for name in EVAL_SPLIT_NAMES if name in source), None):
        splits["eval"] = source[eval_name]
    return splits


def _stream_files(spec: str) -> datasets.IterableDataset:
    """A stream over local files: comma-separated paths or globs (``data/*.jsonl``), or a directory of them."""
    paths: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = Path(part).expanduser()
        matched = sorted(path.parent.glob(path.name)) if any(c in part for c in "*?[") else [path]
        if path.is_dir():
            matched = sorted(p for p in path.iterdir() if p.suffix.lower() in BUILDERS)
        if not matched or not all(p.is_file() for p in matched):
            raise ValueError(f"no data file matches {part!r}: pass existing files, globs or a directory")
        paths += matched
    builders = {BUILDERS.get(p.suffix.lower()) for p in paths}
    if None in builders or len(builders) > 1:
        raise ValueError(f"files of {spec!r} must share one format of {', '.join(BUILDERS)}; got {sorted(map(str, builders))}")
    files = [str(p.resolve()) for p in paths]
    return datasets.load_dataset(builders.pop(), data_files={"train": files}, split="train", streaming=True)


def _text_hash(text: Any) -> int:
    """A stable 32-bit hash of a document's text (which side of the held-out split it falls on)."""
    return int.from_bytes(hashlib.blake2b(str(text).encode(), digest_size=4).digest(), "big")


def _pack_batch(batch: dict[str, list], *, tokenizer: Any, text_column: str, eos_id: int, length: int) -> dict:
    """One batch of documents as training blocks (``pack_blocks`` without a tail)."""
    ids = _tokenize_batch(batch, tokenizer=tokenizer, text_column=text_column, eos_id=eos_id)["input_ids"]
    stream = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32)
    inputs, labels = pack_blocks(stream, length, keep_tail=False, pad_id=eos_id)
    return {"input_ids": inputs.astype(np.int64), "labels": labels.astype(np.int64)}


def _stream_eval_set(held_out: datasets.IterableDataset, cfg: DataConfig, pack: dict, pad_id: int) -> datasets.Dataset:
    """The first max_eval_blocks blocks of the eval stream, kept in memory (the tail padded, as in the map path)."""
    limit = cfg.max_eval_blocks or DEFAULT_STREAM_EVAL_BLOCKS
    tokens: list[int] = []
    for rows in held_out.iter(batch_size=cfg.stream_batch_documents):
        ids = _tokenize_batch(rows, tokenizer=pack["tokenizer"], text_column=cfg.text_column, eos_id=pack["eos_id"])
        tokens += itertools.chain.from_iterable(ids["input_ids"])
        if len(tokens) > limit * cfg.max_seq_length:
            break
    if len(tokens) < 2:
        raise ValueError("the eval stream holds fewer than 2 tokens: pass --eval_file or raise --eval_split_ratio")
    inputs, labels = pack_blocks(np.array(tokens, dtype=np.int32), cfg.max_seq_length, keep_tail=True, pad_id=pad_id)
    recipe = [cfg.dataset_name, cfg.train_file, cfg.eval_file, tokenizer_fingerprint(pack["tokenizer"]), limit]
    return _blocks_dataset(inputs[:limit], labels[:limit], "eval", recipe).with_format("torch")


# -- document masking -----------------------------------------------------------------
def document_positions(input_ids: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """[B, T] position ids that restart at 0 after every boundary token (``boundary`` [B, T] bool: the EOS).

    Given as ``position_ids`` (no attention mask, no cache), transformers' causal mask keeps each
    query within its own document (``masking_utils.find_packed_sequence_indices``); the boundary
    belongs to the document it ends.
    """
    length = input_ids.shape[-1]
    index = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(boundary)
    starts[:, 1:] = boundary[:, :-1]
    start_of_document = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start_of_document


class DocumentPositions:
    """A DataLoader ``collate_fn`` adding ``position_ids`` per document (data.document_mask) to another's batches."""

    def __init__(self, eos_id: int, collate: Any = None):
        self.eos_id = eos_id
        self.collate = collate or torch.utils.data.default_collate

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(self.collate(rows))
        batch["position_ids"] = document_positions(batch["input_ids"], batch["input_ids"] == self.eos_id)
        return batch


def first_blocks(blocks: Any, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` training blocks of a map-style dataset or a stream (read once), stacked:
    ``input_ids`` and ``labels`` [n, T]."""
    if not isinstance(blocks, torch.utils.data.IterableDataset | datasets.IterableDataset):
        rows = [blocks[i] for i in range(min(count, len(blocks)))]
        empty = torch.zeros(0, 0, dtype=torch.long)
        return {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) if rows else empty
                for key in ("input_ids", "labels")}
    rows = list(itertools.islice(iter(blocks), count))
    if not rows:
        raise ValueError("the training stream yields no block: check the data, or lower --max_seq_length")
    return {key: torch.stack([row[key] for row in rows]) for key in ("input_ids", "labels")}
