"""Loading the base model, its tokenizer and the surrogate guidance (hub names or local paths)."""

from __future__ import annotations

import dataclasses
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
from trainer.guidance import Guide, SurrogateInputs, placeholder_id, topk_request

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


def build_guide(config: TrainConfig, tokenizer, device: torch.device, sample_text: str,
                train_blocks: Any = None) -> Guide | None:
    """The surrogate guidance for this run, or None for standard training.

    ``device``: where an in-process surrogate goes; ``sample_text`` (some training text)
    gives the alignment's coverage figure; ``train_blocks``: the run's training blocks, which
    a control teacher (surrogate.control) counts (None: built again from config.data).
    """
    if config.training.loss_type == "standard":
        return None
    cfg, loss_type, length = config.surrogate, config.training.loss_type, config.data.max_seq_length
    if cfg.control == "unigram":  # built from the data: nothing to connect to, nothing worth caching
        source, cfg = control_teacher(config, tokenizer, train_blocks), dataclasses.replace(cfg, cache_dir=None)
    else:
        source = surrogate_source(cfg, device, loss_type=loss_type, max_seq_length=length)
    return guide_for(source, cfg, tokenizer, loss_type=loss_type, max_seq_length=length, sample_text=sample_text,
                     document_mask=config.data.document_mask)


def control_teacher(config: TrainConfig, tokenizer, train_blocks: Any = None) -> SurrogateSource:
    """surrogate.control unigram: the unigram teacher of the training blocks (trainer.control)."""
    from trainer.control import UnigramTeacher
    from trainer.data import build_lm_datasets

    if train_blocks is None:  # the blocks the run trains on: the same config, tokenizer and seed (and datasets' cache)
        train_blocks, _ = build_lm_datasets(config.data, tokenizer, seed=config.training.seed)
    return UnigramTeacher.of_blocks(tokenizer, train_blocks)


def surrogate_source(cfg: SurrogateConfig, device: torch.device, *, loss_type: str,
                     max_seq_length: int) -> SurrogateSource:
    """``connect_surrogate``; with a guidance cache and no surrogate named, the surrogate the cache stored."""
    if cfg.name_or_path or cfg.endpoint or not cfg.cache_dir:
        return connect_surrogate(cfg, device)
    from trainer.cache import stored_surrogate

    k, floor = topk_request(cfg.k, cfg.probability_threshold, loss_type)
    return stored_surrogate(cfg.cache_dir, k=k, logprob_floor=floor, alignment=cfg.alignment,
                            surrogate_length=surrogate_length(cfg, max_seq_length))


def surrogate_length(cfg: SurrogateConfig, max_seq_length: int) -> int | None:
    """alignment bytes: the surrogate tokens a block is read as (a multiple of 8); tokens: None (the base's)."""
    return 8 * math.ceil(cfg.length_ratio * max_seq_length / 8) if cfg.alignment == "bytes" else None


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
    length = surrogate_length(cfg, max_seq_length)
    if length is not None:
        inputs = SurrogateInputs(ByteAligner(tokenizer, source.tokenizer(), max_surrogate_tokens=length))
    guide = Guide(
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
    if cfg.cache_dir:
        guide.source = cached_source(source, guide, cfg, length)
    return guide


def cached_source(source: SurrogateSource, guide: Guide, cfg: SurrogateConfig, length: int | None) -> SurrogateSource:
    """``source`` behind the guidance cache of ``cfg.cache_dir``, in the namespace of what ``guide`` asks of it."""
    from trainer.cache import CachedSource, GuidanceCache, Namespace, StoredSurrogate, permitted_hash

    info = source.info()
    if not info.weights_fingerprint:
        raise ValueError(f"the surrogate {info.model_id!r} does not report a weights fingerprint (a server older "
                         "than this trainer), so cached guidance could not be told from stale: upgrade the server, "
                         "or drop --guidance_cache")
    namespace = Namespace(
        surrogate=info.model_id, weights=info.weights_fingerprint, vocabulary=info.vocabulary_fingerprint,
        vocab_size=info.vocab_size, dtype=info.dtype, k=guide.request_k, logprob_floor=guide.logprob_floor,
        permitted=permitted_hash(guide.alignment.permitted), alignment=cfg.alignment, surrogate_length=length,
    )
    if isinstance(source, StoredSurrogate) and namespace != source.namespace:
        raise ValueError(f"the guidance in {source.directory} was computed for another base tokenizer (its permitted "
                         "set differs from this run's): precompute it for this base, or name the surrogate")
    try:
        tokenizer = source.tokenizer()
    except ValueError:  # a surrogate without one (alignment tokens): the vocabulary is enough then
        tokenizer = None
    cache = GuidanceCache(cfg.cache_dir, namespace, max_bytes=int(cfg.cache_max_gb * 1e9),
                          vocabulary=source.vocabulary(), tokenizer=tokenizer)
    return CachedSource(source, cache)

