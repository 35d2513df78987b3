"""Tiny real tokenizers of the three families SDCE aligns, trained locally in milliseconds.

    texts = corpus()                                   # ~50 KB of standard-library docstrings
    gpt2_like = train_byte_level_bpe(texts, 800)       # Ġ = space, <|endoftext|> last
    llama_like = train_sentencepiece_bpe(texts, 800)   # ▁ = space, <0xNN> byte fallback
    bert_like = train_wordpiece(texts, 800)            # ## continuation, lowercased

Each is a transformers fast tokenizer; `vocab_size` is an upper bound (a small corpus
may run out of merges first). Training is deterministic for a given corpus.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

DEFAULT_MODULES = ("collections", "inspect", "json", "string", "textwrap")
_SENTENCEPIECE_SPECIALS = ("<unk>", "<s>", "</s>")
_WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def corpus(modules: Iterable[str] = DEFAULT_MODULES) -> list[str]:
    """Docstrings of the given standard-library modules and of their classes and functions (English, offline)."""
    texts = []
    for name in modules:
        module = importlib.import_module(name)
        texts.append(module.__doc__ or "")
        texts += [obj.__doc__ for obj in vars(module).values() if callable(obj) and isinstance(obj.__doc__, str)]
    return texts


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE over all 256 byte chars, <|endoftext|> (bos = eos = unk) as the last id."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Llama-2 / TinyLlama style: <unk>, <s>, </s> at ids 0-2, <0x00>..<0xFF> at 3-258, then BPE pieces
    over a Metaspace ("▁") pre-tokenizer with byte fallback; encoding prepends <s>."""
    reserved = len(_SENTENCEPIECE_SPECIALS) + 256
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for pieces; use more than {reserved}")
    learned = _learned_pieces(texts, vocab_size - reserved + 1)  # +1: the trainer's own <unk> is dropped
    pieces = [*_SENTENCEPIECE_SPECIALS, *(f"<0x{byte:02X}>" for byte in range(256))]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    for piece in learned["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(merge) for merge in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(list(_SENTENCEPIECE_SPECIALS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _learned_pieces(texts: Iterable[str], vocab_size: int) -> dict:
    """The vocab (pieces in id order) and merges a Metaspace BPE learns from `texts`."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return {"vocab": sorted(model["vocab"], key=model["vocab"].get), "merges": model["merges"]}


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BERT style: lowercasing WordPiece, [PAD] [UNK] [CLS] [SEP] at ids 0-3; encoding wraps in [CLS] ... [SEP]."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(_WORDPIECE_SPECIALS), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
