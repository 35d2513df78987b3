"""Tiny real models, tokenizers and data for integration tests, built once per session."""

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tests.tokenizer_factory import corpus, train_byte_level_bpe, train_sentencepiece_bpe

SEQ_LEN = 32


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return [t for t in corpus() if t.strip()]


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, texts) -> Path:
    """A GPT-2-shaped base (random init) with a byte-level BPE tokenizer, saved like a hub model."""
    path = tmp_path_factory.mktemp("base")
    tokenizer = train_byte_level_bpe(texts, 600)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # batch-split comparisons need no dropout
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def surrogate_dir(tmp_path_factory, texts) -> Path:
    """A Llama-shaped surrogate (random init) with a SentencePiece-style tokenizer: another family."""
    path = tmp_path_factory.mktemp("surrogate")
    tokenizer = train_sentencepiece_bpe(texts, 700)
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def train_file(tmp_path_factory, texts) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def make_config(base_dir, surrogate_dir, train_file, tmp_path):
    """build_config overrides for a tiny run; pass nested dicts to change anything."""
    from surrogate_server.config_cli import merge
    from trainer.config import build_config

    def make(overrides: dict | None = None, output_dir: Path | None = None):
        defaults = {
            "model": {"name_or_path": str(base_dir)},
            "surrogate": {"name_or_path": str(surrogate_dir), "k": 8, "probability_threshold": 0.0},
            "data": {"train_file": str(train_file), "max_seq_length": SEQ_LEN, "max_eval_blocks": 8},
            "training": {
                "output_dir": str(output_dir or tmp_path / "out"), "max_steps": 6, "per_device_train_batch_size": 4,
                "learning_rate": 3e-3, "logging_steps": 1, "save_steps": None, "progress_bar": False, "device": "cpu",
            },
        }
        return build_config(merge(defaults, overrides or {}))

    return make
