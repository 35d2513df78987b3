"""Byte-aligned surrogate input (docs/method.md §2b): the fast ByteAligner against a slow, obvious
reference, and the byte-prefix contract checked from bytes, on real tokenizers (GPT-2 -> Qwen3)
and on locally trained pairs of the three families, with real text."""

import itertools
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from surrogate_server.vocabulary import token_bytes, vocabulary_spec
from tests.tokenizer_factory import corpus, local_tokenizers
from trainer.alignment import AlignmentCounts, ByteAligner, align_vocabularies, byte_aligned_inputs
from trainer.demo import stdlib_docstrings

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
requires_shared = pytest.mark.skipif(
    not (SHARED / "tokenizers" / "qwen3").is_dir(),
    reason="needs ../shared/data (the real GPT-2 and Qwen3 tokenizers, tinyshakespeare): absent in this clone",
)
VOCAB_SIZE = 1000
# Text that byte-level base tokens split inside characters, and one decomposed (not NFC) line.
MULTILINGUAL = [
    "Ein Überfluß an Käse: naïve café, crème brûlée.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji 🙂🚀👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ signs",
    "Ελληνικά, Русский текст и עברית.",
    "Decomposed: cafe\u0301 nai\u0308ve man\u0303ana.",
]
# Literal special-token strings of all three families, as text.
LITERALS = "Text is text: <|endoftext|> <unk> <s> </s> [UNK] [CLS] [SEP] <|im_end|> end."
LOCAL_PAIRS = [
    ("byte_level", "sentencepiece"),
    ("sentencepiece", "byte_level"),
    ("byte_level", "wordpiece"),
    ("sentencepiece", "wordpiece"),
    ("wordpiece", "byte_level"),
    ("byte_level", "byte_level"),
]


# -- data ----------------------------------------------------------------------------
def pack(tokenizer: PreTrainedTokenizerFast, docs: list[str], length: int, *, step: int | None = None) -> torch.Tensor:
    """Blocks [n, length] of the token stream, EOS after every document (as trainer.data packs them);
    windows every `step` tokens (default: back to back)."""
    encoded = tokenizer(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id  # WordPiece
    stream = [i for doc in encoded for i in [*doc, separator]]
    step = step or length
    return torch.tensor([stream[i : i + length] for i in range(0, len(stream) - length + 1, step)])


@pytest.fixture(scope="module")
def english() -> list[str]:
    """Real English the local tokenizers were not trained on: standard-library docstrings."""
    return corpus(("functools", "pathlib"))


@pytest.fixture(scope="module")
def toks() -> dict[str, PreTrainedTokenizerFast]:
    return local_tokenizers(VOCAB_SIZE)


@pytest.fixture(scope="module")
def real() -> dict[str, PreTrainedTokenizerFast]:
    if not (SHARED / "tokenizers" / "qwen3").is_dir():
        pytest.skip("needs ../shared/data/tokenizers")
    return {name: AutoTokenizer.from_pretrained(SHARED / "tokenizers" / name) for name in ("gpt2", "qwen3")}


@pytest.fixture(scope="module")
def gpt2_qwen3(real) -> ByteAligner:
    return ByteAligner(real["gpt2"], real["qwen3"], max_surrogate_tokens=288)


@pytest.fixture(scope="module")
def gpt2_qwen3_reference(real) -> "Reference":
    return Reference(real["gpt2"], real["qwen3"])


@pytest.fixture(scope="module")
def shakespeare() -> list[str]:
    """tinyshakespeare as trainer.data reads a .txt file: one document per non-blank line."""
    lines = (SHARED / "tinyshakespeare" / "input.txt").read_text().splitlines()
    return [line for line in lines if line.strip()]


# -- the slow, obvious reference -----------------------------------------------------
class Reference:
    """Decode each base token's bytes, tokenize each document's text with the surrogate tokenizer, walk byte ends."""

    def __init__(self, base: PreTrainedTokenizerFast, surrogate: PreTrainedTokenizerFast) -> None:
        self.base, self.surrogate = base, surrogate
        base_spec, surrogate_spec = vocabulary_spec(base), vocabulary_spec(surrogate)
        self.base_bytes, self.surrogate_bytes = token_bytes(base_spec), token_bytes(surrogate_spec)
        # A boundary's partner: the pairing of the vocabulary alignment.
        self.partner = align_vocabularies(base_spec, surrogate_spec, min_coverage=0.0).base_to_surrogate.tolist()
        self.base_adds_space = self.reading_of(base, "x") == b" x"
        self.surrogate_adds_space = self.reading_of(surrogate, "x") == b" x"
        self.surrogate_family = surrogate_spec.family

    def reading_of(self, tokenizer: PreTrainedTokenizerFast, text: str) -> bytes:
        spec_bytes = self.base_bytes if tokenizer is self.base else self.surrogate_bytes
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return b"".join(spec_bytes[i] or b"\xff" for i in ids)

    def encode(self, text: str) -> list[int]:
        return self.surrogate(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def readings(self, text: str) -> list[bytes]:
        """What each surrogate token of the text reads: its bytes; an unknown piece (no bytes) reads as 0xFF and
        the text it covers, so two of them read alike only where they stand for the same text."""
        encoded = self.surrogate(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        return [
            b"\xff" + text[a:z].encode() if self.surrogate_bytes[i] is None else self.surrogate_bytes[i]
            for i, (a, z) in zip(encoded["input_ids"], encoded["offset_mapping"])
        ]

    def __call__(self, row: list[int], size: int) -> tuple[list[int], list[int], set[int]]:
        """(the surrogate ids of the row, untruncated; guide index with truncation at `size`; where partners are)."""
        ids, guide, partners = [], [-1] * len(row), set()
        t = 0
        while t < len(row):
            if self.base_bytes[row[t]] is None:  # a boundary: its partner, which has read the same bytes
                if self.partner[row[t]] >= 0:
                    guide[t] = len(ids)
                    partners.add(len(ids))
                    ids.append(self.partner[row[t]])
                t += 1
                continue
            stop = t
            while stop < len(row) and self.base_bytes[row[stop]] is not None:
                stop += 1
            if not self.segment(row, t, stop, ids, guide):
                break
            t = stop
        return ids, [g if g < size else -1 for g in guide], partners

    def segment(self, row: list[int], first: int, stop: int, ids: list[int], guide: list[int]) -> bool:
        raw = b"".join(self.base_bytes[row[p]] for p in range(first, stop))
        ends = list(itertools.accumulate(len(self.base_bytes[row[p]]) for p in range(first, stop)))
        skip = 0
        if first > 0 and self.base_adds_space and raw.startswith(b" "):
            skip = 1  # the base tokenizer's own space before a document's first word
        if first == 0:
            while skip < min(3, len(raw)) and 0x80 <= raw[skip] < 0xC0:
                skip += 1  # the tail of a character the block's start cut
        keep = len(raw)
        if stop == len(row):
            keep -= incomplete_tail(raw[skip:])
        kept = raw[skip:keep]
        complete = True
        try:
            text = kept.decode()
        except UnicodeDecodeError as err:
            kept, complete = kept[: err.start], False
            text = kept.decode()
        tokens = self.encode(text)
        offset = len(ids)
        ids += tokens
        prefixes = list(itertools.accumulate(self.readings(text), initial=b""))[1:]
        full = b"".join(self.readings(text))
        shift = 0 if full == kept else 1 if full == b" " + kept else None
        for p in range(first, stop):
            cut = ends[p - first] - skip
            if not 0 < cut <= len(kept):
                continue
            if shift is not None:
                target = b" " * shift + kept[:cut]
            else:
                try:
                    target = b"".join(self.readings(kept[:cut].decode()))
                except UnicodeDecodeError:
                    continue
            matches = [i for i, prefix in enumerate(prefixes) if prefix == target]
            if matches:
                guide[p] = offset + matches[-1]
        return complete


def incomplete_tail(raw: bytes) -> int:
    """How many bytes at the end of raw begin a character that is not complete."""
    for back in range(1, min(3, len(raw)) + 1):
        byte = raw[-back]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if back < need else 0
    return 0


# -- the contract, checked from bytes -------------------------------------------------
def check_contract(row: list[int], ids: list[int], guide: list[int], partners: set[int], reference: Reference) -> int:
    """Every guided position t (s = guide[t]): surrogate tokens 0..s and base tokens 0..t read the same text,
    boundary for boundary (partners: the surrogate positions of boundaries); returns how many were checked."""
    checked = 0
    for t, s in enumerate(guide):
        if s < 0:
            continue
        base_units = base_side(row[: t + 1], reference)
        surrogate_units = units(ids[: s + 1], reference.surrogate_bytes, partners)
        assert len(base_units) == len(surrogate_units), (t, s)
        for b, u in zip(base_units, surrogate_units):
            if isinstance(b, int):
                assert reference.partner[b] == u, (t, s)
            else:
                assert same_text(b, u, reference), (t, s, b, u)
        checked += 1
    return checked


def base_side(row: list[int], reference: Reference) -> list[bytes | int]:
    """The base tokens' text and boundaries less what the surrogate is documented not to read: the tail of a
    character the block's start cut, the base's own space after a boundary; a boundary without partner joins
    the texts around it."""
    parts = units(row, reference.base_bytes, set(range(len(row))))
    parts[0] = drop_char_tail(parts[0])
    out = parts[:1]
    for boundary, text in zip(parts[1::2], parts[2::2]):
        if reference.base_adds_space and text.startswith(b" "):
            text = text[1:]
        out += [boundary, text] if reference.partner[boundary] >= 0 else []
        out[-1] += b"" if reference.partner[boundary] >= 0 else text
    return out


def units(ids: list[int], spec_bytes: list[bytes | None], boundaries: set[int]) -> list[bytes | int]:
    """The ids as alternating text and boundaries (tokens without bytes at positions among `boundaries`);
    another token without bytes (an unknown piece) reads as 0xFF."""
    out: list[bytes | int] = [b""]
    for position, i in enumerate(ids):
        raw = spec_bytes[i]
        if raw is None and position in boundaries:
            out += [i, b""]
        else:
            out[-1] += b"\xff" if raw is None else raw
    return out


def drop_char_tail(raw: bytes) -> bytes:
    skip = 0
    while skip < min(3, len(raw)) and 0x80 <= raw[skip] < 0xC0:
        skip += 1
    return raw[skip:]


def same_text(base: bytes, surrogate: bytes, reference: Reference) -> bool:
    """Do the base's bytes and the surrogate's reading stand for the same text (as the surrogate reads text)?"""
    prepends = reference.surrogate_adds_space and not base.startswith(b" ")
    if surrogate in (base, b" " * prepends + base):
        return True
    backend = reference.surrogate.backend_tokenizer
    try:
        normalized = backend.normalizer.normalize_str(base.decode()) if backend.normalizer else base.decode()
    except UnicodeDecodeError:
        return False
    if reference.surrogate_family != "wordpiece":
        return surrogate in (normalized.encode(), b" " * prepends + normalized.encode())
    # WordPiece: no whitespace, an unknown piece ([UNK], read as 0xFF here: it has no bytes) stands for one word.
    pattern = ".+?".join(re.escape(part.decode()) for part in b"".join(surrogate.split()).split(b"\xff"))
    return re.fullmatch(pattern, "".join(normalized.split())) is not None


# -- agreement with the reference ------------------------------------------------------
def assert_agrees(aligner: ByteAligner, reference: Reference, *batches: torch.Tensor) -> dict[str, int]:
    """The aligner's output equals the reference's on every row; every guided position keeps the contract."""
    totals = {"positions": 0, "guided": 0, "checked": 0}
    for blocks in batches:
        for key, value in agreement(aligner, reference, blocks).items():
            totals[key] += value
    assert totals["checked"] == totals["guided"]
    return totals


def agreement(aligner: ByteAligner, reference: Reference, blocks: torch.Tensor) -> dict[str, int]:
    aligned = aligner.align(blocks)
    size = aligner.max_surrogate_tokens
    totals = {"positions": 0, "guided": 0, "checked": 0}
    for b, row in enumerate(blocks.tolist()):
        ids, guide, partners = reference(row, size)
        kept = min(len(ids), size)
        assert aligned.surrogate_lengths[b] == len(ids)
        assert aligned.surrogate_ids[b, :kept].tolist() == ids[:kept], b
        assert aligned.surrogate_mask[b].tolist() == [1] * kept + [0] * (size - kept)
        assert aligned.guide_index[b].tolist() == guide, b
        totals["positions"] += len(row)
        totals["guided"] += sum(g >= 0 for g in guide)
        totals["checked"] += check_contract(row, ids, guide, partners, reference)
    return totals


@requires_shared
def test_gpt2_qwen3_agrees_with_the_reference(real, gpt2_qwen3, gpt2_qwen3_reference, shakespeare):
    docs = stdlib_docstrings(max_docs=12) + shakespeare[:60] + MULTILINGUAL + [LITERALS]
    blocks = pack(real["gpt2"], docs, 64)[:24], pack(real["gpt2"], MULTILINGUAL * 2, 24, step=5)
    totals = assert_agrees(gpt2_qwen3, gpt2_qwen3_reference, *blocks)
    assert totals["guided"] > 0.6 * totals["positions"]  # GPT-2 splits CJK characters into bytes, Qwen3 does not


@pytest.mark.parametrize("pair", LOCAL_PAIRS, ids="->".join)
def test_local_pairs_agree_with_the_reference(toks, english, pair):
    base, surrogate = toks[pair[0]], toks[pair[1]]
    docs = english[:20] + MULTILINGUAL + [LITERALS]
    blocks = pack(base, docs, 48)[:10], pack(base, MULTILINGUAL, 16, step=7)[:10]
    totals = assert_agrees(ByteAligner(base, surrogate, max_surrogate_tokens=64), Reference(base, surrogate), *blocks)
    # Small vocabularies split words in different places; WordPiece also drops whitespace, so base tokens
    # ending in whitespace cannot be guided.
    assert totals["guided"] > 0.5 * totals["positions"]


# -- properties the brief names ----------------------------------------------------------
@requires_shared
def test_gpt2_qwen3_guides_95_percent_of_real_english(real, gpt2_qwen3, shakespeare):
    """Packed 256-token GPT-2 blocks; with S = 288 (1.125 T) nothing is truncated."""
    blocks = pack(real["gpt2"], shakespeare[:6000], 256)[:64]
    counts = gpt2_qwen3.align(blocks).counts()
    assert counts.positions == blocks.numel()
    assert counts.guided_share >= 0.95, counts
    assert counts.truncated == 0, counts


@requires_shared
def test_gpt2_qwen3_guides_most_of_docstrings(real, gpt2_qwen3):
    """Code-like text guides less: Qwen3's pre-tokenizer glues punctuation to what follows ('.\n', '.com',
    '_a'), so GPT-2's '.' or '_' ends where no Qwen3 token does (about 80% guided)."""
    blocks = pack(real["gpt2"], stdlib_docstrings(max_docs=150), 256)[:40]
    counts = gpt2_qwen3.align(blocks).counts()
    assert counts.guided_share >= 0.75, counts
    assert counts.truncated == 0, counts


@requires_shared
def test_surrogate_reads_its_own_tokenization_of_each_document(real, gpt2_qwen3, shakespeare):
    gpt2, qwen3 = real["gpt2"], real["qwen3"]
    docs = shakespeare[100:140] + [LITERALS]
    blocks = pack(gpt2, docs, 128)
    aligned = gpt2_qwen3.align(blocks)
    separator = qwen3.convert_tokens_to_ids("<|endoftext|>")
    gpt2_bytes = token_bytes(vocabulary_spec(gpt2))
    for b, row in enumerate(blocks.tolist()):
        surrogate = aligned.surrogate_ids[b, : aligned.surrogate_mask[b].sum()].tolist()
        base_docs = split(row, gpt2.eos_token_id)
        surrogate_docs = split(surrogate, separator)
        assert len(base_docs) == len(surrogate_docs)
        for base_doc, surrogate_doc in zip(base_docs, surrogate_docs):
            text = b"".join(gpt2_bytes[i] for i in base_doc).decode()
            assert surrogate_doc == qwen3(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        eos = [t for t, i in enumerate(row) if i == gpt2.eos_token_id]
        assert [surrogate[aligned.guide_index[b, t]] for t in eos] == [separator] * len(eos)


def split(ids: list[int], separator: int) -> list[list[int]]:
    docs = [[]]
    for i in ids:
        docs += [[]] if i == separator else []
        docs[-1] += [] if i == separator else [i]
    return docs


@pytest.mark.parametrize("pair", LOCAL_PAIRS, ids="->".join)
def test_literal_special_token_strings_are_text(toks, pair):
    base, surrogate = toks[pair[0]], toks[pair[1]]
    row = base(LITERALS, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    aligned = ByteAligner(base, surrogate, max_surrogate_tokens=96).align(torch.tensor([row]))
    ids = aligned.surrogate_ids[0, : aligned.surrogate_mask[0].sum()].tolist()
    spec = vocabulary_spec(surrogate)
    specials = set(spec.special_tokens.values()) | set(spec.control_ids)
    assert not specials & set(ids)
    expected = Reference(base, surrogate).encode(LITERALS)
    if pair[0] == "byte_level":  # its bytes are the text itself
        assert ids == expected


@requires_shared
def test_gpt2_qwen3_literal_special_strings_are_text(real, gpt2_qwen3):
    row = real["gpt2"](LITERALS, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert real["gpt2"].eos_token_id not in row
    aligned = gpt2_qwen3.align(torch.tensor([row]))
    ids = aligned.surrogate_ids[0, : aligned.surrogate_mask[0].sum()].tolist()
    assert ids == real["qwen3"](LITERALS, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert all(i < 151643 for i in ids)  # no special token of Qwen3
    assert aligned.guide_index[0, -1] == len(ids) - 1


@requires_shared
def test_cut_characters_at_block_edges_stay_unguided(real, gpt2_qwen3):
    """A block starting inside a character: its tail bytes are left out; one ending inside: its head bytes."""
    gpt2, qwen3 = real["gpt2"], real["qwen3"]
    gpt2_bytes = token_bytes(vocabulary_spec(gpt2))
    row = gpt2("東京は日本の首都です", add_special_tokens=False)["input_ids"]
    assert len(row) > len("東京は日本の首都です")  # GPT-2 splits some of these characters
    cut = 0
    for start in range(4):
        for stop in range(len(row) - 3, len(row) + 1):
            block = row[start:stop]
            raw = b"".join(gpt2_bytes[i] for i in block)
            head = len(raw) - len(drop_char_tail(raw))
            tail = incomplete_tail(raw)
            cut += head > 0 or tail > 0
            aligned = gpt2_qwen3.align(torch.tensor([block]))
            ids = aligned.surrogate_ids[0, : aligned.surrogate_mask[0].sum()].tolist()
            assert ids == qwen3(raw[head : len(raw) - tail].decode(), add_special_tokens=False)["input_ids"]
            ends = list(itertools.accumulate(len(gpt2_bytes[i]) for i in block))
            for t, end in enumerate(ends):
                if end <= head or end > len(raw) - tail:
                    assert aligned.guide_index[0, t] == -1
    assert cut > 4


@requires_shared
def test_text_not_in_nfc_is_guided_only_where_the_readings_agree(real, gpt2_qwen3, gpt2_qwen3_reference):
    """Qwen3 normalizes to NFC: 'e' + U+0301 reads as 'é', so the position after 'e' is not guided, the one after
    the accent is."""
    gpt2 = real["gpt2"]
    text = "A cafe\u0301 au lait"
    row = gpt2(text, add_special_tokens=False)["input_ids"]
    pieces = gpt2.convert_ids_to_tokens(row)
    aligned = gpt2_qwen3.align(torch.tensor([row]))
    guide = aligned.guide_index[0].tolist()
    after_e = pieces.index("Ġcafe")
    assert guide[after_e] == -1
    assert guide[after_e + 2] >= 0 and guide[-1] >= 0  # after both bytes of U+0301; the end
    ids = aligned.surrogate_ids[0, : aligned.surrogate_mask[0].sum()].tolist()
    assert ids == real["qwen3"](text, add_special_tokens=False)["input_ids"]
    assert check_contract(row, ids, guide, set(), gpt2_qwen3_reference) == sum(g >= 0 for g in guide)


def test_truncation_is_counted_and_never_guides_past_s(toks, english):
    base, surrogate = toks["byte_level"], toks["sentencepiece"]
    blocks = pack(base, english[:40], 64)[:8]
    full = ByteAligner(base, surrogate, max_surrogate_tokens=160).align(blocks)
    short = ByteAligner(base, surrogate, max_surrogate_tokens=48).align(blocks)
    assert (full.surrogate_lengths <= 160).all() and not full.truncated.any()
    assert (full.surrogate_lengths > 48).any()
    assert torch.equal(short.surrogate_lengths, full.surrogate_lengths)
    assert torch.equal(short.surrogate_ids, full.surrogate_ids[:, :48])
    assert short.guide_index.max() < 48
    assert torch.equal(short.truncated, full.guide_index >= 48)
    assert torch.equal(short.guide_index, torch.where(full.guide_index >= 48, -1, full.guide_index))
    counts = short.counts()
    assert counts.truncated == int((full.guide_index >= 48).sum()) > 0
    assert counts.guided + counts.truncated == full.counts().guided


def test_counts_among_labelled_positions(toks, english):
    base = toks["byte_level"]
    blocks = pack(base, english[:20], 32)[:4]
    aligned = ByteAligner(base, toks["sentencepiece"], max_surrogate_tokens=24).align(blocks)
    labels = blocks.clone()
    labels[:, :5] = -100
    counts = aligned.counts(labels)
    labelled = labels != -100
    assert counts == AlignmentCounts(
        positions=int(labelled.sum()),
        guided=int((labelled & (aligned.guide_index >= 0)).sum()),
        truncated=int((labelled & aligned.truncated).sum()),
    )
    assert counts.truncated > 0
    assert math.isclose(counts.guided_share, counts.guided / counts.positions)
    assert AlignmentCounts(0, 0, 0).guided_share == 0.0


def test_padding_and_pad_id(toks, english):
    base, surrogate = toks["byte_level"], toks["sentencepiece"]  # no pad token: padding holds eos
    blocks = pack(base, english[:4], 8)[:2]
    ids, mask, guide = ByteAligner(base, surrogate, max_surrogate_tokens=40)(blocks)
    assert ids.shape == mask.shape == (2, 40) and guide.shape == blocks.shape
    assert ids.dtype == mask.dtype == guide.dtype == torch.long
    assert (ids[mask == 0] == surrogate.eos_token_id).all()
    assert (mask.sum(1) < 40).all()


def test_arbitrary_ids_never_break_the_contract(toks):
    """Random base ids: invalid UTF-8 anywhere, boundaries anywhere."""
    base, surrogate = toks["byte_level"], toks["sentencepiece"]
    blocks = torch.randint(0, len(base), (6, 40), generator=torch.Generator().manual_seed(0))
    assert_agrees(ByteAligner(base, surrogate, max_surrogate_tokens=80), Reference(base, surrogate), blocks)


def test_functional_form_matches_the_object(toks, english):
    base, surrogate = toks["sentencepiece"], toks["byte_level"]
    blocks = pack(base, english[:10], 32)[:3]
    expected = ByteAligner(base, surrogate, 48)(blocks)
    for got, want in zip(byte_aligned_inputs(blocks, base, surrogate, 48), expected):
        assert torch.equal(got, want)


def test_aligner_pickles_for_dataloader_workers(toks, english):
    base, surrogate = toks["byte_level"], toks["sentencepiece"]
    aligner = ByteAligner(base, surrogate, 48)
    blocks = pack(base, english[:10], 32)[:3]
    again = pickle.loads(pickle.dumps(aligner))
    for got, want in zip(again(blocks), aligner(blocks)):
        assert torch.equal(got, want)


def test_bad_inputs_raise(toks):
    aligner = ByteAligner(toks["byte_level"], toks["sentencepiece"], max_surrogate_tokens=8)
    with pytest.raises(ValueError, match=r"shape \(5,\).*\[B, T\]"):
        aligner(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the base vocabulary"):
        aligner(torch.tensor([[0, VOCAB_SIZE + 5]]))
    with pytest.raises(ValueError, match="max_surrogate_tokens=0"):
        ByteAligner(toks["byte_level"], toks["sentencepiece"], max_surrogate_tokens=0)
