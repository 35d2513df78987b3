"""Loading the base model, its tokenizer and the surrogate guidance (hub names or local paths)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from surrogate_server.engine import explain_load_errors
from surrogate_server.source import TORCH_DTYPES, SurrogateSource
from trainer.alignment import ByteAligner, align_vocabularies
from trainer.config import ModelConfig, SurrogateConfig, TrainConfig
from trainer.device import Backend
from trainer.guidance import Guide, SurrogateInputs, placeholder_id

log = logging.getLogger(__name__)


def load_tokenizer(cfg: ModelConfig):
    name = cfg.tokenizer or cfg.name_or_path
    with explain_load_errors(name, "base tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token; packing needs one to separate documents")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig, tokenizer, backend: Backend, weights_from: Path | None = None) -> PreTrainedModel:
    """The base model on the backend's device: pretrained, from a checkpoint, or freshly initialised."""
    dtype = TORCH_DTYPES.get(cfg.dtype, torch.float32)
    common = {"dtype": dtype, "attn_implementation": cfg.attn_implementation, "trust_remote_code": cfg.trust_remote_code}
    if weights_from is not None:
        model = AutoModelForCausalLM.from_pretrained(weights_from, **common)
    elif cfg.init_from_scratch:
        with explain_load_errors(cfg.name_or_path, "base model config"):
            config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, **common)
    else:
        with explain_load_errors(cfg.name_or_path, "base model"):
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **common)
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's output layer only {vocab}: "
            "use the model's own tokenizer (--base_tokenizer) or resize the model"
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    log.info("base model %s: %.1fM parameters, %s", cfg.name_or_path, model.num_parameters() / 1e6, dtype)
    return model.to(backend.device)


class HiddenStates(torch.nn.Module):
    """A causal LM without its head: the forward gives the final hidden states [B, T, H] (fused_sdce_loss's input).

    The trainer wraps this, not the LM, in DDP: the head's weight then gets its gradient from the loss,
    in the same backward, like every other parameter.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        # No use_cache=False unless asked (position ids per document): as the LM's own forward, so nothing
        # differs (on XLA it costs a host read per call).
        return self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]

    @property
    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight [V, H] and bias [V] (or None)."""
        lm_head = self.model.get_output_embeddings()
        return lm_head.weight, lm_head.bias

    def tie_weights(self) -> None:
        self.model.tie_weights()


def hidden_states_of(model: PreTrainedModel) -> HiddenStates | None:
    """``HiddenStates(model)`` when its logits are exactly ``lm_head(decoder(x))`` (checked on a probe), else None.

    Models that soft-cap or rescale their logits after the head (Gemma-2's final_logit_softcapping,
    Cohere's logit_scale, Granite's logits_scaling) keep the logits path.
    """
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    if not isinstance(head, torch.nn.Linear) or decoder is model:
        return None
    hidden = HiddenStates(model)
    probe = torch.arange(4, device=head.weight.device).remainder(head.weight.shape[0]).unsqueeze(0)
    training = model.training
    with torch.no_grad():
        model.eval()
        expected = model(input_ids=probe).logits.float()
        got = torch.nn.functional.linear(hidden(probe), *hidden.head).float()
        model.train(training)
    tolerance = 1e-4 * max(1.0, expected.abs().max().item())
    if not torch.allclose(got, expected, rtol=0.0, atol=tolerance):
        log.info("fused loss off: %s changes its logits after the LM head; training on full logits",
                 type(model).__name__)
        return None
    return hidden


def connect_surrogate(cfg: SurrogateConfig, device: torch.device) -> SurrogateSource:
    """The run's guidance provider: a client of the servers in ``cfg.endpoint``, else the model loaded here."""
    if cfg.endpoint:
        from surrogate_server.auth import read_token
        from surrogate_server.client import RemoteSurrogate  # imported late: grpc is the client extra's

        return RemoteSurrogate(cfg.endpoint, token=read_token(cfg.auth_token_file), tls_ca=cfg.tls_ca_file,
                               timeout=cfg.request_timeout)
    from surrogate_server.engine import SurrogateEngine

    return SurrogateEngine.from_pretrained(cfg.name_or_path, device=device, dtype=cfg.dtype,
                                           chunk_tokens=cfg.chunk_tokens)


def build_guide(config: TrainConfig, tokenizer, device: torch.device, sample_text: str) -> Guide | None:
    """The surrogate guidance for this run, or None for standard training.

    ``device``: where an in-process surrogate goes; ``sample_text`` (some training text)
    gives the alignment's coverage figure.
    """
    if config.training.loss_type == "standard":
        return None
    source = connect_surrogate(config.surrogate, device)
    return guide_for(source, config.surrogate, tokenizer, loss_type=config.training.loss_type,
                     max_seq_length=config.data.max_seq_length, sample_text=sample_text,
                     document_mask=config.data.document_mask)


def guide_for(
    source: SurrogateSource,
    cfg: SurrogateConfig,
    tokenizer,
    *,
    loss_type: str,
    max_seq_length: int,
    sample_text: str | None = None,
    document_mask: bool = False,
) -> Guide:
    """The guidance of ``source`` for blocks of ``max_seq_length`` base tokens, as ``cfg`` sets it up."""
    spec = source.vocabulary()
    alignment = align_vocabularies(tokenizer, spec, sample_text=sample_text, min_coverage=cfg.min_coverage)
    log.info("vocabulary alignment: %s", alignment)
    inputs = None
    if cfg.alignment == "bytes":
        length = 8 * math.ceil(cfg.length_ratio * max_seq_length / 8)
        inputs = SurrogateInputs(ByteAligner(tokenizer, source.tokenizer(), max_surrogate_tokens=length))
    return Guide(
        source,
        alignment,
        k=cfg.k,
        threshold=cfg.probability_threshold,
        loss_type=loss_type,
        placeholder=placeholder_id(spec),
        on_failure=cfg.on_failure,
        inputs=inputs,
        document_end=tokenizer.eos_token_id if document_mask else None,
    )

