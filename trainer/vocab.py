"""Vocabulary alignment between the base and the surrogate tokenizer (SDCE.md §1).

Tokens of the two vocabularies are matched by the bytes they stand for, so that
byte-level BPE (GPT-2, Qwen, Llama-3), SentencePiece (Llama-2, TinyLlama) and
WordPiece (BERT) vocabularies meet; special tokens match by role.

    alignment = align_vocabularies(base_tok, surrogate_tok, sample_text=text)
    print(alignment)                      # sizes, mapped counts, coverage
    surrogate_ids = alignment.base_to_surrogate[base_ids]   # -1 where unmapped

The surrogate may live in another process: `vocabulary_spec(tokenizer).to_dict()`
travels as JSON and `align_vocabularies` takes the `VocabularySpec` back in place
of a tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

FAMILIES = ("byte_level", "sentencepiece", "wordpiece")
# Role-matching order: where one id holds several roles (GPT-2's <|endoftext|> is
# bos, eos and unk), the first role in this order that both vocabularies have wins.
# eos comes first because it is the role training targets contain.
ROLES = ("eos", "bos", "pad", "unk")


@dataclass(frozen=True)
class VocabularySpec:
    """What alignment needs to know of one vocabulary; serialisable (a server sends it over the wire)."""

    tokens: list[str]
    """id -> raw token string as stored in the tokenizer's vocab (added tokens included); len == vocab size.
    An id the tokenizer has no token for is ""."""
    family: str
    """One of FAMILIES: how a raw token string stands for bytes."""
    special_tokens: dict[str, int]
    """role -> id for the roles in ROLES the tokenizer has; these ids match by role only."""
    control_ids: list[int] = field(default_factory=list)
    """Sorted ids of the other special tokens (<|im_start|>, [CLS], [MASK]): they stand for no text and never map."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not supported; use one of {FAMILIES}")
        unknown = set(self.special_tokens) - set(ROLES)
        if unknown:
            raise ValueError(f"special token roles {sorted(unknown)} are not supported; use roles among {ROLES}")

    def to_dict(self) -> dict:
        """Plain JSON-ready dict; `from_dict` reverses it."""
        return {
            "tokens": list(self.tokens),
            "family": self.family,
            "special_tokens": dict(self.special_tokens),
            "control_ids": list(self.control_ids),
        }

    @classmethod
    def from_dict(cls, d: dict) -> VocabularySpec:
        """Inverse of `to_dict` (also accepts the dict after a JSON round trip)."""
        return cls(
            tokens=list(d["tokens"]),
            family=d["family"],
            special_tokens={role: int(i) for role, i in d["special_tokens"].items()},
            control_ids=[int(i) for i in d["control_ids"]],
        )

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical JSON encoding; equal specs give equal fingerprints."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def vocabulary_spec(tokenizer: PreTrainedTokenizerBase) -> VocabularySpec:
    """The `VocabularySpec` of a tokenizers-backed ("fast") transformers tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no `tokenizers` backend; load a fast tokenizer "
            "(AutoTokenizer.from_pretrained(name), without use_fast=False)"
        )
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    roles = {role: getattr(tokenizer, f"{role}_token_id") for role in ROLES}
    roles = {role: i for role, i in roles.items() if i is not None}
    control = sorted(
        i for i, added in backend.get_added_tokens_decoder().items() if added.special and i not in roles.values()
    )
    return VocabularySpec(tokens=tokens, family=_family(backend), special_tokens=roles, control_ids=control)


def _family(backend: Tokenizer) -> str:
    """Which of FAMILIES the backend's decoder, pre-tokenizer or model says the tokens belong to."""
    decoder, pre_tokenizer = _parts(backend.decoder), _parts(backend.pre_tokenizer)
    kinds = {part["type"] for part in decoder + pre_tokenizer}
    model = type(backend.model).__name__
    if "ByteLevel" in kinds:
        return "byte_level"
    replaces_metaspace = {"type": "Replace", "pattern": {"String": "▁"}, "content": " "} in decoder
    if "Metaspace" in kinds or (replaces_metaspace and "ByteFallback" in kinds):
        return "sentencepiece"
    if "WordPiece" in kinds or model == "WordPiece":
        return "wordpiece"
    raise ValueError(
        f"cannot tell the vocabulary family of this tokenizer (model {model}, decoder and pre-tokenizer "
        f"parts {sorted(kinds)}); supported families: byte_level (ByteLevel decoder or pre-tokenizer: "
        "GPT-2, Qwen, Llama-3), sentencepiece (Metaspace, or a Replace('▁', ' ') decoder with ByteFallback: "
        "Llama-2, TinyLlama), wordpiece (WordPiece model or decoder: BERT). Pick a tokenizer of one of these."
    )


def _parts(component: object | None) -> list[dict]:
    """A tokenizers decoder / pre-tokenizer as the flat list of its JSON parts (Sequences unrolled)."""
    if component is None:
        return []
    return _flatten(json.loads(component.__getstate__()))


def _flatten(part: dict) -> list[dict]:
    if part["type"] != "Sequence":
        return [part]
    children = part.get("decoders", part.get("pretokenizers", []))
    return [leaf for child in children for leaf in _flatten(child)]


def _gpt2_byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> unicode table: the 188 printable latin-1 bytes stand for themselves, the
    other 68 bytes, in byte order, for chr(256), chr(257), ... (so b" " -> "Ġ", b"\\n" -> "Ċ")."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_TO_CHAR = _gpt2_byte_to_char()
_BYTE_LEVEL_CHARS = frozenset(_BYTE_TO_CHAR.values())
# Maps each table char to the latin-1 char of its byte, so that .encode("latin-1") yields the bytes.
_CHAR_TO_LATIN1 = str.maketrans({char: chr(byte) for byte, char in _BYTE_TO_CHAR.items()})
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_bytes(token: str) -> bytes:
    # Like the tokenizers ByteLevel decoder: a token with a char outside the table (an
    # added token such as "  " stored as plain text) stands for its UTF-8 bytes.
    if _BYTE_LEVEL_CHARS.issuperset(token):
        return token.translate(_CHAR_TO_LATIN1).encode("latin-1")
    return token.encode("utf-8")


def _sentencepiece_bytes(token: str) -> bytes:
    byte_piece = _BYTE_PIECE.fullmatch(token)
    if byte_piece:
        return bytes([int(byte_piece[1], 16)])
    return token.replace("▁", " ").encode("utf-8")


def _wordpiece_bytes(token: str) -> bytes:
    # A word-initial piece follows whitespace when decoded ("the" -> b" the"), so it meets
    # "Ġthe" / "▁the". The decoder's cleanup glues some punctuation to the previous word
    # ("a ." -> "a."); we still count "." as b" .": one fixed reading per piece.
    if token.startswith("##"):
        return token[2:].encode("utf-8")
    return b" " + token.encode("utf-8")


_TO_BYTES: dict[str, Callable[[str], bytes]] = {
    "byte_level": _byte_level_bytes,
    "sentencepiece": _sentencepiece_bytes,
    "wordpiece": _wordpiece_bytes,
}


def token_bytes(spec: VocabularySpec) -> list[bytes | None]:
    """The bytes each id stands for, len == len(spec.tokens); None for special / control tokens and holes.

    byte_level: the inverse GPT-2 byte<->unicode table ("Ġthe" -> b" the").
    sentencepiece: "▁" -> b" ", "<0xNN>" -> that single byte ("▁the" -> b" the", "<0x0A>" -> b"\\n").
    wordpiece: "##x" -> b"x", a word-initial "x" -> b" x".
    """
    to_bytes = _TO_BYTES[spec.family]
    silent = set(spec.special_tokens.values()) | set(spec.control_ids)
    # `or None`: an empty token (a hole in the ids) stands for nothing.
    return [None if i in silent else (to_bytes(token) or None) for i, token in enumerate(spec.tokens)]


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
        """BoolTensor [V_s]: surrogate ids the base can stand for (the set P of SDCE.md §1)."""
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

    SDCE.md §1 says "the lowest id"; in Llama-style vocabularies that would make the
    <0xNN> pieces (ids 3-258) represent "a", ",", "▁" ... although the tokenizer
    always emits the regular piece, so surrogate inputs and candidates would lose
    the most common tokens. Byte-fallback pieces therefore only represent bytes
    that no regular piece stands for.
    """
    reps: dict[bytes, int] = {}
    fallback: dict[bytes, int] = {}
    for i, raw in enumerate(token_bytes(spec)):
        if raw is not None:
            is_fallback = spec.family == "sentencepiece" and _BYTE_PIECE.fullmatch(spec.tokens[i]) is not None
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
