"""data.document_mask: position ids per document, and what transformers' models make of them."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trainer.data import DocumentPositions, document_positions
from trainer.models import hidden_states_of

EOS = 0


def test_positions_restart_after_each_end_of_document() -> None:
    ids = torch.tensor([[5, 6, EOS, 7, 8, EOS, 9], [EOS, 1, 2, 3, EOS, EOS, 4]])
    assert document_positions(ids, ids == EOS).tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 0, 1, 2, 3, 0, 0]]
    batch = DocumentPositions(EOS)([{"input_ids": row} for row in ids])
    assert torch.equal(batch["position_ids"], document_positions(ids, ids == EOS))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_packed_document_reads_as_it_does_alone(family: str) -> None:
    """The fused path's forward (decoder hidden states) with per-document positions and no cache."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    hidden = hidden_states_of(model.eval())
    first, second = torch.randint(1, 64, (1, 6)), torch.randint(1, 64, (1, 5))
    packed = torch.cat([first, torch.tensor([[EOS]]), second], dim=1)
    positions = document_positions(packed, packed == EOS)
    with torch.no_grad():
        together = hidden(packed, position_ids=positions, use_cache=False)
        alone = hidden(second)
        plain = hidden(packed)
    torch.testing.assert_close(together[:, 7:], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(plain[:, 7:], alone, atol=1e-3)  # without them the second document sees the first
