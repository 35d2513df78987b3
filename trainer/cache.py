"""A guidance cache: the surrogate's answers computed once, read back by later epochs and later runs.

The surrogate's answer to one input row (its ids, attention mask and position ids) depends on nothing
else but what a *namespace* holds: the surrogate's weights (``SurrogateInfo.weights_fingerprint``), its
dtype and vocabulary, the slots asked for (k), the log-prob floor, the permitted set, the alignment scheme
and the surrogate length. So rows are keyed by a hash of their content, inside a directory per namespace
keyed by a hash of the namespace; a changed surrogate, setting or tokenizer pair lands in another directory
and never reads the old one's guidance. ``CachedSource`` wraps any ``SurrogateSource``: hits are read from
the cache, misses go to the surrogate and are stored.

Layout (local disk or a mounted bucket; readable with pyarrow, pandas, duckdb)::

    CACHE_DIR/<namespace id>/
        namespace.json                  what determines the guidance; written last when the namespace is made
        vocabulary.json, tokenizer/     the surrogate's: a run with the surrogate absent aligns with them
        shard-<writer>-<n>.parquet      rows: key (16 B), counts [S] uint8, ids [N] int32, logprobs [N] float32

Rows hold the compact top-k form of the wire (``compact_topk``: per position the count of kept slots,
then those slots' ids and log-probs, exact float32), so a cached answer selects exactly the candidates
the surrogate's would. Writers (ranks, hosts) never share a file: each writes its own shards, each shard
complete when it appears (written aside, then renamed; a torn one does not parse and is skipped), and a
reader lists the directory now and then to pick up the others'. No lock, no shared index file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from surrogate_server.source import SurrogateInfo, SurrogateSource, TopK, compact_topk, expand_topk
from surrogate_server.vocabulary import VocabularySpec, vocabulary_spec

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a row holds changes: old namespaces are then never read
NAMESPACE_FILE = "namespace.json"
SHARD_GLOB = "shard-*.parquet"
Answer = tuple[np.ndarray, np.ndarray, np.ndarray]  # one row's (counts [S], ids [N], logprobs [N])


@dataclass(frozen=True)
class Namespace:
    """Everything besides the input row that determines the surrogate's answer to it."""

    surrogate: str  # model id: for people; the weights decide
    weights: str  # SurrogateInfo.weights_fingerprint
    vocabulary: str  # SurrogateInfo.vocabulary_fingerprint
    vocab_size: int
    dtype: str
    k: int  # slots asked per position (k + 1 for loss_type surrogate)
    logprob_floor: float | None
    permitted: str  # sha256 of the permitted mask's bytes
    alignment: str  # bytes | tokens
    surrogate_length: int | None  # alignment bytes: surrogate tokens per row
    format: int = FORMAT

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:20]

    def info(self) -> SurrogateInfo:
        return SurrogateInfo(self.surrogate, self.vocab_size, self.vocabulary, self.dtype, "cache", self.weights)


def permitted_hash(permitted: Tensor) -> str:
    return hashlib.sha256(permitted.to(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def row_key(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray | None) -> bytes:
    """16-byte content hash of one surrogate input row (its length and whether it has positions included)."""
    digest = hashlib.blake2b(struct.pack("<q?", len(ids), positions is not None), digest_size=16)
    digest.update(np.ascontiguousarray(ids, dtype="<i4").tobytes())
    digest.update(np.ascontiguousarray(mask != 0, dtype=np.uint8).tobytes())
    if positions is not None:
        digest.update(np.ascontiguousarray(positions, dtype="<i4").tobytes())
    return digest.digest()


def namespaces(root: str | Path) -> list[tuple[Path, Namespace]]:
    """The complete namespaces under a cache directory (those whose namespace.json exists), oldest first."""
    found = []
    for manifest in sorted(Path(root).glob(f"*/{NAMESPACE_FILE}"), key=lambda p: p.stat().st_mtime):
        fields = json.loads(manifest.read_text())
        if fields.get("format") == FORMAT:
            found.append((manifest.parent, Namespace(**fields)))
    return found


def cache_bytes(root: str | Path) -> int:
    """Bytes of every file under a cache directory (all namespaces)."""
    return sum(entry.stat().st_size for entry in Path(root).rglob("*") if entry.is_file())


class GuidanceCache:
    """The rows of one namespace: ``get`` answers for keys, ``put`` stores new ones; thread-safe.

    New rows are buffered (and answered from memory) until ``shard_rows`` of them make a shard, or
    ``flush``/``close``. ``max_bytes`` bounds the whole cache directory: a shard that would go past it
    is not written (logged once, counted as dropped), so several writers overshoot by at most a shard each.
    """

    def __init__(self, root: str | Path, namespace: Namespace, *, max_bytes: int,
                 vocabulary: VocabularySpec | None = None, tokenizer: Any = None, shard_rows: int = 256, row_group_rows: int = 16, refresh_seconds: float = 30.0):
        if namespace.k > np.iinfo(np.uint8).max:
            raise ValueError(f"the guidance cache stores per-position counts as uint8: k={namespace.k} asks for "
                             "more than 255 slots; lower surrogate.k")
        self.root = Path(root)
        self.namespace = namespace
        self.dir = self.root / namespace.id
        self.max_bytes = max_bytes
        self.shard_rows, self.row_group_rows, self.refresh_seconds = shard_rows, row_group_rows, refresh_seconds
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._lock = threading.Lock()
        self._index: dict[bytes, tuple[Path, int, int]] = {}  # key -> (shard, row group, row in it)
        self._shards: set[Path] = set()
        self._files: OrderedDict[Path, pq.ParquetFile] = OrderedDict()
        self._groups: OrderedDict[tuple[Path, int], tuple[np.ndarray, ...]] = OrderedDict()
        self._pending: dict[bytes, Answer] = {}
        self._written = 0
        self._full_logged = False
        self._counts = {"hits": 0, "misses": 0, "dropped": 0}  # since the last stats()
        self.totals = dict(self._counts)  # since the start
        self._create(vocabulary, tokenizer)
        self._used = cache_bytes(self.root)
        self._refreshed = -float("inf")
        self._refresh()
        log.info("guidance cache %s: %d rows in %d shards (%.1f MB of the cache's %.1f MB, bound %.1f GB)",
                 self.dir, len(self._index), len(self._shards), self.bytes / 1e6, self._used / 1e6, max_bytes / 1e9)

    # -- the namespace ------------------------------------------------------------------
    def _create(self, vocabulary: VocabularySpec | None, tokenizer: Any) -> None:
        """Make the namespace directory, the surrogate's vocabulary and tokenizer, and (last) namespace.json,
        unless another writer has; each file is written aside and renamed, so none is ever half there."""
        manifest = self.dir / NAMESPACE_FILE
        if manifest.exists():
            return
        if vocabulary is None:
            raise ValueError(f"{self.dir} is a new guidance cache namespace: making it needs the surrogate's vocabulary")
        self.dir.mkdir(parents=True, exist_ok=True)
        aside = self.dir / f".vocabulary.json-{self.writer}"
        aside.write_text(vocabulary.to_json())
        os.replace(aside, self.dir / "vocabulary.json")
        if tokenizer is not None and not (self.dir / "tokenizer").exists():
            aside = self.dir / f".tokenizer-{self.writer}"
            tokenizer.save_pretrained(aside)
            try:
                aside.rename(self.dir / "tokenizer")
            except OSError:  # another writer got there first: theirs is the same tokenizer
                _remove_tree(aside)
        aside = self.dir / f".{NAMESPACE_FILE}-{self.writer}"
        aside.write_text(json.dumps(dataclasses.asdict(self.namespace), indent=2, sort_keys=True))
        os.replace(aside, manifest)

    # -- reading --------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Index the shards other writers have added since the last listing (torn ones are retried later)."""
        self._refreshed = time.monotonic()
        for shard in sorted(set(self.dir.glob(SHARD_GLOB)) - self._shards):
            try:
                self._index_shard(shard)
            except (OSError, pa.ArrowException) as err:
                log.debug("guidance cache: %s not readable yet (%s)", shard.name, err)

    def _index_shard(self, shard: Path) -> None:
        meta = pq.ParquetFile(shard).metadata
        keys = pq.read_table(shard, columns=["key"]).column("key").to_pylist()
        row = 0
        for group in range(meta.num_row_groups):
            for offset in range(meta.row_group(group).num_rows):
                self._index.setdefault(keys[row], (shard, group, offset))
                row += 1
        self._shards.add(shard)

    def _row(self, shard: Path, group: int, offset: int) -> Answer:
        columns = self._group(shard, group)
        return tuple(values[offsets[offset]: offsets[offset + 1]]
                     for offsets, values in zip(columns[::2], columns[1::2]))  # type: ignore[return-value]

    def _group(self, shard: Path, group: int) -> tuple[np.ndarray, ...]:
        """A row group's three list columns as (offsets, values) numpy pairs; the last 64 are kept."""
        key = (shard, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(shard)
            if len(self._files) > 64:
                self._files.popitem(last=False)
        table = self._files[shard].read_row_group(group, columns=["counts", "ids", "logprobs"])
        arrays: list[np.ndarray] = []
        for name in ("counts", "ids", "logprobs"):
            column = table.column(name).combine_chunks()
            arrays += [column.offsets.to_numpy(), column.values.to_numpy()]
        self._groups[key] = tuple(arrays)
        if len(self._groups) > 64:
            self._groups.popitem(last=False)
        return self._groups[key]

    def get(self, keys: list[bytes]) -> list[Answer | None]:
        """The stored answer of each key, None where there is none (counted as hits and misses)."""
        with self._lock:
            if any(key not in self._index and key not in self._pending for key in keys) and \
                    time.monotonic() - self._refreshed >= self.refresh_seconds:
                self._refresh()
            found: list[Answer | None] = []
            for key in keys:
                if key in self._pending:
                    found.append(self._pending[key])
                elif key in self._index:
                    found.append(self._row(*self._index[key]))
                else:
                    found.append(None)
            hits = sum(answer is not None for answer in found)
            self._count(hits=hits, misses=len(keys) - hits)
            return found

    def _count(self, **counts: int) -> None:
        for name, value in counts.items():
            self._counts[name] += value
            self.totals[name] += value

    # -- writing --------------------------------------------------------------------------
    def put(self, key: bytes, answer: Answer) -> None:
        with self._lock:
            if key in self._index or key in self._pending:
                return
            self._pending[key] = answer
            if len(self._pending) >= self.shard_rows:
                self._flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, {}
        table = _shard_table(rows, self.namespace.id)
        shard = self.dir / f"shard-{self.writer}-{self._written:05d}.parquet"
        aside = self.dir / f".{shard.name}.tmp"
        pq.write_table(table, aside, compression="zstd", row_group_size=self.row_group_rows)
        size = aside.stat().st_size
        if self._used + size > self.max_bytes:
            aside.unlink()
            self._count(dropped=len(rows))
            if not self._full_logged:
                log.warning("guidance cache %s is full (%.2f GB of its %.2f GB bound): new guidance is no longer "
                            "stored; raise --guidance_cache_max_gb or remove old namespaces", self.root,
                            self._used / 1e9, self.max_bytes / 1e9)
                self._full_logged = True
            return
        os.replace(aside, shard)
        self._used += size
        self._written += 1
        self._index_shard(shard)

    # -- reporting ------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        """Bytes of this namespace's shards, every writer's."""
        return sum(shard.stat().st_size for shard in self.dir.glob(SHARD_GLOB))

    @property
    def rows(self) -> int:
        with self._lock:
            return len(self._index) + len(self._pending)

    def stats(self) -> dict[str, float]:
        """Rows answered from the cache, missed and dropped (cache full) since the previous call."""
        with self._lock:
            counts, self._counts = self._counts, {name: 0 for name in self._counts}
        return {f"guidance_cache_{name}": float(value) for name, value in counts.items()}

    def close(self) -> None:
        self.flush()


def _shard_table(rows: dict[bytes, Answer], namespace_id: str) -> pa.Table:
    """Buffered rows as an Arrow table of list columns (offsets built once per column, no per-row objects)."""
    columns = {"key": pa.array(list(rows), pa.binary(16))}
    for position, (name, kind) in enumerate((("counts", pa.uint8()), ("ids", pa.int32()), ("logprobs", pa.float32()))):
        parts = [answer[position] for answer in rows.values()]
        offsets = np.zeros(len(parts) + 1, dtype=np.int32)
        np.cumsum([len(part) for part in parts], out=offsets[1:])
        values = pa.array(np.concatenate(parts) if parts else np.zeros(0), kind)
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets), values)
    schema_metadata = {"sdce.namespace": namespace_id, "sdce.format": str(FORMAT)}
    return pa.table(columns).replace_schema_metadata(schema_metadata)


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    path.rmdir()


class StoredSurrogate:
    """The surrogate as a cache namespace remembers it: its tokenizer and vocabulary, no model.

    A run whose every row is cached needs nothing more; ``topk`` (a row the cache lacks) is an error
    that says how to fill the cache.
    """

    def __init__(self, directory: Path, namespace: Namespace):
        self.directory, self.namespace = directory, namespace
        self._spec = VocabularySpec.from_json((directory / "vocabulary.json").read_text())
        self._tokenizer: Any = None
        if self._spec.fingerprint() != namespace.vocabulary:
            raise ValueError(f"the vocabulary stored in {directory} is not the one its guidance was computed "
                             "with: the cache is damaged; remove that directory and precompute again")

    def topk(self, input_ids: Tensor, attention_mask: Tensor, k: int, permitted: Tensor | None = None,
             logprob_floor: float | None = None, position_ids: Tensor | None = None) -> TopK:
        raise ValueError(
            f"the guidance cache {self.directory} has no guidance for {len(input_ids)} of this run's blocks and no "
            "surrogate is configured: run sdce-precompute with this run's config (same data, max_seq_length, "
            "document_mask), or give --surrogate_model / --surrogate_endpoint to compute what is missing")

    def score(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor,
              position_ids: Tensor | None = None) -> Tensor:
        raise ValueError("the surrogate is absent (guidance from the cache alone): it cannot score a text")

    def vocabulary(self) -> VocabularySpec:
        return self._spec

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if not (self.directory / "tokenizer").is_dir():
                raise ValueError(f"the guidance cache {self.directory} holds no surrogate tokenizer (its surrogate "
                                 "had none): use --surrogate_alignment tokens, or name the surrogate")
            self._tokenizer = AutoTokenizer.from_pretrained(self.directory / "tokenizer")
            if vocabulary_spec(self._tokenizer).fingerprint() != self.namespace.vocabulary:
                raise ValueError(f"the tokenizer stored in {self.directory} does not give the vocabulary its "
                                 "guidance was computed with: remove that directory and precompute again")
        return self._tokenizer

    def info(self) -> SurrogateInfo:
        return self.namespace.info()

    def stats(self) -> dict[str, float]:
        return {}

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release."""


def stored_surrogate(root: str | Path, **request: Any) -> StoredSurrogate:
    """The one namespace under ``root`` made for ``request`` (Namespace fields: k, logprob_floor, alignment,
    surrogate_length, optionally surrogate); a ValueError naming the candidates when there is none or several."""
    found = [(path, ns) for path, ns in namespaces(root)
             if all(getattr(ns, name) == value for name, value in request.items())]
    if len(found) != 1:
        held = "; ".join(f"{path.name}: {ns.surrogate} k={ns.k} floor={ns.logprob_floor} {ns.alignment}/"
                         f"{ns.surrogate_length}" for path, ns in namespaces(root)) or "nothing"
        wanted = ", ".join(f"{name}={value}" for name, value in request.items())
        what = "no namespace" if not found else f"{len(found)} namespaces"
        raise ValueError(f"the guidance cache {root} holds {what} for this run ({wanted}); it holds: {held}. "
                         "Precompute it with this run's config (sdce-precompute), or name the surrogate "
                         "(--surrogate_model / --surrogate_endpoint)")
    return StoredSurrogate(*found[0])


class CachedSource:
    """A ``SurrogateSource`` answering from a ``GuidanceCache`` first, asking ``inner`` only for the rows it lacks."""

    def __init__(self, inner: SurrogateSource, cache: GuidanceCache):
        self.inner, self.cache = inner, cache

    def topk(self, input_ids: Tensor, attention_mask: Tensor, k: int, permitted: Tensor | None = None,
             logprob_floor: float | None = None, position_ids: Tensor | None = None) -> TopK:
        namespace = self.cache.namespace
        if (k, logprob_floor) != (namespace.k, namespace.logprob_floor):
            raise ValueError(f"this guidance cache holds k={namespace.k}, floor={namespace.logprob_floor}; "
                             f"asked for k={k}, floor={logprob_floor}")
        ids, mask = input_ids.cpu().numpy(), attention_mask.cpu().numpy()
        positions = position_ids.cpu().numpy() if position_ids is not None else None
        keys = [row_key(ids[b], mask[b], positions[b] if positions is not None else None) for b in range(len(ids))]
        found = self.cache.get(keys)
        missing = [b for b, answer in enumerate(found) if answer is None]
        if missing:
            rows = None if len(missing) == len(keys) else torch.tensor(missing, device=input_ids.device)
            pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows.to(t.device)))
            top = self.inner.topk(pick(input_ids), pick(attention_mask), k, permitted, logprob_floor,
                                  position_ids=pick(position_ids) if position_ids is not None else None)
            top_logprobs, top_ids = top.logprobs.cpu().numpy(), top.ids.cpu().numpy()
            for row, b in enumerate(missing):
                counts, kept_ids, kept_logprobs = compact_topk(top_logprobs[row], top_ids[row], logprob_floor)
                found[b] = (counts.astype(np.uint8), kept_ids, kept_logprobs)
                self.cache.put(keys[b], found[b])
        expanded = [expand_topk(*answer, k) for answer in found]  # type: ignore[misc]
        logprobs = torch.from_numpy(np.stack([lp for lp, _ in expanded])).to(input_ids.device)
        top_ids = torch.from_numpy(np.stack([i for _, i in expanded])).to(input_ids.device)
        return TopK(logprobs=logprobs, ids=top_ids)

    def score(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor,
              position_ids: Tensor | None = None) -> Tensor:
        return self.inner.score(input_ids, attention_mask, targets, position_ids)

    def vocabulary(self) -> VocabularySpec:
        return self.inner.vocabulary()

    def tokenizer(self) -> Any:
        return self.inner.tokenizer()

    def info(self) -> SurrogateInfo:
        return self.inner.info()

    def stats(self) -> dict[str, float]:
        return {**self.inner.stats(), **self.cache.stats()}

    def healthy(self) -> bool:
        return self.inner.healthy()

    def close(self) -> None:
        self.cache.close()
        self.inner.close()
