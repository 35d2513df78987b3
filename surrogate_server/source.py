"""The guidance provider protocol: what a trainer may ask of a surrogate, wherever it runs.

``SurrogateEngine`` (in-process) and ``RemoteSurrogate`` (a client of the surrogate
server) both implement ``SurrogateSource``; the trainer depends on nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from surrogate_server.vocabulary import VocabularySpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Dtype names, as configs (model.dtype, surrogate.dtype, the server's --dtype) and SurrogateInfo.dtype spell them.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on cuda, float32 elsewhere; otherwise a name from TORCH_DTYPES."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    return TORCH_DTYPES[dtype]


class SurrogateUnavailable(RuntimeError):
    """The surrogate could not answer in time (a remote server down past its retry deadline)."""


@dataclass
class TopK:
    """Top-k guidance: ``logprobs`` [B, T, k] float32 over the full surrogate vocabulary, descending,
    -inf in empty slots; ``ids`` [B, T, k] int64 surrogate ids, -1 in empty slots."""

    logprobs: Tensor
    ids: Tensor


@dataclass(frozen=True)
class SurrogateInfo:
    """What a surrogate runs (a subset of the wire's InfoResponse)."""

    model_id: str
    vocab_size: int  # rows of the LM head: ids are in [0, vocab_size)
    vocabulary_fingerprint: str  # VocabularySpec.fingerprint(); "" without a tokenizer
    dtype: str  # a TORCH_DTYPES name
    device: str
    # sha256 over the weights as loaded (names, dtypes, shapes, bytes): what a guidance cache keys on, so new
    # weights under an old name never get old guidance. "" from a server that does not report it.
    weights_fingerprint: str = ""


class SurrogateSource(Protocol):
    """A guidance provider; every method may be called from several threads."""

    def topk(self, input_ids: Tensor, attention_mask: Tensor, k: int, permitted: Tensor | None = None,
             logprob_floor: float | None = None, position_ids: Tensor | None = None) -> TopK:
        """Top-k permitted surrogate ids per position (contract: ``SurrogateEngine.topk``).

        Entries below ``logprob_floor`` need not be returned (a transport saving): the
        caller selects candidates itself. Raises SurrogateUnavailable when it cannot
        answer in time, ValueError for a malformed request.
        """
        ...

    def score(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor,
              position_ids: Tensor | None = None) -> Tensor:
        """[B, T] float32 full-vocabulary log-prob of ``targets`` (-1: none, 0 returned) at each position
        (contract: ``SurrogateEngine.score``): what the teacher check measures the surrogate by."""
        ...

    def vocabulary(self) -> VocabularySpec: ...

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The surrogate's own tokenizer: byte-aligned guidance (docs/method.md §2b) encodes text with it."""
        ...

    def info(self) -> SurrogateInfo: ...

    def stats(self) -> dict[str, float]:
        """Request metrics since the previous call, for the trainer's logs."""
        ...

    def healthy(self) -> bool: ...

    def close(self) -> None: ...


# The compact form of top-k guidance: what travels (surrogate_server.codec) and what a guidance cache stores.
def compact_topk(logprobs: np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor,
                 floor: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[..., k] log-probs and ids -> (counts [...] int64, ids [N] int32, logprobs [N] float32): the kept slots.

    A slot is kept when its log-prob is finite, its id >= 0 and (given a floor) its log-prob
    >= floor. Kept slots move to the front of their position in their original order, so
    ``expand_topk`` restores the input exactly when empty slots form a suffix of each
    position, as in ``SurrogateEngine.topk`` output (descending, empty slots last).
    """
    logprobs = _numpy(logprobs)
    ids = _numpy(ids)
    if logprobs.ndim < 1 or logprobs.shape != ids.shape:
        raise ValueError(f"logprobs and ids must both be [..., k], got {logprobs.shape} and {ids.shape}")
    keep = np.isfinite(logprobs) & (ids >= 0)
    if floor is not None:
        keep &= logprobs >= floor
    if ids.size and ids.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError(f"ids must fit in int32, got max {ids.max()}")
    return keep.sum(axis=-1), ids[keep].astype(np.int32), logprobs[keep].astype(np.float32)


def expand_topk(counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`compact_topk`: (logprobs [..., k] float32, -inf in empty slots; ids [..., k] int64, -1).

    Raises ValueError for a count outside [0, k] or sum(counts) not equal to the number of ids and of log-probs.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and (counts.min() < 0 or counts.max() > k):
        raise ValueError(f"counts must lie in [0, k={k}], got values in [{counts.min()}, {counts.max()}]")
    total = int(counts.sum())
    if not total == len(ids) == len(logprobs):
        raise ValueError(f"sum(counts) = {total} must equal the number of ids ({len(ids)}) "
                         f"and of logprobs ({len(logprobs)})")
    filled = np.arange(k) < counts[..., None]  # [..., k]: the first counts[...] slots
    out_logprobs = np.full(filled.shape, -np.inf, dtype=np.float32)
    out_ids = np.full(filled.shape, -1, dtype=np.int64)
    out_logprobs[filled] = logprobs
    out_ids[filled] = ids
    return out_logprobs, out_ids


def _numpy(array: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(array, Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)
