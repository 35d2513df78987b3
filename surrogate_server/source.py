"""The guidance provider protocol: what a trainer may ask of a surrogate, wherever it runs.

``SurrogateEngine`` (in-process) and ``RemoteSurrogate`` (a client of the surrogate
server) both implement ``SurrogateSource``; the trainer depends on nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
