"""What a surrogate publishes about its vocabulary: token strings, family, special tokens.

A ``VocabularySpec`` is everything a trainer needs to align its base vocabulary with
the surrogate's (``trainer.alignment``) without loading the surrogate: the server sends
it over the wire (the ``Vocabulary`` message of protos/sdce/surrogate/v1), the
in-process engine hands it over directly. ``token_bytes`` says which bytes each
token stands for (docs/method.md §1)::

    spec = vocabulary_spec(tokenizer)
    raw = token_bytes(spec)      # id -> bytes, None for special tokens
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> VocabularySpec:
        return cls.from_dict(json.loads(text))

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


def tokenizer_from_json(tokenizer_json: str, spec: VocabularySpec) -> PreTrainedTokenizerFast:
    """A transformers tokenizer from its ``tokenizer.json`` text and the special-token roles of ``spec``.

    What a trainer rebuilds from a surrogate server's GetVocabulary; ValueError unless its own
    spec equals ``spec`` (same tokens, family, roles).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    roles = {f"{role}_token": spec.tokens[i] for role, i in spec.special_tokens.items()}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), **roles)
    if vocabulary_spec(tokenizer).fingerprint() != spec.fingerprint():
        raise ValueError("the surrogate's tokenizer.json does not match its vocabulary: the server sends a "
                         "tokenizer other than its model's")
    return tokenizer


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
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + i) for i, byte in enumerate(others)}}


_BYTE_TO_CHAR = _gpt2_byte_to_char()
_BYTE_LEVEL_CHARS = frozenset(_BYTE_TO_CHAR.values())
# Maps each table char to the latin-1 char of its byte, so that .encode("latin-1") yields the bytes.
_CHAR_TO_LATIN1 = str.maketrans({char: chr(byte) for byte, char in _BYTE_TO_CHAR.items()})
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_bytes(token: str) -> bytes:
    # Like the tokenizers ByteLevel decoder: a token with a char outside the table (an
    # added token such as "  " stored as plain text) stands for its UTF-8 bytes.
    if _BYTE_LEVEL_CHARS.issuperset(token):
        return token.translate(_CHAR_TO_LATIN1).encode("latin-1")
    return token.encode("utf-8")


def _sentencepiece_bytes(token: str) -> bytes:
    byte_piece = BYTE_PIECE.fullmatch(token)
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
