"""Vocabulary alignment between the base and the surrogate tokenizer (docs/method.md §1).

Tokens of the two vocabularies are matched by the bytes they stand for, so that
byte-level BPE (GPT-2, Qwen, Llama-3), SentencePiece (Llama-2, TinyLlama) and
WordPiece (BERT) vocabularies meet; special tokens match by string, then by role.

    alignment = align_vocabularies(base_tok, surrogate_tok, sample_text=text)
    print(alignment)                      # sizes, mapped counts, coverage
    surrogate_ids = alignment.base_to_surrogate[base_ids]   # -1 where unmapped

A surrogate in another process is aligned through its ``VocabularySpec``
(``surrogate_server.vocabulary``), which ``align_vocabularies`` takes in place of a tokenizer.

Byte-aligned surrogate input (docs/method.md §2b): the surrogate reads each block's text
tokenized by its own tokenizer, and base position t is guided by the surrogate position
whose token ends at the same byte as base token t::

    aligner = ByteAligner(base_tok, surrogate_tok, max_surrogate_tokens=S)   # once
    surrogate_ids, surrogate_mask, guide_index = aligner(batch["input_ids"])   # per batch
    aligner.align(batch["input_ids"]).counts(batch["labels"]).guided_share   # what to log
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

from surrogate_server.vocabulary import BYTE_PIECE, ROLES, VocabularySpec, token_bytes, vocabulary_spec
from trainer.losses import IGNORE_INDEX

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


# -- byte-aligned surrogate input (docs/method.md §2b) --------------------------------
# What a surrogate token that stands for no text (an unknown piece) reads as: a byte UTF-8 text never holds,
# so a reading with one never equals the text.
_UNREADABLE = b"\xff"
_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


@dataclass(frozen=True)
class AlignmentCounts:
    """What a trainer logs about byte-aligned guidance."""

    positions: int
    """Labelled base positions (labels != -100; every position when no labels are given)."""
    guided: int
    """Of those, the ones a surrogate position guides (guide_index >= 0)."""
    truncated: int
    """Of those, the ones whose surrogate position lay past max_surrogate_tokens: unguided because S is too small."""

    @property
    def guided_share(self) -> float:
        return self.guided / self.positions if self.positions else 0.0

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.positions if self.positions else 0.0


@dataclass(frozen=True, eq=False)
class ByteAlignedBatch:
    """The surrogate's input for a batch of base blocks and where each base position reads its guidance."""

    surrogate_ids: torch.Tensor
    """LongTensor [B, S]: the surrogate tokenizer's own tokens of each row's text; padding holds its pad (else eos) id."""
    surrogate_mask: torch.Tensor
    """LongTensor [B, S]: 1 on surrogate tokens, 0 on padding."""
    guide_index: torch.Tensor
    """LongTensor [B, T]: s >= 0 where surrogate tokens 0..s read the same text as base tokens 0..t, else -1."""
    truncated: torch.Tensor
    """BoolTensor [B, T]: positions that would be guided if S were larger (their s was cut off)."""
    surrogate_lengths: torch.Tensor
    """LongTensor [B]: surrogate tokens each row's text needs; > S where the row was truncated."""

    def counts(self, labels: torch.Tensor | None = None) -> AlignmentCounts:
        """Guided and truncated positions among the labelled ones (labels [B, T], -100 = no label)."""
        labelled = torch.ones_like(self.truncated) if labels is None else labels != IGNORE_INDEX
        return AlignmentCounts(
            positions=int(labelled.sum()),
            guided=int((labelled & (self.guide_index >= 0)).sum()),
            truncated=int((labelled & self.truncated).sum()),
        )


@dataclass
class _Segments:
    """The texts between boundaries of a batch, as the surrogate reads them; positions and offsets are flat
    (row after row): base position b*T + t, byte offset into the batch's bytes (all rows' bytes in a row)."""

    first: np.ndarray
    """[n] first base position of each segment."""
    stop: np.ndarray
    """[n] one past its last base position."""
    start: np.ndarray
    """[n] byte offset where its text begins (bytes before it that the surrogate does not read are left out)."""
    raws: list[bytes]
    """The bytes the surrogate reads: the base tokens' bytes without broken UTF-8 edges and the base's own space."""
    texts: list[str]
    """raws, decoded."""
    cut: np.ndarray
    """[B] flat base position where each row's surrogate input ends: invalid UTF-8 stopped it (else the row's end)."""


class ByteAligner:
    """Byte-aligned surrogate inputs for packed base blocks (docs/method.md §2b); build once, call per batch
    (usage: the module docstring).

    A row's text is the bytes its base tokens stand for (``token_bytes``). Base ids that stand for
    no bytes (eos, bos, pad, unk, control tokens) are *boundaries*: the text between two of them is
    tokenized on its own, as a document is, by the surrogate's own tokenizer with
    ``add_special_tokens=False`` and special-token strings read as text (``split_special_tokens``).
    A boundary becomes its surrogate partner (the same special-token string, else the same role:
    the pairing of `align_vocabularies`, so GPT-2's ``<|endoftext|>`` meets Qwen's
    ``<|endoftext|>``), and that token guides it: the surrogate then has read every byte before it
    and the same boundary. A boundary without a partner is left out and unguided.

    Base position t is guided by surrogate position s when the surrogate's tokens 0..s read the same
    text as base tokens 0..t. Where the surrogate's tokens spell the text byte for byte (byte-level
    BPE; SentencePiece, whose one leading "▁" per text is its own and not counted), that means
    token s ends at the byte where base token t ends, also inside a character. Where they do not (a
    normalizer rewrote the text: WordPiece lowercasing, NFC on text not in NFC; an unknown piece),
    the candidate is the last surrogate token whose offsets end at or before base token t's end, and
    it is kept only if the surrogate reads base tokens 0..t's text alone the same way (same bytes
    after its normalizer): slow, quadratic in the text's length, and only taken for such texts.

    Bytes the surrogate cannot read stay unguided and out of its input: the tail bytes of a
    character cut by the row's start, the head bytes of one cut by its end (byte-level base tokens
    split characters), and the space a SentencePiece or WordPiece base puts before the first word
    after a boundary (its own, not the document's). Other invalid UTF-8 (only arbitrary ids make it)
    ends the row's surrogate input there. The surrogate reads at most S = max_surrogate_tokens
    tokens; positions whose s lies beyond are unguided and counted as truncated.

    Plain CPU code (numpy and the tokenizers library), picklable: run it in DataLoader workers or
    the data pipeline, never inside a compiled graph.
    """

    def __init__(
        self,
        base_tokenizer: PreTrainedTokenizerBase,
        surrogate_tokenizer: PreTrainedTokenizerBase,
        max_surrogate_tokens: int,
    ) -> None:
        if max_surrogate_tokens < 1:
            raise ValueError(
                f"max_surrogate_tokens={max_surrogate_tokens}: the surrogate needs room for its tokens; "
                "use about the base block length (docs/method.md §2b)"
            )
        base, surrogate = vocabulary_spec(base_tokenizer), vocabulary_spec(surrogate_tokenizer)
        base_raw, surrogate_raw = token_bytes(base), token_bytes(surrogate)
        self.max_surrogate_tokens = max_surrogate_tokens
        self._base_bytes = _ByteTable([raw or b"" for raw in base_raw])
        self._boundary = np.array([raw is None for raw in base_raw], dtype=bool)
        self._partner = np.full(len(base_raw), -1, dtype=np.int64)
        for b, s in _special_pairs(base, surrogate):
            self._partner[b] = s
        probe = base_tokenizer.encode("x", add_special_tokens=False)
        # SentencePiece and WordPiece readings put a space before a word-initial piece: after a
        # boundary (a document's start) that space is the base tokenizer's, not the document's.
        adds_space = self._base_bytes.join(np.array(probe, dtype=np.int64)) == b" x"
        self._own_space = np.array([adds_space and (raw or b"").startswith(b" ") for raw in base_raw], dtype=bool)
        self._surrogate_bytes = _ByteTable([_UNREADABLE if raw is None else raw for raw in surrogate_raw])
        ids = (surrogate_tokenizer.pad_token_id, surrogate_tokenizer.eos_token_id, 0)
        self._pad_id = next(i for i in ids if i is not None)
        backend = surrogate_tokenizer.backend_tokenizer
        self._backend_state = backend.to_str()
        self._form = _unicode_form(backend.normalizer)
        # Where the normalizer is one Unicode normal form, a text already in that form comes out of it
        # unchanged, so an encoder without it gives the same ids and offsets, faster (about a fifth of
        # Qwen's tokenizing time); the encoder with it is then built on the first text that needs it.
        self._plain_encoder = _text_encoder(self._backend_state, normalize=False) if self._form else None

    @functools.cached_property
    def _encoder(self) -> Tokenizer:
        """The surrogate tokenizer (a copy) that reads special-token strings as text; built on first use."""
        return _text_encoder(self._backend_state, normalize=True)

    def __call__(self, base_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(surrogate_ids [B, S], surrogate_mask [B, S], guide_index [B, T]) for base_ids [B, T]."""
        aligned = self.align(base_ids)
        return aligned.surrogate_ids, aligned.surrogate_mask, aligned.guide_index

    def align(self, base_ids: torch.Tensor | np.ndarray) -> ByteAlignedBatch:
        """The surrogate input and guide index of base_ids [B, T] (long), with what counts() needs."""
        ids = self._checked(base_ids)
        batch, length = ids.shape
        flat = ids.ravel()
        sizes = self._base_bytes.lengths[flat]
        ends = np.cumsum(sizes)  # flat byte offset where each base token ends
        boundary = self._boundary[flat]
        blob = self._base_bytes.join(flat)
        starts_segment = _segment_starts(boundary, length)
        segments = self._segments(flat, ends - sizes, ends, boundary, starts_segment, length, blob)
        token_lists = self._encode(segments.texts)
        counts = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
        token_ids = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(counts.sum()))
        reading = self._surrogate_bytes.join(token_ids)

        # The surrogate sequence, piece after piece: a segment's tokens, or a boundary's partner (if any).
        piece = np.flatnonzero(boundary | starts_segment)
        is_segment = ~boundary[piece]
        partner = self._partner[flat[piece[~is_segment]]]
        partner[piece[~is_segment] >= segments.cut[piece[~is_segment] // length]] = -1
        piece_count = np.ones(len(piece), dtype=np.int64)
        piece_count[is_segment] = counts
        piece_count[~is_segment] = partner >= 0
        piece_offset = np.cumsum(piece_count) - piece_count  # flat surrogate index of each piece's first token
        segment_at = piece_offset[is_segment]
        token_at = np.repeat(segment_at - (np.cumsum(counts) - counts), counts) + np.arange(len(token_ids))
        partner_at = piece_offset[~is_segment][partner >= 0]
        sequence = np.empty(int(piece_count.sum()), dtype=np.int64)
        sequence[token_at] = token_ids
        sequence[partner_at] = partner[partner >= 0]

        guide = np.full(len(flat), -1, dtype=np.int64)  # flat surrogate index
        guide[piece[~is_segment][partner >= 0]] = partner_at
        self._match(segments, blob, reading, counts, token_ids, token_at, segment_at, ends, boundary, guide)

        piece_row = piece // length
        row_lengths = np.bincount(piece_row, weights=piece_count, minlength=batch).astype(np.int64)
        row_first = np.cumsum(row_lengths) - row_lengths
        sequence_row = np.repeat(piece_row, piece_count)
        row_position = np.arange(len(sequence)) - row_first[sequence_row]
        size = self.max_surrogate_tokens
        kept = row_position < size
        surrogate_ids = np.full((batch, size), self._pad_id, dtype=np.int64)
        surrogate_ids[sequence_row[kept], row_position[kept]] = sequence[kept]
        mask = np.zeros((batch, size), dtype=np.int64)
        mask[sequence_row[kept], row_position[kept]] = 1
        guided = guide >= 0
        guide[guided] -= row_first[np.flatnonzero(guided) // length]
        truncated = guide >= size
        guide[truncated] = -1
        return ByteAlignedBatch(
            surrogate_ids=torch.from_numpy(surrogate_ids),
            surrogate_mask=torch.from_numpy(mask),
            guide_index=torch.from_numpy(guide.reshape(batch, length)),
            truncated=torch.from_numpy(truncated.reshape(batch, length)),
            surrogate_lengths=torch.from_numpy(row_lengths),
        )

    def _checked(self, base_ids: torch.Tensor | np.ndarray) -> np.ndarray:
        ids = np.asarray(base_ids.cpu() if isinstance(base_ids, torch.Tensor) else base_ids).astype(np.int64)
        if ids.ndim != 2:
            raise ValueError(f"base_ids has shape {tuple(ids.shape)}; pass a batch of blocks [B, T]")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self._boundary)):
            raise ValueError(
                f"base_ids holds ids outside the base vocabulary [0, {len(self._boundary)}): "
                f"min {ids.min()}, max {ids.max()}; pass ids of the base tokenizer the aligner was built with"
            )
        return ids

    def _segments(
        self,
        flat: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        boundary: np.ndarray,
        starts_segment: np.ndarray,
        length: int,
        blob: bytes,
    ) -> _Segments:
        """Each run of non-boundary base tokens as the text the surrogate reads."""
        first = np.flatnonzero(starts_segment)
        breaks = boundary.copy()
        breaks[::length] = True  # a row's start ends the previous row's last segment
        breaks = np.append(np.flatnonzero(breaks), len(flat))
        stop = breaks[np.searchsorted(breaks, first, side="right")]
        start = starts[first] + (self._own_space[flat[first]] & (first % length != 0))
        raws = [blob[a:z] for a, z in zip(start.tolist(), ends[stop - 1].tolist())]
        cut = np.arange(1, len(flat) // length + 1) * length
        try:
            texts = [raw.decode() for raw in raws]
        except UnicodeDecodeError:
            texts = _repair_utf8(raws, start, first, stop, length, cut)
        return _Segments(first=first, stop=stop, start=start, raws=raws, texts=texts, cut=cut)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """The surrogate's ids of each text; texts its Unicode normalizer would not change skip it."""
        if self._plain_encoder is None:
            return [e.ids for e in self._encoder.encode_batch_fast(texts, add_special_tokens=False)]
        normal = [unicodedata.is_normalized(self._form, text) for text in texts]
        plain_texts = [text for text, ok in zip(texts, normal) if ok]
        others = [text for text, ok in zip(texts, normal) if not ok]
        plain = self._plain_encoder.encode_batch_fast(plain_texts, add_special_tokens=False)
        full = self._encoder.encode_batch_fast(others, add_special_tokens=False) if others else []
        plain_ids, full_ids = (e.ids for e in plain), (e.ids for e in full)
        return [next(plain_ids if ok else full_ids) for ok in normal]

    def _match(
        self,
        segments: _Segments,
        blob: bytes,
        reading: bytes,
        counts: np.ndarray,
        token_ids: np.ndarray,
        token_at: np.ndarray,
        segment_at: np.ndarray,
        ends: np.ndarray,
        boundary: np.ndarray,
        guide: np.ndarray,
    ) -> None:
        """guide[t] = the flat surrogate index whose tokens read the same text as base tokens 0..t of t's row.

        blob: the batch's base bytes; reading: the segments' tokens' bytes; counts [n]: tokens of each
        segment; token_ids, token_at: the segments' tokens and their flat surrogate indices; segment_at
        [n]: flat surrogate index of each segment's first token.
        """
        read = np.concatenate([[0], np.cumsum(self._surrogate_bytes.lengths[token_ids])])  # reading before each token
        token_first = np.cumsum(counts) - counts
        read_before, read_after = read[token_first], read[token_first + counts]
        raw_lengths = np.array([len(raw) for raw in segments.raws], dtype=np.int64)
        shift = np.zeros(len(counts), dtype=np.int64)  # 1 where the surrogate put its own "▁" before the text
        exact = np.ones(len(counts), dtype=bool)
        # Nothing left out (the common case): the segments' texts are the batch's bytes.
        spelled_all = blob if raw_lengths.sum() == len(blob) else b"".join(segments.raws)
        if not ((read_after - read_before == raw_lengths).all() and reading == spelled_all):
            for i, raw in enumerate(segments.raws):
                spelled = reading[read_before[i] : read_after[i]]
                if spelled != raw:
                    prepended = spelled[:1] == b" " and spelled[1:] == raw
                    shift[i], exact[i] = prepended, prepended
        # Byte-exact segments: surrogate token ends in flat byte offsets, matched with base token ends.
        token_ends = read[1:] + np.repeat(segments.start - shift - read_before, counts)
        keep = np.repeat(exact, counts) & (token_ends > np.repeat(segments.start, counts))  # a lone "▁" reads no text
        token_ends, at = token_ends[keep], token_at[keep]  # increasing: segments lie in byte order
        text = np.flatnonzero(~boundary)
        if len(token_ends):
            found = np.minimum(np.searchsorted(token_ends, ends[text]), len(token_ends) - 1)
            hit = token_ends[found] == ends[text]
            guide[text[hit]] = at[found[hit]]
        for i in np.flatnonzero(~exact).tolist():
            ids = token_ids[token_first[i] : token_first[i] + counts[i]].tolist()
            spelled = reading[read_before[i] : read_after[i]]
            for t, s in self._verified(segments, i, ids, spelled, ends):
                guide[t] = segment_at[i] + s

    def _verified(
        self, segments: _Segments, i: int, ids: list[int], reading: bytes, ends: np.ndarray
    ) -> list[tuple[int, int]]:
        """(t, s) for segment i, which the surrogate does not spell byte for byte: s (counted within the segment)
        is the last token whose offsets end by base token t's end, kept if the surrogate reads t's text prefix
        alone as it reads tokens 0..s."""
        raw, start = segments.raws[i], int(segments.start[i])
        encoding = self._encoder.encode(segments.texts[i], add_special_tokens=False)
        assert encoding.ids == ids, "the surrogate tokenizer's ids do not repeat"
        if not ids:
            return []
        char_ends = np.cumsum([0, *(len(char.encode()) for char in segments.texts[i])])  # char -> byte offset
        token_ends = np.maximum.accumulate(char_ends[[end for _, end in encoding.offsets]])
        read = np.cumsum(self._surrogate_bytes.lengths[ids])  # reading length after each token
        verified = []
        for t in range(int(segments.first[i]), int(segments.stop[i])):
            cut = int(ends[t]) - start
            s = int(np.searchsorted(token_ends, cut, side="right")) - 1
            if cut <= 0 or cut > len(raw) or s < 0:
                continue
            try:
                prefix = raw[:cut].decode()
            except UnicodeDecodeError:  # inside a character: only a byte-exact reading can tell
                continue
            alone = np.array(self._encoder.encode(prefix, add_special_tokens=False).ids, dtype=np.int64)
            if self._surrogate_bytes.join(alone) == reading[: read[s]]:
                verified.append((t, s))
        return verified


class _ByteTable:
    """The bytes of every id of a vocabulary, end to end, so that a sequence's bytes are one numpy gather."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.lengths = np.array([len(piece) for piece in pieces], dtype=np.int64)
        self._starts = np.cumsum(self.lengths) - self.lengths
        self._buffer = np.frombuffer(b"".join(pieces), dtype=np.uint8)

    def join(self, ids: np.ndarray) -> bytes:
        """b"".join(pieces[i] for i in ids), about 3x faster on long sequences."""
        lengths = self.lengths[ids]
        index = np.repeat(self._starts[ids] - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
        return self._buffer[index].tobytes()


def _segment_starts(boundary: np.ndarray, length: int) -> np.ndarray:
    """[B*T] bool: flat positions where a run of non-boundary tokens begins (rows of `length` positions)."""
    after_boundary = np.ones_like(boundary)
    after_boundary[1:] = boundary[:-1]
    after_boundary[::length] = True
    return ~boundary & after_boundary


def _repair_utf8(
    raws: list[bytes], start: np.ndarray, first: np.ndarray, stop: np.ndarray, length: int, cut: np.ndarray
) -> list[str]:
    """The segments' texts where some are not valid UTF-8; edits raws, start and cut in place.

    A row's first segment loses the tail bytes of a character cut by the row's start, its last
    segment the head bytes of one cut by its end. Other invalid bytes end the row's text there: the
    segment keeps what comes before them, the row's later segments and boundaries are dropped.
    """
    texts = []
    for i, raw in enumerate(raws):
        row = int(first[i]) // length
        if first[i] >= cut[row]:
            raws[i] = b""
            texts.append("")
            continue
        try:
            texts.append(raw.decode())
            continue
        except UnicodeDecodeError:
            pass
        head, tail = _utf8_edges(raw, cut_head=first[i] % length == 0, cut_tail=stop[i] % length == 0)
        raw = raw[head:tail]
        start[i] += head
        try:
            text = raw.decode()
        except UnicodeDecodeError as err:
            raw, text = raw[: err.start], raw[: err.start].decode()
            cut[row] = stop[i]
        raws[i] = raw
        texts.append(text)
    return texts


def byte_aligned_inputs(
    base_ids: torch.Tensor,
    base_tokenizer: PreTrainedTokenizerBase,
    surrogate_tokenizer: PreTrainedTokenizerBase,
    max_surrogate_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(surrogate_ids [B, S] long, surrogate_mask [B, S] long, guide_index [B, T] long) for base_ids [B, T].

    The functional form of `ByteAligner` (see there for the rules), S = max_surrogate_tokens. Its
    tables are built on the first call for a tokenizer pair and S and kept (a few, by identity).
    """
    return _aligner(base_tokenizer, surrogate_tokenizer, max_surrogate_tokens)(base_ids)


@functools.lru_cache(maxsize=4)
def _aligner(
    base_tokenizer: PreTrainedTokenizerBase, surrogate_tokenizer: PreTrainedTokenizerBase, max_surrogate_tokens: int
) -> ByteAligner:
    return ByteAligner(base_tokenizer, surrogate_tokenizer, max_surrogate_tokens)


def _text_encoder(state: str, *, normalize: bool) -> Tokenizer:
    """A tokenizers backend from its JSON state that reads special-token strings as text and never truncates
    or pads; without post-processor (with add_special_tokens=False it adds no ids, it only trims offsets)."""
    encoder = Tokenizer.from_str(state)
    encoder.no_truncation()
    encoder.no_padding()
    encoder.post_processor = None
    if not normalize:
        encoder.normalizer = None
    encoder.encode_special_tokens = True
    return encoder


def _unicode_form(normalizer: object | None) -> str | None:
    """The normalizer's Unicode normal form (NFC, NFD, NFKC, NFKD) where it is just that, else None."""
    kind = None if normalizer is None else json.loads(normalizer.__getstate__())["type"]
    return kind if kind in _UNICODE_FORMS else None


def _utf8_edges(raw: bytes, *, cut_head: bool, cut_tail: bool) -> tuple[int, int]:
    """(start, stop) of raw without the tail of a character cut at its start and the head of one cut at its end."""
    start = 0
    if cut_head:
        while start < min(3, len(raw)) and raw[start] & 0xC0 == 0x80:
            start += 1
    stop = len(raw)
    if cut_tail:
        for i in range(len(raw) - 1, max(start, len(raw) - 4) - 1, -1):
            if raw[i] & 0xC0 != 0x80:  # the last character's first byte: how long should it be?
                need = 1 if raw[i] < 0x80 else 2 if raw[i] < 0xE0 else 3 if raw[i] < 0xF0 else 4
                stop = i if len(raw) - i < need else stop
                break
    return start, stop
