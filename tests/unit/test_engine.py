"""SurrogateEngine against a slow, obvious reference: full model(...).logits -> log_softmax -> mask -> sort."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from surrogate_server.engine import SurrogateEngine, TopK

VOCAB = 1000
# Wider init than the default so that logits are spread out and top-k order is not decided by ties.
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)


def _build(name: str) -> PreTrainedModel:
    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**_COMMON)).eval()
    if name == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=16)).eval()
    if name == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                            initializer_range=0.2, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).eval()
    if name == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**_COMMON, head_dim=16, final_logit_softcapping=3.0)).eval()
    raise AssertionError(name)


@pytest.fixture(scope="module", params=["llama", "qwen3", "gpt2"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return _build(request.param)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [2, 9] and an all-ones mask: B*T = 18 positions."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=generator)
    return ids, torch.ones_like(ids)


def reference_logprobs(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, V] full-vocabulary fp32 log-probs from the model's ordinary forward."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)


def reference_topk(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, k: int,
                   permitted: torch.Tensor | None = None) -> TopK:
    logprobs = reference_logprobs(model, ids, mask)
    vocab = logprobs.shape[-1]
    allowed = torch.zeros(vocab, dtype=torch.bool)
    if permitted is None:
        allowed[:] = True
    else:
        allowed[: len(permitted)] = permitted
    logprobs = logprobs.masked_fill(~allowed, float("-inf"))
    values, order = logprobs.sort(dim=-1, descending=True)
    values, order = values[..., :k], order[..., :k]
    empty = ~torch.isfinite(values) | (mask.cumsum(-1) == 0).unsqueeze(-1)
    values, order = values.masked_fill(empty, float("-inf")), order.masked_fill(empty, -1)
    pad = k - values.shape[-1]
    values = torch.nn.functional.pad(values, (0, pad), value=float("-inf"))
    order = torch.nn.functional.pad(order, (0, pad), value=-1)
    return TopK(logprobs=values, ids=order)


def assert_matches(got: TopK, want: TopK, full_logprobs: torch.Tensor) -> None:
    """Same values (1e-5), same empty slots, and every returned id carries its claimed log-prob."""
    assert got.logprobs.dtype == torch.float32 and got.ids.dtype == torch.int64
    assert got.logprobs.shape == want.logprobs.shape == got.ids.shape
    assert not torch.isnan(got.logprobs).any()
    assert torch.equal(got.ids == -1, want.ids == -1)
    assert torch.equal(torch.isinf(got.logprobs), got.ids == -1)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    filled = got.ids != -1
    claimed = full_logprobs.gather(-1, got.ids.clamp(min=0))
    torch.testing.assert_close(claimed[filled], got.logprobs[filled], rtol=0, atol=1e-5)
    # Ids agree except where two log-probs tie to within the tolerance.
    assert (got.ids == want.ids).float().mean() > 0.95


@pytest.mark.parametrize("chunk_tokens", [1024, 5, 1])
def test_topk_matches_reference(model: PreTrainedModel, batch: tuple[torch.Tensor, torch.Tensor],
                                chunk_tokens: int) -> None:
    ids, mask = batch
    engine = SurrogateEngine(model, chunk_tokens=chunk_tokens)
    got = engine.topk(ids, mask, k=8)
    assert_matches(got, reference_topk(model, ids, mask, 8), reference_logprobs(model, ids, mask))
    assert (got.logprobs[..., :-1] >= got.logprobs[..., 1:]).all()


def test_permitted_subset_normalised_over_full_vocab(model: PreTrainedModel,
                                                     batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    ids, mask = batch
    permitted = torch.rand(700, generator=torch.Generator().manual_seed(2)) < 0.3  # ids >= 700 not permitted
    got = SurrogateEngine(model, chunk_tokens=7).topk(ids, mask, k=6, permitted=permitted)
    assert (got.ids >= 0).all() and permitted[got.ids].all()
    assert_matches(got, reference_topk(model, ids, mask, 6, permitted), reference_logprobs(model, ids, mask))


def test_logprob_floor_is_left_to_the_caller(model: PreTrainedModel,
                                            batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """In-process nothing travels: the floor saves nothing, and trainer.guidance applies the threshold."""
    ids, mask = batch
    engine = SurrogateEngine(model)
    got = engine.topk(ids, mask, k=10, logprob_floor=-1.0)
    assert_matches(got, reference_topk(model, ids, mask, 10), reference_logprobs(model, ids, mask))


def test_k_beyond_permitted_or_vocab_gives_empty_slots(model: PreTrainedModel,
                                                       batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    ids, mask = batch
    engine = SurrogateEngine(model, chunk_tokens=4)
    permitted = torch.zeros(VOCAB, dtype=torch.bool)
    permitted[[3, 17, 400, 999]] = True
    got = engine.topk(ids, mask, k=7, permitted=permitted)
    assert_matches(got, reference_topk(model, ids, mask, 7, permitted), reference_logprobs(model, ids, mask))
    assert (got.ids[..., :4] != -1).all() and (got.ids[..., 4:] == -1).all()
    wide = engine.topk(ids[:, :3], mask[:, :3], k=VOCAB + 3)
    assert wide.ids.shape == (2, 3, VOCAB + 3)
    assert (wide.ids[..., VOCAB:] == -1).all() and (wide.ids[..., :VOCAB] != -1).all()
    assert torch.equal(wide.ids[..., :VOCAB].sort(-1).values, torch.arange(VOCAB).expand(2, 3, VOCAB))


def test_mask_with_zeros_in_the_middle(model: PreTrainedModel, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    ids, _ = batch
    mask = torch.ones_like(ids)
    mask[0, [2, 3, 6]] = 0
    mask[1, 5] = 0
    got = SurrogateEngine(model, chunk_tokens=5).topk(ids, mask, k=8)
    assert_matches(got, reference_topk(model, ids, mask, 8), reference_logprobs(model, ids, mask))
    unmasked = SurrogateEngine(model).topk(ids, torch.ones_like(ids), k=8)
    assert not torch.allclose(got.logprobs[0, 4:], unmasked.logprobs[0, 4:])  # the mask does take effect


def test_masked_first_position_gives_empty_rows_never_nan(model: PreTrainedModel,
                                                          batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    ids, _ = batch
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # positions 0..2 of row 0 attend to no key at all
    mask[1, 0] = 0
    got = SurrogateEngine(model).topk(ids, mask, k=5)
    assert not torch.isnan(got.logprobs).any()
    assert (got.ids[0, :3] == -1).all() and (got.ids[1, 0] == -1).all()
    assert (got.ids[0, 3:] != -1).all() and (got.ids[1, 1:] != -1).all()
    assert_matches(got, reference_topk(model, ids, mask, 5), reference_logprobs(model, ids, mask))


def test_bad_inputs_raise_value_error() -> None:
    model = _build("llama")
    engine = SurrogateEngine(model)
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match="k must be"):
        engine.topk(ids, mask, k=0)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        engine.topk(ids + VOCAB, mask, k=2)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        engine.topk(ids - 1, mask, k=2)
    with pytest.raises(ValueError, match="attention_mask shape"):
        engine.topk(ids, mask[:, :3], k=2)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        engine.topk(ids[0], mask[0], k=2)
    with pytest.raises(ValueError, match="permitted must be"):
        engine.topk(ids, mask, k=2, permitted=torch.ones(VOCAB + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="permitted must be"):
        engine.topk(ids, mask, k=2, permitted=torch.ones(VOCAB))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        engine.topk(ids, mask * 2, k=2)
    with pytest.raises(ValueError, match="chunk_tokens"):
        SurrogateEngine(model, chunk_tokens=0)
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.vocabulary()


def test_outputs_usable_in_autograd_and_on_engine_device() -> None:
    engine = SurrogateEngine(_build("llama"))
    ids = torch.randint(0, VOCAB, (1, 4))
    out = engine.topk(ids, torch.ones_like(ids), k=3)
    assert out.logprobs.device == engine.device and not out.logprobs.is_inference()
    weights = torch.zeros(3, requires_grad=True)
    (weights * out.logprobs).sum().backward()  # an inference tensor would fail here
    empty = engine.topk(ids[:, :0], ids[:, :0], k=3)
    assert empty.ids.shape == (1, 0, 3)


def test_final_logit_softcapping_applied(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _build("gemma2")
    ids, mask = batch
    got = SurrogateEngine(model, chunk_tokens=5).topk(ids, mask, k=8)
    assert_matches(got, reference_topk(model, ids, mask, 8), reference_logprobs(model, ids, mask))


def test_unreproduced_logit_scaling_is_rejected() -> None:
    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(**_COMMON, logits_scaling=4.0)).eval()
    with pytest.raises(ValueError, match="logits_scaling"):
        SurrogateEngine(model)


def _save_tiny_tokenizer(directory: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1} | {f"w{i}": i + 2 for i in range(48)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>")
    tokenizer.save_pretrained(directory)


def test_from_pretrained_local_directory_round_trips(tmp_path, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _build("qwen3")
    model.save_pretrained(tmp_path)
    _save_tiny_tokenizer(str(tmp_path))
    engine = SurrogateEngine.from_pretrained(str(tmp_path), device="cpu", chunk_tokens=7)
    ids, mask = batch
    assert_matches(engine.topk(ids, mask, k=4), reference_topk(model, ids, mask, 4),
                   reference_logprobs(model, ids, mask))
    assert engine.tokenizer()("w3 w7")["input_ids"] == [5, 9]
    assert (engine.vocab_size, engine.dtype, engine.device, engine.chunk_tokens) == (VOCAB, torch.float32,
                                                                                      torch.device("cpu"), 7)
    assert not any(p.requires_grad for p in engine.model.parameters()) and not engine.model.training


def test_from_pretrained_bad_dtype_and_missing_tokenizer(tmp_path) -> None:
    _build("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype must be"):
        SurrogateEngine.from_pretrained(str(tmp_path), dtype="fp8")
    with pytest.raises(ValueError, match="tokenizer"):
        SurrogateEngine.from_pretrained(str(tmp_path), device="cpu")


def test_from_pretrained_unknown_hub_name_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it before huggingface_hub is imported
    with pytest.raises(ValueError, match="not a local directory.*offline.*local directory"):
        SurrogateEngine.from_pretrained("nobody-sdce/no-such-model-xyz", device="cpu")


def test_vocabulary_spec_is_computed_once(tmp_path) -> None:
    from tests.tokenizer_factory import corpus, train_sentencepiece_bpe
    from surrogate_server.vocabulary import vocabulary_spec

    tokenizer = train_sentencepiece_bpe(corpus(["json"]), 300)
    engine = SurrogateEngine(_build("llama"), tokenizer)
    assert engine.vocabulary() is engine.vocabulary()  # computed once
    assert engine.vocabulary() == vocabulary_spec(tokenizer)
    info = engine.info()
    assert (info.vocab_size, info.dtype, info.device) == (engine.vocab_size, "float32", "cpu")
    assert info.vocabulary_fingerprint == vocabulary_spec(tokenizer).fingerprint()


def test_lm_head_sees_at_most_chunk_tokens_rows_and_full_forward_is_not_called(
        batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _build("llama")
    engine = SurrogateEngine(model, chunk_tokens=4)  # B*T = 18 -> blocks of 4, 4, 4, 4, 2
    rows: list[int] = []
    head_hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    full_hook = model.register_forward_hook(lambda *_: pytest.fail("the full forward materialises all logits"))
    try:
        engine.topk(*batch, k=3)
    finally:
        head_hook.remove()
        full_hook.remove()
    assert rows == [4, 4, 4, 4, 2]


def test_packed_documents_read_each_document_alone(model: PreTrainedModel) -> None:
    """position_ids restarting at a document's start: the second document's top-k is what it gets alone."""
    engine = SurrogateEngine(model, chunk_tokens=7)
    first, second = torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 6))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(6)]).unsqueeze(0)
    mask = torch.ones_like(packed)
    mask[0, 7] = 0  # a hole inside the second document: the same hole alone
    together = engine.topk(packed, mask, 4, position_ids=positions)
    alone = engine.topk(second, mask[:, 5:], 4)
    torch.testing.assert_close(together.logprobs[:, 5:], alone.logprobs, rtol=0, atol=1e-5)
    unmasked = engine.topk(packed, mask, 4)  # without positions the second document sees the first
    assert not torch.allclose(unmasked.logprobs[:, 5:], alone.logprobs, atol=1e-3)
    with pytest.raises(ValueError, match="position_ids shape"):
        engine.topk(packed, mask, 4, position_ids=positions[:, :3])
