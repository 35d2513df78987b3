"""The teacher check: is the surrogate a better model of this text than the base?

Guidance can only pull the base toward what the surrogate knows; a surrogate no stronger than the base
on the run's text turns SDCE into a costly regulariser (docs/method.md §8).
Losses of models with different tokenizers compare per byte, not per token: nats per byte = the
summed negative log-likelihood of the tokens a model predicts / the bytes those tokens stand for
(``token_bytes``; special tokens stand for none). Both models read the same blocks' text, each in its
own tokenization (the surrogate's from ``ByteAligner``, as guidance is made).
"""

from __future__ import annotations

import torch
from torch import Tensor

from surrogate_server.source import SurrogateSource
from surrogate_server.vocabulary import VocabularySpec, token_bytes, vocabulary_spec
from trainer.alignment import ByteAligner
from trainer.losses import IGNORE_INDEX

# The surrogate should beat the base by at least this share of its nats per byte to count as a teacher.
MARGIN = 0.05


def byte_lengths(vocabulary: VocabularySpec | object) -> Tensor:
    """[V] long: how many bytes of text each id stands for (0 for special tokens)."""
    spec = vocabulary if isinstance(vocabulary, VocabularySpec) else vocabulary_spec(vocabulary)
    return torch.tensor([len(raw or b"") for raw in token_bytes(spec)], dtype=torch.long)


def label_bytes(labels: Tensor, lengths: Tensor) -> Tensor:
    """The bytes the labelled targets of ``labels`` [...] stand for (a 0-dim tensor where ``labels`` is)."""
    labelled = labels != IGNORE_INDEX
    return (lengths.to(labels.device)[labels.clamp(min=0)] * labelled).sum()


@torch.no_grad()
def surrogate_loss(source: SurrogateSource, aligner: ByteAligner, input_ids: Tensor) -> tuple[float, float]:
    """(nats, bytes) of the surrogate predicting the text of base blocks ``input_ids`` [B, T], token by token."""
    s_ids, s_mask, _ = aligner(input_ids.cpu())
    following = s_ids[:, 1:].where(s_mask[:, 1:] == 1, torch.full_like(s_ids[:, 1:], -1))
    targets = torch.cat([following, torch.full_like(s_ids[:, :1], -1)], dim=1)  # position t predicts u_{t+1}
    logprobs = source.score(s_ids, s_mask, targets).cpu()
    lengths = byte_lengths(source.vocabulary())
    predicted = (targets >= 0) & (s_mask == 1)
    return -float(logprobs[predicted].double().sum()), float((lengths[targets.clamp(min=0)] * predicted).sum())


def verdict(surrogate: float, base: float) -> str:
    """A sentence comparing two nats-per-byte figures, saying what to do when the surrogate is not clearly ahead."""
    advantage = 1.0 - surrogate / base
    figures = f"surrogate {surrogate:.4f} vs base {base:.4f} nats/byte ({100 * advantage:+.1f}% for the surrogate)"
    if advantage >= MARGIN:
        return f"the surrogate is the stronger model of this text: {figures}"
    return (f"the surrogate is not clearly stronger than the base on this text: {figures}; guidance can then only "
            "pull the base toward a model no better than itself. Use a stronger or better-matched surrogate, or "
            "measure first with python -m trainer.ab (standard vs surrogate vs kl on your data)")
