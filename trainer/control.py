"""A teacher that knows nothing of the text: the control arm of an A/B (knowledge vs regularisation).

``UnigramTeacher`` is a ``SurrogateSource`` whose "prediction" at every position is the
unigram distribution of the training data's base tokens, add-one smoothed: the same soft
target everywhere, whatever the context. Training the base with a guided loss against it
(``surrogate.control: unigram``) gives what the loss does as a regulariser alone; a gain of
the real surrogate beyond it is the surrogate's knowledge of the text (``trainer.ab``).

Its vocabulary is the base tokenizer's own, so the alignment of docs/method.md §1 is the
identity on the base's regular tokens and both alignments (§2, §2b) work as with a surrogate.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch
from torch import Tensor

from surrogate_server.source import SurrogateInfo, TopK
from surrogate_server.vocabulary import VocabularySpec, vocabulary_spec


def count_tokens(blocks: Any, vocab_size: int, batch_rows: int = 4096) -> Tensor:
    """How often each base id occurs in the ``input_ids`` of ``blocks`` (a map-style datasets.Dataset): int64 [V]."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    rows = blocks.with_format("numpy")
    for start in range(0, len(rows), batch_rows):
        ids = np.asarray(rows[start:start + batch_rows]["input_ids"], dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"training ids lie in [{ids.min()}, {ids.max()}], outside the tokenizer's vocabulary "
                             f"[0, {vocab_size}): the data was tokenised with another tokenizer")
        counts += np.bincount(ids, minlength=vocab_size)
    return torch.from_numpy(counts)


class UnigramTeacher:
    """A ``SurrogateSource`` that proposes the same top-k, the add-one smoothed unigram distribution, at every position.

    ``counts``: int [V] occurrences of each id of the base tokenizer's vocabulary (V = its
    ``vocabulary_spec`` size) in the training data; ``log p(v) = log((counts[v] + 1) / (N + V))``
    with N the total count. Ties (ids of equal count) rank by id, lowest first, so answers are
    deterministic. Thread-safe: the answer is fixed; only the request count changes.
    """

    def __init__(self, tokenizer: Any, counts: Tensor):
        self._tokenizer = tokenizer
        self._vocabulary: VocabularySpec = vocabulary_spec(tokenizer)
        size = len(self._vocabulary.tokens)
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.shape != (size,) or (counts < 0).any():
            raise ValueError(f"counts must be {size} non-negative numbers, one per id of the tokenizer's vocabulary; "
                             f"got shape {tuple(counts.shape)}")
        self.vocab_size = size
        logprobs = (counts + 1.0).log() - math.log(counts.sum().item() + size)
        # Descending by log-prob; a stable sort keeps ties in id order.
        self._logprobs, self._order = logprobs.float().sort(descending=True, stable=True)
        self._lock = threading.Lock()
        self._requests = 0

    @classmethod
    def of_blocks(cls, tokenizer: Any, blocks: Any) -> UnigramTeacher:
        """The teacher of the training blocks ``blocks`` (their ``input_ids``), tokenised by ``tokenizer``."""
        return cls(tokenizer, count_tokens(blocks, len(vocabulary_spec(tokenizer).tokens)))

    # -- the SurrogateSource protocol ------------------------------------------------------
    def topk(self, input_ids: Tensor, attention_mask: Tensor, k: int, permitted: Tensor | None = None,
             logprob_floor: float | None = None, position_ids: Tensor | None = None) -> TopK:
        """The ``k`` most frequent permitted ids and their unigram log-probs, at every position.

        ``SurrogateEngine.topk``'s contract: [B, T, k] on ``input_ids``' device, descending, -inf / -1 in empty
        slots; a position that attends to no key (the mask is 0 up to and including it) is an empty row.
        ``logprob_floor`` and ``position_ids`` change nothing: the answer depends on no context.
        """
        self._validate(input_ids, attention_mask, k, permitted, position_ids)
        order, logprobs = self._order, self._logprobs
        if permitted is not None:
            allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
            allowed[: permitted.shape[0]] = permitted.cpu()
            keep = allowed[order]
            order, logprobs = order[keep], logprobs[keep]
        ids = torch.full((k,), -1, dtype=torch.long)
        values = torch.full((k,), float("-inf"), dtype=torch.float32)
        kept = min(k, order.shape[0])
        ids[:kept], values[:kept] = order[:kept], logprobs[:kept]
        batch, length = input_ids.shape
        device = input_ids.device
        empty = (attention_mask.to(device).long().cumsum(dim=-1) == 0).unsqueeze(-1)  # [B, T, 1]
        out_ids = ids.to(device).expand(batch, length, k).masked_fill(empty, -1)
        out_values = values.to(device).expand(batch, length, k).masked_fill(empty, float("-inf"))
        with self._lock:
            self._requests += 1
        return TopK(logprobs=out_values, ids=out_ids)

    def score(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor,
              position_ids: Tensor | None = None) -> Tensor:
        """The unigram log-prob of each target (0 where it is -1 or the position attends to nothing)."""
        by_id = torch.empty_like(self._logprobs).scatter_(0, self._order, self._logprobs)
        out = by_id.to(targets.device)[targets.long().clamp(min=0)]
        attends = attention_mask.to(targets.device).long().cumsum(dim=-1) > 0
        return out.where((targets >= 0) & attends, torch.zeros_like(out))

    def vocabulary(self) -> VocabularySpec:
        return self._vocabulary

    def tokenizer(self) -> Any:
        """The base tokenizer: the teacher "reads" the base's own tokens."""
        return self._tokenizer

    def info(self) -> SurrogateInfo:
        return SurrogateInfo(
            model_id=f"unigram:{getattr(self._tokenizer, 'name_or_path', '') or type(self._tokenizer).__name__}",
            vocab_size=self.vocab_size,
            vocabulary_fingerprint=self._vocabulary.fingerprint(),
            dtype="float32",
            device="cpu",
        )

    def stats(self) -> dict[str, float]:
        """Requests since the previous call."""
        with self._lock:
            requests, self._requests = self._requests, 0
        return {"guidance_requests": float(requests)}

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release."""

    def _validate(self, input_ids: Tensor, attention_mask: Tensor, k: int, permitted: Tensor | None,
                  position_ids: Tensor | None) -> None:
        """ValueError naming the first malformed argument, as ``SurrogateEngine`` checks them."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} "
                             f"must equal input_ids shape {tuple(input_ids.shape)}")
        if position_ids is not None and position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if permitted is not None and (permitted.dtype != torch.bool or permitted.dim() != 1
                                      or permitted.shape[0] > self.vocab_size):
            raise ValueError(f"permitted must be a 1-D bool tensor of length <= {self.vocab_size}, "
                             f"got {permitted.dtype} of shape {tuple(permitted.shape)}")
