"""Vocabulary alignment between the base and the surrogate tokenizer (docs/method.md §1).

Tokens of the two vocabularies are matched by the bytes they stand for, so that
byte-level BPE (GPT-2, Qwen, Llama-3), SentencePiece (Llama-2, TinyLlama) and
WordPiece (BERT) vocabularies meet; special tokens match by string, then by role.

    alignment = align_vocabularies(base_tok, surrogate_tok, sample_text=text)
    print(alignment)                      # sizes, mapped counts, coverage
    surrogate_ids = alignment.base_to_surrogate[base_ids]   # -1 where unmapped

A surrogate in another process is aligned through its ``VocabularySpec``
(``surrogate_server.vocabulary``), which ``align_vocabularies`` takes in place of a tokenizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from surrogate_server.vocabulary import BYTE_PIECE, ROLES, VocabularySpec, token_bytes, vocabulary_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True, eq=False)
class VocabAlignment:
    """Lookup tables between the two vocabularies; restricted to mapped ids they are a bijection."""

    base_to_surrogate: torch.Tensor
    """LongTensor [V_b]: surrogate id of each base id, -1 = no match."""
    surrogate_to_base: torch.Tensor
    """LongTensor [V_s]: base id of each surrogate id, -1 = no match."""
    coverage: float
    """Share of base tokens of a text sample that map (without a sample: share of base ids that map)."""

    @property
    def permitted(self) -> torch.Tensor:
        """BoolTensor [V_s]: surrogate ids the base can stand for (the set P of docs/method.md §1)."""
        return self.surrogate_to_base != -1

    def to(self, device: torch.device | str) -> VocabAlignment:
        return dataclasses.replace(
            self,
            base_to_surrogate=self.base_to_surrogate.to(device),
            surrogate_to_base=self.surrogate_to_base.to(device),
        )

    def __str__(self) -> str:
        mapped = int((self.base_to_surrogate != -1).sum())
        return (
            f"vocabulary alignment: {mapped} of {len(self.base_to_surrogate)} base ids map to "
            f"{int(self.permitted.sum())} of {len(self.surrogate_to_base)} surrogate ids; "
            f"coverage {self.coverage:.1%}"
        )


def align_vocabularies(
    base_tokenizer: PreTrainedTokenizerBase | VocabularySpec,
    surrogate_tokenizer: PreTrainedTokenizerBase | VocabularySpec,
    *,
    sample_text: str | None = None,
    min_coverage: float = 0.3,
) -> VocabAlignment:
    """Match the two vocabularies by the bytes their tokens stand for; special tokens by string, then role.

    Where several ids of one vocabulary stand for the same bytes, one represents them (the
    lowest regular piece, see _representatives) and the others map to -1. `sample_text` (tokenized with the base tokenizer, so
    that must then be a tokenizer) gives the coverage figure; without it coverage is the
    share of base ids that map. Raises ValueError when nothing maps or coverage < min_coverage.
    """
    base, surrogate = _as_spec(base_tokenizer), _as_spec(surrogate_tokenizer)
    pairs = _special_pairs(base, surrogate) + _byte_pairs(base, surrogate)
    base_ids = torch.tensor([b for b, _ in pairs], dtype=torch.long)
    surrogate_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
    b2s = torch.full((len(base.tokens),), -1, dtype=torch.long).index_put_((base_ids,), surrogate_ids)
    s2b = torch.full((len(surrogate.tokens),), -1, dtype=torch.long).index_put_((surrogate_ids,), base_ids)
    coverage = _coverage(base_tokenizer, b2s, sample_text)
    if not pairs or coverage < min_coverage:
        raise ValueError(
            f"vocabulary alignment too thin: coverage {coverage:.1%} (min_coverage {min_coverage:.1%}), "
            f"{len(pairs)} ids mapped between the base {base.family} vocabulary of {len(base.tokens)} tokens "
            f"and the surrogate {surrogate.family} vocabulary of {len(surrogate.tokens)} tokens. Pick a "
            "surrogate whose tokenizer shares byte-level pieces with the base, or lower min_coverage."
        )
    return VocabAlignment(base_to_surrogate=b2s, surrogate_to_base=s2b, coverage=coverage)


def _as_spec(tokenizer: PreTrainedTokenizerBase | VocabularySpec) -> VocabularySpec:
    return tokenizer if isinstance(tokenizer, VocabularySpec) else vocabulary_spec(tokenizer)


def _special_pairs(base: VocabularySpec, surrogate: VocabularySpec) -> list[tuple[int, int]]:
    """(base id, surrogate id) of the special tokens, each id once: the same token string first, then by role.

    The string comes first so that GPT-2's document separator <|endoftext|> meets Qwen's
    <|endoftext|> (Qwen's pad) rather than Qwen's eos, the chat-turn end <|im_end|>.
    """
    pairs: list[tuple[int, int]] = []

    def add(b: int | None, s: int | None) -> None:
        if b is not None and s is not None and all(b != pb and s != ps for pb, ps in pairs):
            pairs.append((b, s))

    surrogate_by_string = {surrogate.tokens[i]: i for i in sorted(_special_ids(surrogate), reverse=True)}
    for b in sorted(_special_ids(base)):
        add(b, surrogate_by_string.get(base.tokens[b]))
    for role in ROLES:
        add(base.special_tokens.get(role), surrogate.special_tokens.get(role))
    return pairs


def _special_ids(spec: VocabularySpec) -> set[int]:
    return set(spec.special_tokens.values()) | set(spec.control_ids)


def _byte_pairs(base: VocabularySpec, surrogate: VocabularySpec) -> list[tuple[int, int]]:
    """(base id, surrogate id) of the representatives that stand for the same bytes."""
    surrogate_reps = _representatives(surrogate)
    return [(b, surrogate_reps[raw]) for raw, b in _representatives(base).items() if raw in surrogate_reps]


def _representatives(spec: VocabularySpec) -> dict[bytes, int]:
    """bytes -> the id that represents them: the lowest regular piece, else the lowest byte-fallback piece.

    A plain "lowest id" rule (docs/method.md §1) would make Llama-style vocabularies'
    <0xNN> pieces (ids 3-258) represent "a", ",", "▁" ... although the tokenizer
    always emits the regular piece, so surrogate inputs and candidates would lose
    the most common tokens. Byte-fallback pieces therefore only represent bytes
    that no regular piece stands for.
    """
    reps: dict[bytes, int] = {}
    fallback: dict[bytes, int] = {}
    for i, raw in enumerate(token_bytes(spec)):
        if raw is not None:
            is_fallback = spec.family == "sentencepiece" and BYTE_PIECE.fullmatch(spec.tokens[i]) is not None
            (fallback if is_fallback else reps).setdefault(raw, i)
    return {**fallback, **reps}


def _coverage(
    base_tokenizer: PreTrainedTokenizerBase | VocabularySpec, b2s: torch.Tensor, sample_text: str | None
) -> float:
    """Share of the sample's base tokens that map; without a sample, share of base ids that map."""
    mapped = b2s != -1
    if sample_text is None:
        return mapped.float().mean().item()
    if isinstance(base_tokenizer, VocabularySpec):
        raise ValueError("sample_text is tokenized with the base tokenizer: pass the tokenizer, not its VocabularySpec")
    ids = base_tokenizer.encode(sample_text, add_special_tokens=False, verbose=False)
    if not ids:
        raise ValueError("sample_text gives no base tokens; pass a real text sample, or None for the vocab share")
    return mapped[torch.tensor(ids, dtype=torch.long)].float().mean().item()
