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


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "gemma2"])
def test_fused_loss_is_used_exactly_where_the_head_gives_the_logits(family):
    import torch
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    from trainer.models import hidden_states_of

    small = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8}
    torch.manual_seed(0)
    model = {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**small)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**small)),
        "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=1.0)),  # caps logits
    }[family]()
    hidden = hidden_states_of(model.train())
    assert model.training  # the probe ran in eval mode and put the model back
    if family == "gemma2":
        assert hidden is None
        return
    ids = torch.randint(0, 64, (2, 5))
    weight, bias = hidden.head
    model.eval()
    torch.testing.assert_close(torch.nn.functional.linear(hidden(ids), weight, bias), model(input_ids=ids).logits)
