"""Loading the base model and tokenizer: hub names while offline fail with a message that says what to do."""

import pytest

from trainer.config import ModelConfig
from trainer.device import Backend
from trainer.models import load_base_model, load_tokenizer


def test_offline_hub_name_for_the_tokenizer_says_so():
    with pytest.raises(ValueError, match=r"offline \(HF_HUB_OFFLINE=1\).*local directory saved with save_pretrained"):
        load_tokenizer(ModelConfig(name_or_path="gpt2"))


def test_offline_hub_name_for_a_scratch_model_says_so():
    with pytest.raises(ValueError, match="base model config 'Qwen/Qwen3-0.6B': it is not a local directory"):
        load_base_model(ModelConfig(name_or_path="Qwen/Qwen3-0.6B", init_from_scratch=True), None, Backend("cpu"))
