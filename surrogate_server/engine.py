"""The surrogate engine: per-position top-k surrogate log-probs over a permitted vocabulary.

One component computes SDCE guidance (docs/method.md §6) both in the trainer's
process and inside the surrogate server; it implements ``SurrogateSource``. It runs the surrogate's decoder once over a
batch, then the lm_head, an fp32 log-softmax over the *full* vocabulary and a top-k
over the permitted ids, chunk by chunk, so the full ``[B, T, V]`` logits never exist.

Usage::

    engine = SurrogateEngine.from_pretrained("Qwen/Qwen3-0.6B")
    out = engine.topk(input_ids, attention_mask, k=31, permitted=permitted)   # a TopK
    out.logprobs  # [B, T, 31] float32, descending, -inf in empty slots
    out.ids       # [B, T, 31] int64 surrogate ids, -1 in empty slots
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
import time
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from surrogate_server.source import SurrogateInfo, TopK, resolve_dtype
from surrogate_server.vocabulary import VocabularySpec, vocabulary_spec

log = logging.getLogger(__name__)
# Config fields that change logits after the lm_head in some architectures and that the
# engine does not reproduce; named in the error when the self-check fails.
_LOGIT_MODIFIERS = ("logit_scale", "logits_scaling", "output_multiplier", "logits_soft_cap", "dim_model_base")


class SurrogateEngine:
    """Wraps a causal LM and answers :meth:`topk` queries, one call at a time (a ``SurrogateSource``).

    Memory: besides the decoder's activations for the batch, at most one block of
    ``chunk_tokens x V`` logits exists at a time: ``chunk_tokens * V * 4`` bytes of fp32
    logits plus as much again for their log-softmax (plus, for a bf16/fp16 model, a
    transient ``chunk_tokens * V * 2`` bytes lm_head output before the upcast). For
    Qwen3 (V = 151936) and the default 1024 chunk that is about 1.25 GB.

    Outputs stay on the engine's device (``self.device``); the caller moves them.
    Positions are aligned 1:1 with the input (position ids are ``0..T-1`` whatever the
    mask), as docs/method.md §2 requires.

    On a lazy device (XLA) nothing in :meth:`topk` reads the device: only the static
    argument checks run, the attention mask is built on the device, and ``torch.no_grad``
    stands in for inference mode (lazy tensors cannot be inference tensors). Get such an
    engine with :meth:`to`, which checks it against this one.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, *, chunk_tokens: int = 1024) -> None:
        """Args:
        model: a causal LM (``...ForCausalLM``); put in eval mode, gradients off.
        tokenizer: the surrogate's tokenizer; needed only by :meth:`vocabulary`.
        chunk_tokens: flattened positions per lm_head/log-softmax/top-k block.
        """
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.model = model.eval().requires_grad_(False)
        self._tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self._decoder: nn.Module = model.get_decoder()
        self._lm_head = model.get_output_embeddings()
        if self._lm_head is None or self._decoder is model:
            raise ValueError(f"{type(model).__name__} is not a causal LM with a separate decoder and lm_head; "
                             "load it with AutoModelForCausalLM")
        self._softcap: float | None = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.vocab_size: int = self._lm_head.weight.shape[0]
        self.device: torch.device = self._lm_head.weight.device
        self.dtype: torch.dtype = self._lm_head.weight.dtype
        self.max_positions: int | None = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.lazy = self.device.type == "xla"
        if self.lazy:
            self._decoder = _BoolMaskDecoder(self._decoder)
        self._lock = threading.Lock()
        self._vocabulary: VocabularySpec | None = None
        self._weights_fingerprint: str | None = None
        self._requests, self._seconds = 0, 0.0
        if not self.lazy:  # a lazy engine comes from to(), which compares it with a checked one
            self._check_logits_match_model()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        chunk_tokens: int = 1024,
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
    ) -> SurrogateEngine:
        """Load model and tokenizer from a Hub name or a local directory.

        Args:
            device: "auto" (cuda if available, else cpu) or any torch device. A lazy
                device (XLA) gets a model loaded and checked on the CPU, then moved (:meth:`to`).
            dtype: "auto" (bfloat16 on cuda, float32 otherwise), "bfloat16", "float16", "float32".
        """
        target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        torch_dtype = resolve_dtype(dtype, target)
        with explain_load_errors(name_or_path, "model"):
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=torch_dtype, attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code)
        with explain_load_errors(name_or_path, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if target.type == "xla":
            return cls(model, tokenizer, chunk_tokens=chunk_tokens).to(target)
        return cls(model.to(target), tokenizer, chunk_tokens=chunk_tokens)

    # -- the SurrogateSource protocol ------------------------------------------------------
    def topk(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        k: int,
        permitted: Tensor | None = None,
        logprob_floor: float | None = None,
        position_ids: Tensor | None = None,
    ) -> TopK:
        """Top-k permitted surrogate tokens per position, by full-vocabulary log-prob.

        Args:
            input_ids: [B, T] surrogate ids in [0, vocab_size), placeholders included.
            attention_mask: [B, T], 1 = real token, 0 = placeholder nobody attends to
                (zeros may sit anywhere, docs/method.md §2).
            k: slots per position (>= 1). Slots beyond the number of permitted ids are empty.
            permitted: bool [<= vocab_size]; ids at or beyond its length are not
                permitted. None permits every id.
            logprob_floor: ignored: nothing travels, and the caller selects candidates itself.
            position_ids: [B, T] or None (``0..T-1``). Packed documents (data.document_mask): positions
                restart at 0 where a document starts, and each position attends only within its document.

        Returns:
            TopK on ``self.device``. A position whose query attends to no key (every
            position up to and including it is masked), or whose log-probs come out
            non-finite, is an empty row.
        """
        self._validate(input_ids, attention_mask, k, permitted)
        if position_ids is not None and position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        started = time.perf_counter()
        with self._lock, (torch.no_grad() if self.lazy else torch.inference_mode()):
            out = self._compute_topk(input_ids, attention_mask, k, permitted, position_ids)
            self._requests += 1
            self._seconds += time.perf_counter() - started
        # Inference tensors cannot be saved for backward: clone outside inference mode so
        # the trainer can use them in its loss graph (cost: B*T*k elements).
        return TopK(logprobs=out.logprobs.clone(), ids=out.ids.clone())

    def score(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor,
              position_ids: Tensor | None = None) -> Tensor:
        """Full-vocabulary log-prob of ``targets[b, t]`` at each position (the teacher check's NLL).

        Args:
            input_ids, attention_mask, position_ids: as :meth:`topk`.
            targets: [B, T] surrogate ids whose log-prob position t gives (usually input_ids[:, t + 1]);
                -1 where none is wanted.

        Returns:
            [B, T] float32 on ``self.device``; 0 where the target is -1 or the position attends to nothing.
        """
        self._validate(input_ids, attention_mask, 1, None)
        if targets.shape != input_ids.shape or (targets.numel() and int(targets.max()) >= self.vocab_size):
            raise ValueError(f"targets must be [B, T] = {tuple(input_ids.shape)} of ids below {self.vocab_size} "
                             f"(-1 for none), got shape {tuple(targets.shape)}")
        with self._lock, (torch.no_grad() if self.lazy else torch.inference_mode()):
            hidden = self._hidden(input_ids, attention_mask, position_ids)  # [N, H]
            flat = targets.to(self.device, torch.long).reshape(-1)
            parts = []
            for i in range(0, hidden.shape[0], self.chunk_tokens):
                logprobs = torch.log_softmax(self._logits(hidden[i:i + self.chunk_tokens]), dim=-1)
                parts.append(logprobs.gather(-1, flat[i:i + self.chunk_tokens].clamp(min=0).unsqueeze(-1))[:, 0])
            out = torch.cat(parts).view(targets.shape)
            attends = attention_mask.to(self.device).cumsum(dim=-1) > 0
            out = out.where((targets.to(self.device) >= 0) & attends, torch.zeros_like(out))
        return out.clone()

    def vocabulary(self) -> VocabularySpec:
        """The tokenizer's vocabulary spec, computed once."""
        if self._vocabulary is None:
            self._vocabulary = vocabulary_spec(self.tokenizer())
        return self._vocabulary

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise ValueError("this engine has no tokenizer; pass one to SurrogateEngine(model, tokenizer)")
        return self._tokenizer

    def info(self) -> SurrogateInfo:
        config = self.model.config
        return SurrogateInfo(
            model_id=getattr(config, "_name_or_path", "") or type(self.model).__name__,
            vocab_size=self.vocab_size,
            vocabulary_fingerprint=self.vocabulary().fingerprint() if self.has_tokenizer else "",
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            weights_fingerprint=self.weights_fingerprint(),
        )

    def weights_fingerprint(self) -> str:
        """sha256 of the model's state (names, dtypes, shapes and bytes), computed once: ~1 s per GB of weights."""
        if self._weights_fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
                digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy().data)
            self._weights_fingerprint = digest.hexdigest()
        return self._weights_fingerprint

    def stats(self) -> dict[str, float]:
        """Forwards since the previous call and their mean time (on a lazy device: the time to trace them)."""
        with self._lock:
            requests, seconds, self._requests, self._seconds = self._requests, self._seconds, 0, 0.0
        stats = {"guidance_requests": float(requests)}
        if requests:
            stats["guidance_latency_ms_mean"] = 1e3 * seconds / requests
        return stats

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release: the model goes with the engine."""

    # -- placement ---------------------------------------------------------------------------
    def to(self, device: torch.device | str, *, atol: float | None = None) -> SurrogateEngine:
        """This engine's model on ``device`` (the model moves: use the engine returned), checked there.

        Checks, each a ValueError that names what is wrong: every weight is finite, and
        the top-k log-probs of a short probe forward agree on both devices (within
        ``atol``; default 1e-3, 5e-2 in bf16). Tied weights are tied again after the move
        (moving to XLA gives every module a new Parameter).
        """
        for name, param in self.model.named_parameters():
            if not torch.isfinite(param).all():
                raise ValueError(f"the surrogate's weight {name} holds NaN or inf values: it cannot guide "
                                 "training; check the checkpoint")
        fingerprint = self.weights_fingerprint()  # of the weights here, before they move
        probe = torch.arange(32).remainder(self.vocab_size).view(2, 16)
        probe_mask = torch.ones_like(probe).index_fill_(1, torch.tensor([0, 5, 6]), 0)  # masked keys and rows
        expected = self.topk(probe, probe_mask, 8).logprobs.cpu()
        model = self.model.to(device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        moved = SurrogateEngine(model, self._tokenizer, chunk_tokens=self.chunk_tokens)
        moved._weights_fingerprint = fingerprint
        got = moved.topk(probe.to(moved.device), probe_mask.to(moved.device), 8).logprobs.cpu()
        tolerance = atol if atol is not None else (5e-2 if moved.dtype == torch.bfloat16 else 1e-3)
        finite = torch.isfinite(expected)
        gap = (expected[finite] - got[finite]).abs().max().item() if finite.any() else 0.0
        if not torch.equal(finite, torch.isfinite(got)) or not math.isfinite(gap) or gap > tolerance:
            raise ValueError(f"the surrogate's top-k log-probs on {moved.device} differ from {self.device}'s by up "
                             f"to {gap:.3g} (tolerance {tolerance:g}): this model does not run correctly there; "
                             "use a surrogate server")
        log.info("surrogate validated for %s: finite weights, probe top-k within %.2g of %s", moved.device, gap,
                 self.device)
        return moved

    # -- the computation ---------------------------------------------------------------------
    def _compute_topk(self, input_ids: Tensor, attention_mask: Tensor, k: int, permitted: Tensor | None,
                      position_ids: Tensor | None = None) -> TopK:
        """The computation behind :meth:`topk`, on validated inputs (under its lock and no-grad mode)."""
        batch, length = input_ids.shape
        if batch * length == 0:
            return TopK(logprobs=torch.full((batch, length, k), float("-inf"), device=self.device),
                        ids=torch.full((batch, length, k), -1, dtype=torch.long, device=self.device))
        attention_mask = attention_mask.to(self.device, torch.long)
        hidden = self._hidden(input_ids, attention_mask, position_ids)  # [N, H]
        forbidden = None  # [V] bool: not permitted, which every id past len(permitted) is
        if permitted is not None:
            forbidden = torch.ones(self.vocab_size, dtype=torch.bool, device=self.device)
            forbidden[: permitted.shape[0]] = ~permitted.to(self.device)
        k_eff = min(k, self.vocab_size)
        blocks = [self._block_topk(hidden[i:i + self.chunk_tokens], forbidden, k_eff)
                  for i in range(0, hidden.shape[0], self.chunk_tokens)]
        values = torch.cat([v for v, _ in blocks]).view(batch, length, k_eff)
        ids = torch.cat([i for _, i in blocks]).view(batch, length, k_eff)
        attends_to_nothing = attention_mask.cumsum(dim=-1) == 0  # [B, T]
        return _empty_where_invalid(values, ids, attends_to_nothing, k)

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None) -> Tensor:
        """The decoder's final hidden states of a batch, flattened: [B * T, H]."""
        input_ids = input_ids.to(self.device, torch.long)
        attention_mask = attention_mask.to(self.device, torch.long)
        if position_ids is None:
            hidden = self._decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        else:  # documents: a ready mask with one causal block per document, and their own positions
            decoder = self._decoder if isinstance(self._decoder, _BoolMaskDecoder) else _BoolMaskDecoder(self._decoder)
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             position_ids=position_ids.to(self.device, torch.long))[0]
        return hidden.reshape(input_ids.numel(), -1)

    def _block_topk(self, hidden: Tensor, forbidden: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        """[n, H] hidden states -> ([n, k] float32 log-probs, [n, k] int64 ids); peak n*V*8 bytes (fp32 logits
        and their log-softmax)."""
        logits = self._logits(hidden)
        logprobs = torch.log_softmax(logits, dim=-1)
        del logits
        if forbidden is not None:
            logprobs.masked_fill_(forbidden, float("-inf"))
        return logprobs.topk(k, dim=-1)

    def _logits(self, hidden: Tensor) -> Tensor:
        """[n, H] final hidden states -> [n, V] float32 logits, soft-capped in place if the model does."""
        logits = self._lm_head(hidden).float()
        if self._softcap is not None:
            logits.div_(self._softcap).tanh_().mul_(self._softcap)
        return logits

    def _validate(self, input_ids: Tensor, attention_mask: Tensor, k: int, permitted: Tensor | None) -> None:
        """Raise ValueError naming the first problem with the arguments of :meth:`topk` (lazy: static checks only)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} "
                             f"must equal input_ids shape {tuple(input_ids.shape)}")
        if self.max_positions is not None and input_ids.shape[1] > self.max_positions:
            raise ValueError(f"sequences of {input_ids.shape[1]} surrogate tokens exceed the surrogate's "
                             f"max_position_embeddings = {self.max_positions}: lower data.max_seq_length "
                             "(or surrogate.length_ratio)")
        if permitted is not None and (permitted.dtype != torch.bool or permitted.dim() != 1
                                      or permitted.shape[0] > self.vocab_size):
            raise ValueError(f"permitted must be a 1-D bool tensor of length <= {self.vocab_size}, "
                             f"got {permitted.dtype} of shape {tuple(permitted.shape)}")
        if self.lazy:
            return
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}) (the surrogate vocabulary), got values "
                             f"in [{int(input_ids.min())}, {int(input_ids.max())}]; give placeholders a valid id")
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 and 1")

    def _check_logits_match_model(self) -> None:
        """Check on a tiny probe that decoder + lm_head (+ softcap) reproduce model(...).logits.

        Catches architectures that transform logits in their forward in a way the
        engine does not reproduce (e.g. Granite's logits_scaling, Cohere's logit_scale).
        """
        probe = torch.arange(4, device=self.device).remainder(self.vocab_size).unsqueeze(0)  # [1, 4]
        with torch.inference_mode():
            expected = self.model(input_ids=probe, use_cache=False).logits.float()[0]  # [4, V]
            logits = self._logits(self._decoder(input_ids=probe, use_cache=False)[0][0])
        tolerance = (1e-4 if self.dtype == torch.float32 else 2e-2) * max(1.0, expected.abs().max().item())
        if not torch.allclose(logits, expected, rtol=0.0, atol=tolerance):
            present = [name for name in _LOGIT_MODIFIERS if getattr(self.model.config, name, None) is not None]
            raise ValueError(f"{type(self.model).__name__} changes its logits after the lm_head in a way the "
                             f"engine does not reproduce (config fields: {present or 'none known'}); "
                             "use a surrogate architecture such as Llama, Qwen2/3, Gemma or GPT-2")


class _BoolMaskDecoder(nn.Module):
    """Gives the decoder a ready [B, 1, T, T] boolean mask, built on the device (lazy devices).

    With a 2-D mask transformers checks on the host whether it is all ones (a device
    read mid-step on XLA, and a different graph when it is). A position with no key to
    attend to attends to itself, so its output stays finite (the engine blanks it) and
    no NaN reaches other positions through its keys and values.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                **kwargs: Any) -> Any:
        length = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        itself = torch.eye(length, dtype=torch.bool, device=input_ids.device)
        allowed = causal & attention_mask.bool()[:, None, None, :]
        if position_ids is not None:  # a document starts where its position is 0; keys of other documents are out
            document = (position_ids == 0).cumsum(-1)
            allowed = allowed & (document[:, None, :, None] == document[:, None, None, :])
            kwargs["position_ids"] = position_ids
        mask = allowed | (itself & ~allowed.any(-1, keepdim=True))
        return self.decoder(input_ids=input_ids, attention_mask=mask, **kwargs)


def _empty_where_invalid(values: Tensor, ids: Tensor, empty_rows: Tensor, k: int) -> TopK:
    """Blank non-finite and ``empty_rows`` entries; pad the last axis to k.

    values/ids: [B, T, k'] with k' <= k; empty_rows: bool [B, T].
    """
    # == inf, not isposinf: that one falls back to the CPU on XLA.
    bad_rows = empty_rows | torch.isnan(values).any(-1) | (values == float("inf")).any(-1)
    keep = torch.isfinite(values) & ~bad_rows.unsqueeze(-1)
    values = values.masked_fill(~keep, float("-inf"))
    ids = ids.masked_fill(~keep, -1)
    if values.shape[-1] < k:
        pad = k - values.shape[-1]
        values = nn.functional.pad(values, (0, pad), value=float("-inf"))
        ids = nn.functional.pad(ids, (0, pad), value=-1)
    return TopK(logprobs=values, ids=ids)


@contextlib.contextmanager
def explain_load_errors(name_or_path: str, what: str) -> Iterator[None]:
    """Re-raise a failed ``from_pretrained`` of ``what`` as a ValueError that says why and what to do.

    Shared by the engine and the trainer's base-model loading: a hub name while the hub
    is offline or unreachable is the common case, and the fix is a local directory.
    """
    try:
        yield
    except (OSError, ValueError) as err:
        if os.path.isdir(name_or_path):
            raise ValueError(f"could not load the {what} from the local directory {name_or_path!r}: {err}") from err
        from huggingface_hub import is_offline_mode

        reason = ("the Hub is offline (HF_HUB_OFFLINE=1)" if is_offline_mode()
                  else "it is not on the Hub, or the Hub is unreachable")
        raise ValueError(
            f"could not load the {what} {name_or_path!r}: it is not a local directory and {reason}, "
            f"and it is not in the local cache. Pass the path of a local directory saved with "
            f"save_pretrained instead. ({err})"
        ) from err
