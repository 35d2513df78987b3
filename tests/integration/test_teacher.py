"""The teacher check and eval nats per byte against slow references written here."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.alignment import ByteAligner
from trainer.data import build_lm_datasets
from trainer.losses import IGNORE_INDEX
from trainer.tracking import read_metrics
from trainer.train import TEACHER_BLOCKS, train

pytestmark = pytest.mark.slow


def text_bytes(tokenizer, ids) -> int:
    """Bytes of the text ``ids`` stand for, special tokens left out (byte-level BPE decodes exactly)."""
    return len(tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).encode("utf-8"))


def test_teacher_check_and_eval_nats_per_byte_match_slow_references(make_config, base_dir, surrogate_dir, caplog):
    config = make_config({"training": {"max_steps": 2}})
    with caplog.at_level(logging.WARNING, logger="trainer"):
        train(config)
    teacher, = read_metrics(config.training.output_dir, "teacher")
    evaluation = read_metrics(config.training.output_dir, "eval")[-1]

    base_tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _, eval_set = build_lm_datasets(config.data, base_tokenizer, seed=config.training.seed)
    rows = eval_set[: min(TEACHER_BLOCKS, len(eval_set))]
    ids, labels = torch.as_tensor(rows["input_ids"]), torch.as_tensor(rows["labels"])
    # The base at step 0: its saved initial weights; nats over the labelled targets, bytes of their text.
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(base(input_ids=ids).logits.double(), dim=-1)
    labelled = labels != IGNORE_INDEX
    nats = -logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1))[..., 0][labelled].sum().item()
    base_bytes = sum(text_bytes(base_tokenizer, row[mask]) for row, mask in zip(labels, labelled))
    assert teacher["base_nats_per_byte"] == pytest.approx(nats / base_bytes, rel=1e-5)

    # The surrogate reads each block's text in its own tokenization and predicts token after token.
    surrogate_tokenizer = AutoTokenizer.from_pretrained(surrogate_dir)
    surrogate = AutoModelForCausalLM.from_pretrained(surrogate_dir).eval()
    length = 8 * -(-int(config.surrogate.length_ratio * config.data.max_seq_length) // 8)
    s_ids, s_mask, _ = ByteAligner(base_tokenizer, surrogate_tokenizer, max_surrogate_tokens=length)(ids)
    with torch.no_grad():
        s_logprobs = torch.log_softmax(surrogate(input_ids=s_ids, attention_mask=s_mask).logits.double(), dim=-1)
    s_nats = s_bytes = 0.0
    for b in range(len(s_ids)):
        n = int(s_mask[b].sum())  # real tokens come first, padding after
        tokens = s_ids[b, :n]
        s_nats -= s_logprobs[b, torch.arange(n - 1), tokens[1:]].sum().item()
        # The bytes of tokens 1..n-1: the block's text minus its first token's (where nothing was cut, the
        # surrogate's tokens spell out exactly the base block's text).
        whole = text_bytes(base_tokenizer, ids[b])
        first = len(surrogate_tokenizer.decode(tokens[:1].tolist(), skip_special_tokens=True).encode())
        s_bytes += whole - first
    # The product counts a SentencePiece surrogate's dummy-prefix space at each document start as a byte of
    # text (its token stands for " word"): 0.15% more bytes here, well inside the check's 5% margin.
    assert teacher["surrogate_nats_per_byte"] == pytest.approx(s_nats / s_bytes, rel=5e-3)
    assert teacher["surrogate_advantage"] == pytest.approx(
        1 - teacher["surrogate_nats_per_byte"] / teacher["base_nats_per_byte"], rel=1e-9)
    # Both are untrained here: not a teacher, and the run says so.
    assert teacher["surrogate_advantage"] < 0.05
    assert "the surrogate is not clearly stronger than the base on this text" in caplog.text

    # eval/nats_per_byte: the eval CE sum over the bytes of every labelled eval target.
    all_rows = eval_set[: len(eval_set)] if config.data.max_eval_blocks is None else eval_set[: config.data.max_eval_blocks]
    all_labels = torch.as_tensor(all_rows["labels"])
    eval_bytes = sum(text_bytes(base_tokenizer, row[row != IGNORE_INDEX]) for row in all_labels)
    assert evaluation["nats_per_byte"] == pytest.approx(evaluation["loss"] * evaluation["tokens"] / eval_bytes,
                                                        rel=1e-6)
    assert evaluation["teacher_advantage"] == pytest.approx(
        1 - teacher["surrogate_nats_per_byte"] / evaluation["nats_per_byte"], rel=1e-9)


def test_standard_runs_have_no_teacher(make_config):
    config = make_config({"training": {"max_steps": 1, "loss_type": "standard"}})
    train(config)
    assert read_metrics(config.training.output_dir, "teacher") == []
    assert "teacher_advantage" not in read_metrics(config.training.output_dir, "eval")[-1]
