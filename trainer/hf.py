"""SDCE inside the Hugging Face ``Trainer``: ``SDCEConfig`` (its arguments) and ``SDCETrainer``.

An existing HF script changes in three places::

    from trainer.hf import SDCEConfig, SDCETrainer

    args = SDCEConfig(output_dir="out", surrogate_model="Qwen/Qwen3-0.6B", loss_type="surrogate", ...)
    trainer = SDCETrainer(model=model, args=args, train_dataset=blocks, processing_class=tokenizer)
    trainer.train()

``SDCEConfig`` is ``TrainingArguments`` plus the SDCE settings under train.py's flag names
(``surrogate_model``, ``surrogate_endpoint``, ``surrogate_k``, ``loss_type``, ...; see
``trainer.config``, where each is declared once), so ``HfArgumentParser(SDCEConfig)``
reads the same command line. The tokenizers of base and surrogate may differ.

What the trainer adds to ``Trainer``:

- the collator: the batches of the given ``data_collator`` (default: ``default_data_collator``)
  with causal-LM labels as ``sdce_loss`` reads them (position t holds token t + 1: ``labels``
  shifted by one, or a ``shift_labels`` column as given) and the surrogate's byte-aligned input;
- guidance (``cand_ids``, ``cand_logprobs``) attached to each training micro-batch as it is
  drawn, by an in-process surrogate or by the servers at ``surrogate_endpoint``, requested
  ``surrogate_prefetch_depth`` micro-batches ahead;
- the loss: ``fused_sdce_loss`` on the final hidden states where the model's head allows it
  (else ``sdce_loss`` on logits), normalised by the label count of the whole optimizer step,
  every micro-batch and rank, with λ following the optimizer step (docs/method.md §4-§5);
- logs: ``ce``, ``surrogate_term``, ``lambda``, ``guided_share`` and the guidance statistics
  beside HF's ``loss`` (its W&B callback files them under ``train/``).

Multi-GPU runs go through torchrun (``DistributedDataParallel``), as train.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments, default_data_collator

from surrogate_server.config_cli import field_types, options
from surrogate_server.source import SurrogateSource
from trainer.config import SurrogateConfig, TrainingConfig
from trainer.guidance import Batch, Guide, SurrogateInputs, guided_batches
from trainer.losses import IGNORE_INDEX, fused_sdce_loss, sdce_loss
from trainer.models import guide_for, hidden_states_of, surrogate_source
from trainer.schedules import surrogate_weight

log = logging.getLogger("trainer")

_LOSS_OPTIONS = ("loss_type", "z_loss_multiplier", "fused_loss")  # of TrainingConfig; the rest is TrainingArguments'
# What the collator and the guidance add to a batch for the loss, not for the model's forward.
_SDCE_KEYS = frozenset({"labels", "cand_ids", "cand_logprobs", "candidate_stages", "surrogate_ids", "surrogate_mask",
                        "guide_index"})


def _flat_name(field: dataclasses.Field) -> str:
    """A SurrogateConfig option's name in SDCEConfig: its train.py flag, with the surrogate_ prefix."""
    name = field.metadata["flags"][0] if field.metadata["flags"] else field.name
    return name if name.startswith("surrogate_") else f"surrogate_{name}"


def _fields(section: type, names: Callable[[dataclasses.Field], str], keep: Callable[[str], bool]) -> list[tuple]:
    """``section``'s options as fields of another dataclass, with the help and choices HfArgumentParser reads."""
    types = field_types(section)
    fields = []
    for option in options(section):
        if not keep(option.name):
            continue
        metadata = {"help": option.metadata["help"]}
        if option.metadata["choices"]:
            metadata["choices"] = list(option.metadata["choices"])
        fields.append((names(option), types[option.name], dataclasses.field(default=option.default, metadata=metadata)))
    return fields


_SDCEOptions = dataclasses.make_dataclass(
    "_SDCEOptions",
    _fields(TrainingConfig, lambda f: f.name, lambda name: name in _LOSS_OPTIONS)
    + _fields(SurrogateConfig, _flat_name, lambda name: True)
    + [("max_length", int | None, dataclasses.field(default=None, metadata={"help": (
        "Base tokens per training block, what the surrogate's input length is sized from "
        "(surrogate_length_ratio); default: the length of the first training example.")}))],
)


@dataclass
class SDCEConfig(TrainingArguments, _SDCEOptions):
    """``TrainingArguments`` plus SDCE's options, named as train.py's flags (help: ``--help`` of either)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.surrogate_config()  # its checks, now rather than at the first step

    def surrogate_config(self) -> SurrogateConfig:
        """The surrogate options as train.py's config section holds them."""
        return SurrogateConfig(**{f.name: getattr(self, _flat_name(f)) for f in options(SurrogateConfig)})


class SDCECollator:
    """The wrapped collator's batches with shifted causal-LM labels and, with byte alignment, the surrogate's input."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Batch], inputs: SurrogateInputs | None):
        self.collate = collate
        self.inputs = inputs

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        batch = dict(self.collate(rows))
        shifted = batch.pop("shift_labels", None)
        if shifted is None:  # HF's convention: labels are the inputs; the loss predicts each from the one before
            labels = batch["labels"]
            shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        batch["labels"] = shifted
        if self.inputs is not None:
            batch.update(self.inputs.of(batch["input_ids"]))
        return batch


class SDCETrainer(Trainer):
    """``transformers.Trainer`` that trains on the SDCE loss (module docstring: how, and what it logs).

    ``surrogate``: a ready ``SurrogateSource`` (an engine or a client) to use instead of the one
    ``args`` names. ``processing_class``: the base tokenizer (the alignment needs it).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        args: SDCEConfig,
        *,
        processing_class: Any,
        surrogate: SurrogateSource | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        **kwargs: Any,
    ):
        if not isinstance(args, SDCEConfig):
            raise ValueError(f"SDCETrainer takes SDCEConfig arguments (TrainingArguments plus SDCE's), got {type(args).__name__}")
        if args.n_gpu > 1:
            raise ValueError(f"{args.n_gpu} GPUs in one process (DataParallel): start one process per GPU with torchrun")
        self.guide = self._guide(args, processing_class, surrogate, train_dataset)
        collator = SDCECollator(data_collator or default_data_collator, self.guide.inputs if self.guide else None)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         processing_class=processing_class, **kwargs)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's label count itself
        # The fused loss reads the head's weight outside the model's forward: whole only without sharding.
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if args.fused_loss and sharded:
            log.info("fused loss off: FSDP / DeepSpeed shard the LM head; training on full logits")
        fused = args.fused_loss and not sharded and _keeps_logits(self.model)
        self.hidden = hidden_states_of(self.model) if fused else None
        self._epoch_batches: Iterator[Batch] | None = None
        self._epoch_source: Iterator | None = None
        self._sums: dict[str, torch.Tensor] = {}  # SDCE's metrics since the last log, on the device
        self._logged_at = 0  # the optimizer step of that log

    # -- set-up -----------------------------------------------------------------
    @staticmethod
    def _guide(args: SDCEConfig, tokenizer: Any, surrogate: SurrogateSource | None, train_dataset: Any) -> Guide | None:
        if args.loss_type == "standard":
            return None
        if tokenizer is None or train_dataset is None:
            raise ValueError("SDCETrainer needs processing_class (the base tokenizer) and train_dataset to align "
                             "the surrogate's vocabulary with the base's")
        cfg = args.surrogate_config()
        if cfg.control != "none" and surrogate is None:
            raise ValueError("SDCETrainer builds no control teacher from surrogate_control: pass it as surrogate=, "
                             "e.g. surrogate=trainer.control.UnigramTeacher.of_blocks(tokenizer, train_dataset)")
        if surrogate is None and not (cfg.name_or_path or cfg.endpoint or cfg.cache_dir):
            raise ValueError(f"loss_type {args.loss_type!r} needs a surrogate: set surrogate_model or "
                             "surrogate_endpoint (or guidance_cache, or pass surrogate=), or use loss_type='standard'")
        first = [row["input_ids"] for row in itertools.islice(iter(train_dataset), 8)]
        length = args.max_length or len(first[0])
        source = surrogate or surrogate_source(cfg, args.device, loss_type=args.loss_type, max_seq_length=length)
        return guide_for(source, cfg, tokenizer, loss_type=args.loss_type, max_seq_length=length,
                         sample_text=tokenizer.decode(list(itertools.chain.from_iterable(first))))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "shift_labels" not in self._signature_columns:  # a column of pre-shifted labels is the collator's input
            self._signature_columns.append("shift_labels")

    # -- guidance and the label count ---------------------------------------------
    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The next optimizer step's micro-batches with guidance attached, and their label count over all ranks."""
        if not self._sums:  # the first step since the last log (or since the start, or a resume)
            self._logged_at = self.state.global_step
        if epoch_iterator is not self._epoch_source:  # a new epoch: its own prefetching pipeline
            self._close_guidance()
            depth = self.args.surrogate_prefetch_depth if self.args.surrogate_endpoint else 0
            self._epoch_source, self._epoch_batches = epoch_iterator, guided_batches(epoch_iterator, self.guide, depth)
        batches = list(itertools.islice(self._epoch_batches, num_batches))
        local = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches) if batches else torch.zeros((), dtype=torch.long)
        return batches, self.accelerator.reduce(local.to(device), reduction="sum")

    def _close_guidance(self) -> None:
        if self._epoch_batches is not None:
            self._epoch_batches.close()
        self._epoch_batches = self._epoch_source = None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            self._close_guidance()  # requests prefetched past the last step are cancelled

    # -- the loss -----------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, inputs: Batch, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The SDCE loss of a micro-batch as a share of the step's: sum / num_items_in_batch (all ranks) × ranks.

        Batches without candidates (evaluation) get plain cross-entropy over their own labels: in
        evaluation HF's count is not ours (it shifts labels we have shifted already), so the batch counts them.
        """
        training = model.training and num_items_in_batch is not None
        guided = "cand_ids" in inputs
        lam = surrogate_weight(self.state.global_step, max(self.state.max_steps, 1),
                               self.args.surrogate_loss_weight_initial, self.args.surrogate_loss_weight_final)
        loss_args = {"loss_type": self.args.loss_type if guided else "standard", "surrogate_weight": lam,
                     "num_labels": num_items_in_batch if training else None,
                     "z_loss_multiplier": self.args.z_loss_multiplier}
        targets = (inputs["labels"], inputs.get("cand_ids"), inputs.get("cand_logprobs"))
        # Everything the collator made for the model (position_ids of a padding-free collator too), not SDCE's keys.
        forward = {key: value for key, value in inputs.items() if key not in _SDCE_KEYS}
        if self.hidden is not None and not return_outputs:
            # Through the (DDP-)wrapped model as usual, logits for one position only; the loss applies the head
            # to the decoder's output chunk by chunk.
            with _output_of(self.hidden.model.get_decoder()) as captured:
                outputs = model(**forward, logits_to_keep=1)
            weight, bias = self.hidden.head
            loss, parts = fused_sdce_loss(captured[0], weight, *targets, bias=bias, **loss_args)
        else:
            outputs = model(**forward)
            loss, parts = sdce_loss(outputs.logits, *targets, **loss_args)
        if model.training:
            self._add_metrics(parts, lam)
        if training:
            loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients
        return (loss, outputs) if return_outputs else loss

    # -- metrics ------------------------------------------------------------------
    def _add_metrics(self, parts: dict[str, torch.Tensor], lam: float) -> None:
        values = {"ce": parts["ce"], "surrogate_term": parts["aux"], "guided_positions": parts["guided_positions"],
                  "labels": parts["num_labels"], "lambda": lam, "micro_batches": 1.0}
        for name, value in values.items():
            value = torch.as_tensor(value, device=self.args.device).detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """HF's training logs, plus SDCE's since the last one, over all ranks (every rank logs at the same steps).

        The guidance statistics (requests, latency, retries) are this process's, as HF logs on the main one.
        """
        if "loss" in logs and self._sums:
            names = sorted(self._sums)
            totals = dict(zip(names, self.accelerator.reduce(torch.stack([self._sums[n] for n in names]),
                                                             reduction="sum").tolist()))
            steps = self.state.global_step - self._logged_at
            logs.update({
                "ce": totals["ce"] / max(steps, 1),
                "surrogate_term": totals["surrogate_term"] / max(steps, 1),
                "guided_share": totals["guided_positions"] / max(totals["labels"], 1.0),
            })
            if self.guide is not None:  # a standard run has no lambda to log
                logs.update({"lambda": totals["lambda"] / max(totals["micro_batches"], 1.0),
                             "unguided_batches": float(self.guide.unguided_batches), **self.guide.source.stats()})
            self._sums, self._logged_at = {}, self.state.global_step
        super().log(logs, start_time)


def _keeps_logits(model: PreTrainedModel) -> bool:
    """Whether the model's forward can limit its logits to some positions (``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@contextlib.contextmanager
def _output_of(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the first output (the hidden states) of each forward of ``module`` inside the block."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _args, output: captured.append(output[0]))
    try:
        yield captured
    finally:
        handle.remove()
