"""Tiny real tokenizers of the three families SDCE aligns, trained locally in milliseconds.

    texts = corpus()                                   # ~50 KB of standard-library docstrings
    gpt2_like = train_byte_level_bpe(texts, 800)       # Ġ = space, <|endoftext|> at id 0
    llama_like = train_sentencepiece_bpe(texts, 800)   # ▁ = space, <0xNN> byte fallback
    bert_like = train_wordpiece(texts, 800)            # ## continuation, lowercased

Each is a transformers fast tokenizer; `vocab_size` is an upper bound (a small corpus
may run out of merges first). Training is deterministic for a given corpus. The first
two are the offline demo's own (trainer.demo), so tests exercise what users run.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from trainer import demo

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
    """GPT-2 style: byte-level BPE over all 256 byte chars, <|endoftext|> as bos = eos = unk = pad (the demo's)."""
    return demo.train_byte_level_bpe(list(texts), vocab_size, max_length=1024)


def train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Llama-2 / TinyLlama style: <unk>, <s>, </s> at ids 0-2, <0x00>..<0xFF> at 3-258, then BPE pieces
    over a Metaspace ("▁") pre-tokenizer with byte fallback (the demo's)."""
    return demo.train_sentencepiece_bpe(list(texts), vocab_size, max_length=1024)


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


def local_tokenizers(vocab_size: int) -> dict[str, PreTrainedTokenizerFast]:
    """One tokenizer of each family (byte_level, sentencepiece, wordpiece), trained on corpus()."""
    texts = corpus()
    return {
        "byte_level": train_byte_level_bpe(texts, vocab_size),
        "sentencepiece": train_sentencepiece_bpe(texts, vocab_size),
        "wordpiece": train_wordpiece(texts, vocab_size),
    }
