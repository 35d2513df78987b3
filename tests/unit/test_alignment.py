"""Vocabulary alignment (docs/method.md §1) on real tokenizers of the three families, trained locally."""

import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tests.tokenizer_factory import corpus, local_tokenizers
from surrogate_server.vocabulary import VocabularySpec, token_bytes, vocabulary_spec
from trainer.alignment import VocabAlignment, align_vocabularies

VOCAB_SIZE = 1000
# Raw token strings of common words in each family (independent of token_bytes).
WORDS = {
    "byte_level": {" the": "Ġthe", " and": "Ġand"},
    "sentencepiece": {" the": "▁the", " and": "▁and"},
    "wordpiece": {" the": "the", " and": "and"},
}
PAIRINGS = [
    ("byte_level", "sentencepiece"),
    ("byte_level", "wordpiece"),
    ("sentencepiece", "byte_level"),
    ("wordpiece", "sentencepiece"),
]


@pytest.fixture(scope="module")
def toks() -> dict[str, PreTrainedTokenizerFast]:
    return local_tokenizers(VOCAB_SIZE)


@pytest.fixture(scope="module")
def sample() -> str:
    """Real English the tokenizers were not trained on."""
    return "\n".join(corpus(("functools", "pathlib")))


@pytest.fixture(scope="module")
def alignments(toks, sample) -> dict[tuple[str, str], VocabAlignment]:
    return {(b, s): align_vocabularies(toks[b], toks[s], sample_text=sample, min_coverage=0.0) for b, s in PAIRINGS}


def _mapped_pairs(alignment: VocabAlignment) -> list[tuple[int, int]]:
    b2s = alignment.base_to_surrogate
    return [(b, int(b2s[b])) for b in torch.nonzero(b2s != -1).flatten().tolist()]


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece", "wordpiece"])
def test_family_of_trained_tokenizers(toks, family):
    spec = vocabulary_spec(toks[family])
    assert spec.family == family
    assert len(spec.tokens) == len(toks[family])


def _wrap(model: models.Model, *, decoder=None, pre_tokenizer=None, normalizer=None) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(model)
    tokenizer.decoder, tokenizer.pre_tokenizer, tokenizer.normalizer = decoder, pre_tokenizer, normalizer
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _tiny_bpe() -> models.BPE:
    return models.BPE(vocab={"<unk>": 0, "a": 1, "b": 2}, merges=[], unk_token="<unk>")


@pytest.mark.parametrize(
    "tokenizer, family",
    [
        # Llama-3: regex Split then ByteLevel without its own regex.
        (
            lambda: _wrap(
                _tiny_bpe(),
                pre_tokenizer=pre_tokenizers.Sequence(
                    [pre_tokenizers.Split(" ", "isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
                ),
                decoder=decoders.ByteLevel(),
            ),
            "byte_level",
        ),
        # Original Llama-2 tokenizer.json: normalizer does the ▁, decoder Replace + ByteFallback.
        (
            lambda: _wrap(
                _tiny_bpe(),
                normalizer=normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
                decoder=decoders.Sequence(
                    [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
                ),
            ),
            "sentencepiece",
        ),
        # T5-like Unigram with a Metaspace decoder only.
        (
            lambda: _wrap(models.Unigram([("<unk>", 0.0), ("▁a", -1.0)], 0), decoder=decoders.Metaspace()),
            "sentencepiece",
        ),
        # WordPiece model without a decoder.
        (lambda: _wrap(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), "wordpiece"),
    ],
)
def test_family_from_decoder_pre_tokenizer_or_model(tokenizer, family):
    assert vocabulary_spec(tokenizer()).family == family


def test_unsupported_tokenizer_model_raises():
    word_level = _wrap(
        models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"), pre_tokenizer=pre_tokenizers.Whitespace()
    )
    with pytest.raises(ValueError, match="supported families: byte_level .* sentencepiece .* wordpiece"):
        vocabulary_spec(word_level)


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece", "wordpiece"])
def test_token_bytes_agree_with_the_tokenizers_decoder(toks, family):
    """Decoding "x" + token with the tokenizer's own decoder gives "x" + the token's bytes
    (valid UTF-8 only; for WordPiece alphanumeric pieces only, see _wordpiece_bytes)."""
    spec = vocabulary_spec(toks[family])
    decoder = toks[family].backend_tokenizer.decoder
    checked = 0
    for token, raw in zip(spec.tokens, token_bytes(spec)):
        if raw is None or (family == "wordpiece" and not token.removeprefix("##").isalnum()):
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert decoder.decode(["x", token]) == "x" + text, token
        checked += 1
    assert checked > VOCAB_SIZE // 2


def test_special_and_control_tokens_stand_for_no_bytes(toks):
    spec = vocabulary_spec(toks["wordpiece"])
    assert spec.special_tokens == {"pad": 0, "unk": 1}
    assert spec.control_ids == [2, 3]  # [CLS], [SEP]
    assert token_bytes(spec)[:4] == [None] * 4


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_mapped_pairs_stand_for_the_same_bytes(toks, alignments, pairing):
    base, surrogate = (vocabulary_spec(toks[f]) for f in pairing)
    base_bytes, surrogate_bytes = token_bytes(base), token_bytes(surrogate)
    shared_roles = base.special_tokens.keys() & surrogate.special_tokens.keys()
    roles = {(base.special_tokens[r], surrogate.special_tokens[r]) for r in shared_roles}
    pairs = _mapped_pairs(alignments[pairing])
    assert len(pairs) > 200
    for b, s in pairs:
        assert (b, s) in roles or (base_bytes[b] is not None and base_bytes[b] == surrogate_bytes[s])


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_mapping_is_a_bijection_on_mapped_ids(alignments, pairing):
    b2s, s2b = alignments[pairing].base_to_surrogate, alignments[pairing].surrogate_to_base
    mapped_b, mapped_s = b2s != -1, s2b != -1
    assert torch.equal(s2b[b2s[mapped_b]], torch.nonzero(mapped_b).flatten())
    assert torch.equal(b2s[s2b[mapped_s]], torch.nonzero(mapped_s).flatten())
    assert torch.equal(alignments[pairing].permitted, mapped_s)


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("word", [" the", " and"])
def test_common_words_map_across_families(toks, alignments, pairing, word):
    base, surrogate = pairing
    base_id = toks[base].convert_tokens_to_ids(WORDS[base][word])
    surrogate_id = toks[surrogate].convert_tokens_to_ids(WORDS[surrogate][word])
    assert alignments[pairing].base_to_surrogate[base_id] == surrogate_id


def test_byte_fallback_pieces_map_to_single_byte_tokens(toks, alignments):
    """Every single byte maps: to the regular piece for that byte when the vocabulary has one, else to <0xNN>."""
    b2s = alignments[("byte_level", "sentencepiece")].base_to_surrogate
    llama_like = toks["sentencepiece"]
    for byte, char in bytes_to_unicode().items():
        regular = llama_like.get_vocab().get(bytes([byte]).decode("latin-1").replace(" ", "▁")) if byte < 128 else None
        byte_piece = llama_like.convert_tokens_to_ids(f"<0x{byte:02X}>")
        assert b2s[toks["byte_level"].convert_tokens_to_ids(char)] == (regular if regular is not None else byte_piece)


def test_special_tokens_match_by_role(toks, alignments):
    gpt2_like, llama_like = toks["byte_level"], toks["sentencepiece"]
    alignment = alignments[("byte_level", "sentencepiece")]
    assert alignment.base_to_surrogate[gpt2_like.eos_token_id] == llama_like.eos_token_id
    # <|endoftext|> is also GPT-2's bos and unk, but one id maps once: <s> and <unk> stay unmapped.
    assert alignment.surrogate_to_base[llama_like.bos_token_id] == -1
    assert alignment.surrogate_to_base[llama_like.unk_token_id] == -1
    # [CLS] / [SEP] have no role: they never map.
    bert_like = toks["wordpiece"]
    assert alignments[("wordpiece", "sentencepiece")].base_to_surrogate[bert_like.cls_token_id] == -1


def test_lowest_id_represents_duplicates():
    base = VocabularySpec(["Ġthe", "x", "Ġ", "<|endoftext|>", "Ġthe"], "byte_level", {"eos": 3})
    surrogate = VocabularySpec(
        ["<unk>", "<s>", "</s>", "▁", "<0x20>", "▁the", "x", "<0x78>"],
        "sentencepiece",
        {"unk": 0, "bos": 1, "eos": 2},
    )
    alignment = align_vocabularies(base, surrogate)
    assert alignment.base_to_surrogate.tolist() == [5, 6, 3, 2, -1]
    assert alignment.surrogate_to_base.tolist() == [-1, -1, 3, 2, -1, 0, 1, -1]
    assert alignment.coverage == pytest.approx(4 / 5)


def test_regular_pieces_win_over_their_byte_fallback_twins(toks, alignments):
    """Trained SentencePiece vocabularies hold "a" beside the lower <0x61>; the tokenizer emits "a", so "a" represents b"a"."""
    llama_like = toks["sentencepiece"]
    s2b = alignments[("byte_level", "sentencepiece")].surrogate_to_base
    assert s2b[llama_like.convert_tokens_to_ids("a")] == toks["byte_level"].convert_tokens_to_ids("a")
    assert s2b[llama_like.convert_tokens_to_ids("<0x61>")] == -1


_PIECES = st.sampled_from(["▁", "a", "b", "▁a", "ab", "▁ab", "<0x61>", "<0x20>", "<0x62>"])


@settings(max_examples=60, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=12), st.lists(_PIECES, min_size=1, max_size=12))
def test_alignment_rules_on_random_vocabularies(base_tokens, surrogate_tokens):
    base = VocabularySpec(base_tokens, "sentencepiece", {})
    surrogate = VocabularySpec(surrogate_tokens, "sentencepiece", {})
    base_bytes, surrogate_bytes = token_bytes(base), token_bytes(surrogate)
    assume(set(base_bytes) & set(surrogate_bytes))  # disjoint vocabularies raise (tested below)
    alignment = align_vocabularies(base, surrogate, min_coverage=0.0)
    b2s, s2b = alignment.base_to_surrogate.tolist(), alignment.surrogate_to_base.tolist()

    def representative(tokens, raw_bytes, raw):
        """The lowest regular piece standing for raw, else the lowest <0xNN> piece."""
        ids = [i for i, r in enumerate(raw_bytes) if r == raw]
        regular = [i for i in ids if not tokens[i].startswith("<0x")]
        return (regular or ids)[0] if ids else -1

    for b, raw in enumerate(base_bytes):
        is_rep = representative(base_tokens, base_bytes, raw) == b
        expected = representative(surrogate_tokens, surrogate_bytes, raw) if is_rep else -1
        assert b2s[b] == expected
    for s, b in enumerate(s2b):
        assert b == -1 or b2s[b] == s
    assert sum(v != -1 for v in b2s) == sum(v != -1 for v in s2b)


def test_coverage_is_the_mapped_share_of_sample_tokens(toks, alignments, sample):
    base_bytes = token_bytes(vocabulary_spec(toks["byte_level"]))
    surrogate_bytes = set(token_bytes(vocabulary_spec(toks["sentencepiece"]))) - {None}
    ids = toks["byte_level"].encode(sample, add_special_tokens=False)
    mapped = 0
    for i in ids:
        raw = base_bytes[i]
        if raw is not None and raw in surrogate_bytes and base_bytes.index(raw) == i:
            mapped += 1
    coverage = alignments[("byte_level", "sentencepiece")].coverage
    assert coverage == pytest.approx(mapped / len(ids))
    assert 0.3 < coverage < 1.0


def test_coverage_without_sample_is_the_mapped_share_of_base_ids(toks):
    alignment = align_vocabularies(vocabulary_spec(toks["byte_level"]), toks["sentencepiece"])
    mapped = sum(1 for s in alignment.base_to_surrogate.tolist() if s != -1)
    assert alignment.coverage == pytest.approx(mapped / len(toks["byte_level"]))


def test_sample_text_needs_the_base_tokenizer(toks, sample):
    with pytest.raises(ValueError, match="pass the tokenizer"):
        align_vocabularies(vocabulary_spec(toks["byte_level"]), toks["sentencepiece"], sample_text=sample)


def test_disjoint_vocabularies_raise():
    base = VocabularySpec(["Ġfish", "Ġbird"], "byte_level", {})
    surrogate = VocabularySpec(["<unk>", "▁cat", "▁dog"], "sentencepiece", {"unk": 0})
    with pytest.raises(ValueError, match=r"coverage 0\.0%.*byte_level vocabulary of 2 tokens.*sentencepiece"):
        align_vocabularies(base, surrogate, min_coverage=0.0)


def test_low_coverage_raises_with_the_figure(toks, sample, alignments):
    coverage = alignments[("byte_level", "wordpiece")].coverage
    with pytest.raises(ValueError, match=rf"coverage {coverage:.1%}.*lower min_coverage"):
        align_vocabularies(toks["byte_level"], toks["wordpiece"], sample_text=sample, min_coverage=0.99)


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece", "wordpiece"])
def test_spec_round_trips_through_json(toks, family):
    spec = vocabulary_spec(toks[family])
    again = VocabularySpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.fingerprint() == spec.fingerprint()
    changed = VocabularySpec([*spec.tokens[:-1], "changed"], spec.family, spec.special_tokens, spec.control_ids)
    assert changed.fingerprint() != spec.fingerprint()


def test_a_remote_spec_aligns_like_the_tokenizer(toks, alignments, sample):
    """The trainer gets the surrogate's spec from a server, as JSON."""
    wire = json.dumps(vocabulary_spec(toks["sentencepiece"]).to_dict())
    remote = align_vocabularies(
        toks["byte_level"], VocabularySpec.from_dict(json.loads(wire)), sample_text=sample, min_coverage=0.0
    )
    local = alignments[("byte_level", "sentencepiece")]
    assert torch.equal(remote.base_to_surrogate, local.base_to_surrogate)
    assert torch.equal(remote.surrogate_to_base, local.surrogate_to_base)
    assert remote.coverage == local.coverage


def test_spec_rejects_unknown_family_and_roles():
    with pytest.raises(ValueError, match="family 'tiktoken'"):
        VocabularySpec(["a"], "tiktoken", {})
    with pytest.raises(ValueError, match="roles"):
        VocabularySpec(["a"], "byte_level", {"cls": 0})


def test_alignment_tensors_and_summary(alignments):
    alignment = alignments[("byte_level", "sentencepiece")]
    moved = alignment.to("cpu")
    assert moved.base_to_surrogate.dtype == torch.long and moved.surrogate_to_base.dtype == torch.long
    assert moved.permitted.dtype == torch.bool and moved.permitted.shape == (VOCAB_SIZE,)
    assert moved.coverage == alignment.coverage
    summary = str(alignment)
    assert f"of {VOCAB_SIZE} base ids" in summary and f"coverage {alignment.coverage:.1%}" in summary


def test_special_tokens_with_the_same_string_match_before_roles():
    """GPT-2's <|endoftext|> (its eos) meets Qwen's <|endoftext|> (Qwen's pad), not Qwen's eos <|im_end|>."""
    gpt2_like = VocabularySpec(["Ġthe", "<|endoftext|>"], "byte_level", {"eos": 1, "bos": 1, "unk": 1})
    qwen_like = VocabularySpec(
        ["Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"], "byte_level", {"pad": 1, "eos": 3}, control_ids=[2]
    )
    alignment = align_vocabularies(gpt2_like, qwen_like, min_coverage=0.0)
    assert alignment.base_to_surrogate.tolist() == [0, 1]
    assert alignment.surrogate_to_base.tolist() == [0, 1, -1, -1]
