"""The training loop: data -> guidance -> SDCE loss -> optimizer step -> log / eval / checkpoint.

``train(config)`` is all a caller needs; each component has one job and lives in
its own module (data, guidance, losses, checkpoint, tracking, device).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, set_seed

from trainer.checkpoint import (Progress, checkpoints, latest_checkpoint, load_checkpoint, load_rank_state,
                                remove_checkpoint, resolve_resume, save_checkpoint)
from surrogate_server.source import SurrogateUnavailable
from trainer.config import TrainConfig, TrainingConfig
from trainer.data import DocumentPositions, build_lm_datasets, build_streaming_datasets, first_blocks
from trainer.device import Backend, main_process_first
from trainer.guidance import CANDIDATE_STAGES, Batch, Guide, guided_batches
from trainer.losses import IGNORE_INDEX, fused_sdce_loss, sdce_loss
from trainer.alignment import ByteAligner
from trainer.models import build_guide, hidden_states_of, load_base_model, load_tokenizer, surrogate_length
from trainer.schedules import surrogate_weight
from trainer.teacher import MARGIN, byte_lengths, label_bytes, surrogate_loss, verdict
from trainer.tracking import NullTracker, Tracker

log = logging.getLogger("trainer")
# torchdata 0.11's StatefulDataLoader calls a torch API that torch has deprecated, at every iterator: not ours to fix.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    eval_loss: float | None
    perplexity: float | None
    wall_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class StepPlan:
    """How many micro-batches make an epoch and how many optimizer steps the run takes."""

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, micro_batches_per_epoch: int, cfg: Any) -> "StepPlan":
        steps_per_epoch = micro_batches_per_epoch // cfg.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ValueError(
                f"one epoch holds {micro_batches_per_epoch} micro-batches per rank, fewer than "
                f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}: lower the batch size, "
                "the accumulation steps or max_seq_length, or add data"
            )
        total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * steps_per_epoch)
        return cls(micro_batches_per_epoch, steps_per_epoch, total)


class Trainer:
    def __init__(self, config: TrainConfig, backend: Backend):
        self.config = config
        self.backend = backend
        cfg = config.training
        self.output_dir = Path(cfg.output_dir)
        self._check_output_dir()
        set_seed(cfg.seed)
        self.resume_from = resolve_resume(cfg.resume_from_checkpoint, self.output_dir)
        self.tokenizer = load_tokenizer(config.model)
        self.streaming = config.data.streaming
        with main_process_first(backend):
            if self.streaming:
                self.train_set, self.eval_set = build_streaming_datasets(
                    config.data, self.tokenizer, seed=cfg.seed, rank=backend.rank, world_size=backend.world_size)
            else:
                self.train_set, self.eval_set = build_lm_datasets(config.data, self.tokenizer, seed=cfg.seed)
        self._starved = 0  # logging windows in a row with (almost) no guided position
        # streaming: the loader's position after each micro-batch drawn, in order (prefetching draws ahead);
        # the training loop takes them as it consumes the batches, and saves the last in the checkpoint.
        self._data_states: collections.deque[dict] = collections.deque()
        self.data_state: dict | None = None
        self.model = load_base_model(config.model, self.tokenizer, backend, weights_from=self.resume_from)
        # The first blocks, read once (from a stream too): the alignment's coverage text and its start-up figures.
        sample = first_blocks(self.train_set, 64)
        text = self.tokenizer.decode(sample["input_ids"].flatten().tolist())
        self.guide: Guide | None = build_guide(config, self.tokenizer, backend.device, text,
                                               train_blocks=self.train_set)
        if self.guide is not None and self.guide.inputs is not None:
            measured = self.guide.inputs.measure(sample["input_ids"], sample["labels"])
            log.info("byte alignment on %d blocks: %.1f%% of labelled positions guided, %.2f%% cut by the surrogate "
                     "length, %.0f base tokens/s", len(sample["input_ids"]), 100 * measured["guided_share"],
                     100 * measured["truncated_share"], measured["tokens_per_s"])
        # With the fused loss the wrapped forward stops at the final hidden states; the loss applies the head.
        self.hidden = hidden_states_of(self.model) if config.training.fused_loss else None
        self.ddp_model = backend.wrap_model(self.hidden if self.hidden is not None else self.model)
        self.plan = StepPlan(0, 0, cfg.max_steps) if self.streaming else StepPlan.make(len(self._train_loader(0)), cfg)
        self.optimizer = self._optimizer()
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.plan.total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.plan.total_steps)
        self.scaler = backend.grad_scaler()
        self.progress = Progress(world_size=backend.world_size)
        if self.resume_from is not None:
            self.progress = self._resume(self.resume_from)
        self.tracker = self._tracker()
        self.byte_lengths = byte_lengths(self.tokenizer).to(backend.device)  # eval/nats_per_byte's denominator
        self.teacher = self._teacher_check()  # the surrogate's nats per byte on eval text, when measured
        self._caught_up = False

    # -- set-up -----------------------------------------------------------------
    def _check_output_dir(self) -> None:
        cfg = self.config.training
        existing = latest_checkpoint(self.output_dir)
        if existing and cfg.resume_from_checkpoint is None and not cfg.overwrite_output_dir:
            raise ValueError(
                f"{self.output_dir} already holds {existing.name}: pass --resume_from_checkpoint latest to "
                "continue, --overwrite_output_dir to start afresh, or another --output_dir"
            )
        if existing and cfg.overwrite_output_dir and cfg.resume_from_checkpoint is None:
            # Starting afresh: the old run's checkpoints must not be taken for this run's 'latest'.
            with main_process_first(self.backend):
                if self.backend.is_main:
                    for old in checkpoints(self.output_dir):
                        remove_checkpoint(old)
                    log.info("overwrite_output_dir: removed the old checkpoints in %s", self.output_dir)

    def _tracker(self) -> NullTracker:
        if not self.backend.is_main:
            return NullTracker()
        cfg = self.config.training
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(self.output_dir / "config.yaml")
        log.info("resolved config:\n%s", self.config.to_yaml())
        # Resuming this run (its own output_dir) continues its W&B run and its metrics file; a checkpoint of
        # another run (fine-tuning from it) starts new ones.
        own = self.resume_from is not None and self.resume_from.parent.resolve() == self.output_dir.resolve()
        tracker = Tracker(
            self.output_dir, wandb_project=cfg.wandb_project, run_name=cfg.wandb_run_name, tags=cfg.wandb_tags,
            config=self.config.to_dict(), run_id=self.progress.wandb_run_id if own else None,
            resumed_at=self.progress.step if own else None,
        )
        self.progress.wandb_run_id = tracker.run_id  # saved with every checkpoint: a resumed job continues the run
        return tracker

    @torch.no_grad()
    def _teacher_check(self) -> dict[str, float] | None:
        """Once at the start of a guided run (main process): the surrogate's and the base's nats per byte on the
        first eval blocks, logged in the ``teacher`` section, with a warning when the surrogate is not clearly
        the stronger (trainer.teacher). Not on XLA, where it would compile graphs used once."""
        if self.guide is None or not self.backend.is_main or self.backend.kind == "xla":
            return None
        rows = [self.eval_set[i] for i in range(min(TEACHER_BLOCKS, len(self.eval_set)))]
        batch = {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in ("input_ids", "labels")}
        source, cfg = self.guide.source, self.config
        try:
            aligner = self.guide.inputs.aligner if self.guide.inputs is not None else ByteAligner(
                self.tokenizer, source.tokenizer(),
                max_surrogate_tokens=surrogate_length(dataclasses.replace(cfg.surrogate, alignment="bytes"),
                                                      cfg.data.max_seq_length))
            nats, measured_bytes = surrogate_loss(source, aligner, batch["input_ids"])
        except (ValueError, RuntimeError, SurrogateUnavailable) as err:
            log.warning("teacher check not run: %s", err)
            return None
        self.model.eval()
        device_batch = {key: value.to(self.backend.device) for key, value in batch.items()}
        with self.backend.autocast():
            forward = self.hidden if self.hidden is not None else self.model
            _, parts = self._loss(forward, device_batch, loss_type="standard", surrogate_weight=0.0, num_labels=1)
        self.model.train()
        base_bytes = float(label_bytes(device_batch["labels"], self.byte_lengths))
        record = {"surrogate_nats_per_byte": nats / max(measured_bytes, 1.0),
                  "base_nats_per_byte": float(parts["ce"]) / max(base_bytes, 1.0), "blocks": float(len(rows))}
        record["surrogate_advantage"] = 1.0 - record["surrogate_nats_per_byte"] / record["base_nats_per_byte"]
        message = verdict(record["surrogate_nats_per_byte"], record["base_nats_per_byte"])
        log.log(logging.INFO if record["surrogate_advantage"] >= MARGIN else logging.WARNING,
                "teacher check on %d eval blocks (the base at step %d): %s", len(rows), self.progress.step, message)
        self.tracker.log(record, self.progress.step, section="teacher")
        return record

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config.training
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.backend.kind == "cuda"
        return torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused or None
        )

    def _resume(self, path: Path) -> Progress:
        progress = load_checkpoint(
            path, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, backend=self.backend
        )
        if self.streaming:
            self.data_state = load_rank_state(path, "data_state", self.backend.rank)
            if progress.world_size != self.backend.world_size or self.data_state is None:
                raise ValueError(
                    f"{path.name} holds the stream positions of {progress.world_size} ranks; resume a streaming run "
                    f"with as many ranks ({self.backend.world_size} now), from a checkpoint of a streaming run"
                )
        elif progress.world_size != self.backend.world_size and progress.micro_batch:
            raise ValueError(
                f"{path.name} stopped mid-epoch with {progress.world_size} ranks; resuming with "
                f"{self.backend.world_size} would change which rank reads which batches. Resume with "
                f"{progress.world_size} ranks, or from a checkpoint saved at an epoch boundary"
            )
        log.info("resuming from %s at step %d (epoch %d, micro-batch %d)", path, progress.step, progress.epoch, progress.micro_batch)
        return progress

    # -- data -------------------------------------------------------------------
    def _loader(self, dataset: Any, sampler: Any, batch_size: int, drop_last: bool, collate_fn: Any = None,
                kind: type[DataLoader] = DataLoader) -> DataLoader:
        return kind(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.backend.dataloader_workers(self.config.data.num_workers),
            pin_memory=self.backend.kind == "cuda",
            collate_fn=collate_fn,
            # Its own generator: starting an iterator then draws nothing from the global RNG, which after a
            # resume holds the checkpoint's state and must give the same dropout masks as the first run's.
            generator=torch.Generator().manual_seed(self.config.training.seed),
        )

    def _train_loader(self, epoch: int) -> DataLoader:
        """This rank's shard of the training blocks, shuffled by (seed, epoch)."""
        cfg = self.config.training
        sampler = DistributedSampler(
            self.train_set, num_replicas=self.backend.world_size, rank=self.backend.rank,
            shuffle=True, seed=cfg.seed, drop_last=True,
        )
        sampler.set_epoch(epoch)
        return self._loader(self.train_set, sampler, cfg.per_device_train_batch_size, drop_last=True,
                            collate_fn=self._collate(train=True))

    def _eval_loader(self) -> DataLoader:
        """This rank's share of the eval blocks: every block counted once over all ranks, none repeated."""
        cfg = self.config.training
        share = Subset(self.eval_set, range(self.backend.rank, len(self.eval_set), self.backend.world_size))
        batch_size = cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size
        return self._loader(share, None, batch_size, drop_last=False, collate_fn=self._collate(train=False))

    def _collate(self, *, train: bool) -> Any:
        return collate_fn(self.guide if train else None, self.config, self.tokenizer)

    def _stream_loader(self, epoch: int) -> StatefulDataLoader:
        """This rank's stream of training blocks; ``state_dict()`` after a batch is the position to resume from."""
        self.train_set.set_epoch(epoch)
        return self._loader(self.train_set, None, self.config.training.per_device_train_batch_size, drop_last=True,
                            collate_fn=self._collate(train=True), kind=StatefulDataLoader)

    def _stream_batches(self) -> Iterator[Batch]:
        """Streaming: micro-batches from the saved stream position on; at the stream's end, again from its start."""
        epoch, state = self.progress.epoch, self.data_state
        while True:
            loader = self._stream_loader(epoch)
            if state is not None:
                loader.load_state_dict(state["loader"])
                state = None
            drawn = False
            for batch in loader:
                self._data_states.append({"epoch": epoch, "loader": loader.state_dict()})
                drawn = True
                yield batch
            if not drawn:
                raise ValueError("the training stream holds less than one batch: add data or lower the batch size")
            epoch += 1

    def _micro_batches(self) -> Iterator[Batch]:
        """Training micro-batches from the saved position on, epoch after epoch."""
        if self.streaming:
            yield from self._stream_batches()
            return
        epoch, skip = self.progress.epoch, self.progress.micro_batch
        per_epoch = self.plan.steps_per_epoch * self.config.training.gradient_accumulation_steps
        while True:
            loader = self._train_loader(epoch)
            yield from itertools.islice(loader, skip, per_epoch)
            epoch, skip = epoch + 1, 0

    def _batches(self) -> Iterator[Batch]:
        """Guided micro-batches; on XLA they reach the device through the backend's device loader."""
        micro = self._micro_batches()
        if self.guide is not None and not self.config.surrogate.endpoint:
            # An in-process surrogate lives on the device: guide device batches, in this thread.
            return guided_batches(self.backend.device_loader(micro), self.guide)
        depth = self.config.surrogate.prefetch_depth if self.config.surrogate.endpoint else 0
        return self.backend.device_loader(guided_batches(micro, self.guide, depth))

    def _advance(self, micro_batches: int) -> None:
        if self.streaming:  # the stream's position is the loader's, after the last micro-batch consumed
            for _ in range(micro_batches):
                self.data_state = self._data_states.popleft()
            self.progress.epoch, self.progress.micro_batch = self.data_state["epoch"], 0
            return
        per_epoch = self.plan.steps_per_epoch * self.config.training.gradient_accumulation_steps
        position = self.progress.micro_batch + micro_batches
        self.progress.epoch += position // per_epoch
        self.progress.micro_batch = position % per_epoch

    # -- the loop ---------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.config.training
        start = time.perf_counter()
        batches = self._batches()
        window = MetricWindow(self.backend, z_loss=cfg.z_loss_multiplier > 0, guided=self.guide is not None)
        history: list[dict[str, float]] = []
        bar = tqdm(
            total=self.plan.total_steps, initial=self.progress.step, disable=not (self.backend.is_main and cfg.progress_bar),
            desc="train", dynamic_ncols=True,
        )
        self.ddp_model.train()
        while self.progress.step < self.plan.total_steps:
            waited, guidance_waited = time.perf_counter(), self._guidance_wait()
            try:
                micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
            except SurrogateUnavailable as err:
                self._stop_on_surrogate_failure(err)
            window.waited(time.perf_counter() - waited, self._guidance_wait() - guidance_waited)
            self.train_step(micro, window)
            self.progress.step += 1
            self._advance(len(micro))
            bar.update(1)
            step = self.progress.step
            if step % cfg.logging_steps == 0 or step == self.plan.total_steps:
                lr = self.scheduler.get_last_lr()[0]
                record = window.flush(self._guide_stats(), lr=lr, epoch=self._epoch_float(),
                                      tokens_seen=self.progress.tokens_seen)
                record.update(self.backend.step_metrics())  # after the flush: its own graph counts too
                history.append({"step": step, **record})
                self.tracker.log(record, step)
                self._diagnose(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.plan.total_steps:
                self._evaluate_and_log(step)
            if cfg.save_steps and step % cfg.save_steps == 0:
                self._save_checkpoint()
        bar.close()
        batches.close()
        self._close_guide()
        eval_metrics = self._evaluate_and_log(self.progress.step)
        self._save_final()
        wall = time.perf_counter() - start
        self.tracker.summary({"eval": _eval_names(eval_metrics), "train": {"wall_seconds": wall}})
        self.tracker.finish()
        return TrainResult(
            self.output_dir, self.progress.step, eval_metrics.get("eval_loss"), eval_metrics.get("eval_perplexity"), wall, history
        )

    def train_step(self, micro: list[Batch], window: "MetricWindow") -> None:
        """One optimizer step over ``micro`` (gradient accumulation with the global label count)."""
        cfg = self.config.training
        backend = self.backend
        lam = backend.step_scalar(surrogate_weight(
            self.progress.step, self.plan.total_steps, self.config.surrogate.loss_weight_initial, self.config.surrogate.loss_weight_final
        ))
        # A tensor where the batches are (on XLA: the device), so counting never syncs with the host.
        local_labels = sum((b["labels"] != IGNORE_INDEX).sum() for b in micro)
        num_labels = backend.all_reduce_sum(local_labels.to(backend.device, torch.float32))
        for i, batch in enumerate(micro):
            with backend.no_sync(self.ddp_model, last_micro_batch=i == len(micro) - 1), backend.autocast():
                batch = {k: v.to(backend.device, non_blocking=True) for k, v in batch.items()}
                if "candidate_stages" in batch:
                    window.add_stages(batch.pop("candidate_stages"))
                loss, parts = self._loss(self.ddp_model, batch, loss_type=cfg.loss_type, surrogate_weight=lam,
                                         num_labels=num_labels, z_loss_multiplier=cfg.z_loss_multiplier)
            # DDP averages gradients over ranks; the loss is already a share of the global sum.
            self.scaler.scale(loss * backend.world_size).backward()
            window.add(loss.detach(), parts, tokens=batch["input_ids"].numel() * backend.world_size)
        backend.reduce_gradients(self.optimizer)
        self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        backend.optimizer_step(self.optimizer, self.scaler)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        backend.mark_step()
        window.end_step(grad_norm.detach(), lam, local_labels)
        self.progress.tokens_seen += sum(b["input_ids"].numel() for b in micro) * backend.world_size

    def _loss(self, forward: torch.nn.Module, batch: Batch, **loss_args: Any) -> tuple[torch.Tensor, dict]:
        """The SDCE loss of a batch: fused from the hidden states (``forward`` ends there), else from the logits."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        if "position_ids" in batch:  # data.document_mask: no cache, so transformers masks by document
            inputs.update(position_ids=batch["position_ids"], use_cache=False)
        candidates = (batch["labels"], batch.get("cand_ids"), batch.get("cand_logprobs"))
        if self.hidden is not None:
            weight, bias = self.hidden.head
            return fused_sdce_loss(forward(**inputs), weight, *candidates, bias=bias, **loss_args)
        return sdce_loss(forward(**inputs).logits, *candidates, **loss_args)

    def _diagnose(self, record: dict[str, float]) -> None:
        """Warn when guidance has all but vanished for STARVED_WINDOWS logging windows in a row (then every 25th),
        naming the setting that removed the candidates; quiet while the surrogate is down (that has its own)."""
        if self.guide is None or "candidates_proposed" not in record:
            return
        starved = record["guided_share"] < STARVED_SHARE
        self._starved = self._starved + 1 if starved else 0
        if self._starved == STARVED_WINDOWS or (self._starved > STARVED_WINDOWS and self._starved % 25 == 0):
            log.warning("guidance has vanished: %.2f%% of labelled positions got candidates in each of the last %d "
                        "logging windows, so this run trains on cross-entropy alone. %s", 100 * record["guided_share"],
                        self._starved, starvation_cause(record, self.config))

    def _guidance_wait(self) -> float:
        """Seconds the loop has spent blocked on guidance alone (not data), cumulative."""
        return self.guide.wait_seconds if self.guide is not None else 0.0

    def _close_guide(self) -> None:
        """Let a remote source cancel requests still retrying (prefetches past the last step)."""
        if self.guide is not None:
            self.guide.source.close()

    def _guide_stats(self) -> dict[str, float]:
        """This rank's guidance statistics since the last logging step (``MetricWindow.flush`` combines the ranks')."""
        if self.guide is None:
            return {}
        return {"unguided_batches": float(self.guide.unguided_batches), **self.guide.source.stats()}

    def _stop_on_surrogate_failure(self, err: Exception) -> None:
        """surrogate.on_failure=fail: checkpoint the last complete step, then stop with a clear message."""
        self._close_guide()
        path = self._save_checkpoint()
        raise SurrogateUnavailable(
            f"the surrogate stayed unreachable ({err}); saved {path} — start the server again and rerun with "
            "--resume_from_checkpoint latest, or use --surrogate_on_failure skip to train through outages on CE alone"
        ) from err

    def _epoch_float(self) -> float:
        if self.streaming:
            return float(self.progress.epoch)
        per_epoch = self.plan.steps_per_epoch * self.config.training.gradient_accumulation_steps
        return self.progress.epoch + self.progress.micro_batch / per_epoch

    # -- evaluation and saving --------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-level cross-entropy and perplexity of the eval set (all ranks together)."""
        self.ddp_model.eval()
        total = torch.zeros(3, device=self.backend.device, dtype=torch.float64)
        for batch in self._eval_loader():
            batch = {k: v.to(self.backend.device) for k, v in batch.items()}
            with self.backend.autocast():
                forward = self.hidden if self.hidden is not None else self.model
                _, parts = self._loss(forward, batch, loss_type="standard", surrogate_weight=0.0, num_labels=1)
            text_bytes = label_bytes(batch["labels"], self.byte_lengths).double()
            total += torch.stack([parts["ce"].double(), parts["num_labels"].double(), text_bytes])
            self.backend.mark_step()
        self.backend.all_reduce_sum(total)
        self.ddp_model.train()
        ce_sum, count, text_bytes = total.tolist()
        loss = ce_sum / max(count, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count,
                "eval_nats_per_byte": ce_sum / max(text_bytes, 1.0)}

    def _evaluate_and_log(self, step: int) -> dict[str, float]:
        metrics = self.evaluate()
        if self.teacher is not None:  # how far ahead of the base its teacher still is, on the eval text
            metrics["eval_teacher_advantage"] = 1.0 - self.teacher["surrogate_nats_per_byte"] / metrics[
                "eval_nats_per_byte"]
            if metrics["eval_teacher_advantage"] < MARGIN and not self._caught_up:
                self._caught_up = True
                log.warning("at step %d the base has caught up with its surrogate on the eval text (%.4f vs %.4f "
                            "nats/byte): from here guidance pulls it toward a model no better than itself; a lower "
                            "--surrogate_loss_weight_final, fewer steps with guidance or a stronger surrogate would "
                            "do better", step, metrics["eval_nats_per_byte"], self.teacher["surrogate_nats_per_byte"])
        self.tracker.log(_eval_names(metrics), step, section="eval")
        return metrics

    def _save_checkpoint(self) -> Path:
        return save_checkpoint(
            self.output_dir,
            self.progress,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            config_yaml=self.config.to_yaml(),
            backend=self.backend,
            save_total_limit=self.config.training.save_total_limit,
            rank_state={"data_state": self.data_state} if self.streaming else None,
        )

    def _save_final(self) -> None:
        if self.backend.is_main:
            self.model.save_pretrained(self.output_dir, state_dict=self.backend.host_state_dict(self.model))
            self.tokenizer.save_pretrained(self.output_dir)
            log.info("final model saved to %s", self.output_dir)
        self.backend.barrier()


def collate_fn(guide: Guide | None, config: TrainConfig, tokenizer: Any) -> Any:
    """A loader's collate_fn, run in its workers: the byte-aligned surrogate input (training batches: pass their
    ``guide``) and the per-document position ids (data.document_mask); None: torch's default."""
    collate = guide.inputs if guide is not None else None
    if config.data.document_mask:
        collate = DocumentPositions(tokenizer.eos_token_id, collate)
    return collate


class MetricWindow:
    """Running sums of step metrics on the device; summed over ranks and read back (one host sync) only at logging steps."""

    AVERAGED = ("grad_norm", "lambda")  # equal on every rank: the rank sum is divided back
    # Guidance statistics (the Guide's counts, SurrogateSource.stats()) as ranks combine them: counts add,
    # per-request means are weighted by each rank's guidance_requests (p50: the weighted mean of the ranks' medians).
    GUIDANCE_COUNTS = ("unguided_batches", "guidance_requests", "guidance_retries", "guidance_failures",
                       "guidance_reregistrations", "guidance_cache_hits", "guidance_cache_misses",
                       "guidance_cache_dropped")
    GUIDANCE_MEANS = ("guidance_latency_ms_mean", "guidance_latency_ms_p50", "guidance_bytes_per_token",
                      "guidance_server_queue_ms", "guidance_server_compute_ms")

    def __init__(self, backend: Backend, z_loss: bool = False, guided: bool = True):
        self.backend = backend
        self.guided = guided  # a standard run logs no lambda (its decay means nothing there)
        self.parts = ("ce", "aux", "guided_positions") + (("z_loss",) if z_loss else ())
        self.device = backend.device
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.tokens = 0
        self.wait_seconds = 0.0
        self.guidance_wait_seconds = 0.0
        self.started = time.perf_counter()

    def _add(self, name: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value, device=self.device, dtype=torch.float32)
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], tokens: int) -> None:
        self._add("loss", loss)
        for name in self.parts:
            if name in parts:
                self._add(name, parts[name])
        self.tokens += tokens

    def add_stages(self, counts: torch.Tensor) -> None:
        """A guided micro-batch's select_candidates stage counts (guidance.CANDIDATE_STAGES), on the device."""
        self._add("stages", counts)

    def waited(self, seconds: float, on_guidance: float) -> None:
        """Time the loop spent blocked on the next micro-batches (data + guidance), and on guidance alone."""
        self.wait_seconds += seconds
        self.guidance_wait_seconds += on_guidance

    def end_step(self, grad_norm: torch.Tensor, lam: float | torch.Tensor, local_labels: torch.Tensor | int) -> None:
        self._add("grad_norm", grad_norm)
        self._add("lambda", lam)
        self._add("labels", local_labels)
        self.steps += 1

    def flush(self, guidance: dict[str, float] | None = None, **extra: float) -> dict[str, float]:
        """The window's averages over its steps and over all ranks (every rank must call this).

        ``guidance``: this rank's guidance statistics, logged for the whole job; ``extra``:
        values every rank shares (learning rate, epoch), logged as they are.
        """
        names = sorted(name for name in self.sums if name != "stages")
        host = self._host_values(guidance or {})
        stages = self.sums.get("stages", torch.zeros(len(CANDIDATE_STAGES), device=self.device))
        stacked = torch.cat([torch.stack([self.sums[name] for name in names]), stages,
                             torch.tensor(host, device=self.device, dtype=torch.float32)])
        totals = self.backend.all_reduce_sum(stacked).tolist()
        values = dict(zip(names, totals))
        stage_totals = dict(zip(CANDIDATE_STAGES, totals[len(names):]))
        host_totals = totals[len(names) + len(CANDIDATE_STAGES):]
        for name in self.AVERAGED:
            values[name] /= self.backend.world_size
        elapsed = time.perf_counter() - self.started
        steps = max(self.steps, 1)
        waits, guidance_stats = self._job_guidance(host_totals)
        record = {
            "loss": values["loss"] / steps,
            "ce": values["ce"] / steps,
            "surrogate_term": values.get("aux", 0.0) / steps,
            "lambda": values["lambda"] / steps,
            "grad_norm": values["grad_norm"] / steps,
            "guided_share": values.get("guided_positions", 0.0) / max(values["labels"], 1.0),
            "tokens_per_s": self.tokens / max(elapsed, 1e-9),
            "input_wait_share": waits[0] / max(elapsed, 1e-9),
            "guidance_wait_share": waits[1] / max(elapsed, 1e-9),
            **guidance_stats,
            **extra,
        }
        if "z_loss" in values:
            record["z_loss"] = values["z_loss"] / steps
        if not self.guided:
            del record["lambda"]
        if stage_totals["labelled"] > 0:  # shares of the guided batches' labelled positions after each rule
            for name in CANDIDATE_STAGES[1:-1]:
                record[f"candidates_{name}"] = stage_totals[name] / stage_totals["labelled"]
        self._reset()
        return record

    def _host_values(self, guidance: dict[str, float]) -> list[float]:
        """This rank's host-side values in a fixed layout that sums over ranks: the wait times, then per
        guidance count (value, 1 if this rank has it) and per guidance mean (mean x requests, requests)."""
        unknown = set(guidance) - set(self.GUIDANCE_COUNTS) - set(self.GUIDANCE_MEANS)
        assert not unknown, f"add {sorted(unknown)} to MetricWindow.GUIDANCE_COUNTS or GUIDANCE_MEANS"
        requests = guidance.get("guidance_requests", 0.0)
        values = [self.wait_seconds, self.guidance_wait_seconds]
        for name in self.GUIDANCE_COUNTS:
            values += [guidance.get(name, 0.0), float(name in guidance)]
        for name in self.GUIDANCE_MEANS:
            values += [guidance.get(name, 0.0) * requests, requests if name in guidance else 0.0]
        return values

    def _job_guidance(self, totals: list[float]) -> tuple[tuple[float, float], dict[str, float]]:
        """From the rank sums of ``_host_values``: (the mean wait times of a rank, the job's guidance statistics)."""
        world = self.backend.world_size
        waits = (totals[0] / world, totals[1] / world)
        counts, means = totals[2: 2 + 2 * len(self.GUIDANCE_COUNTS)], totals[2 + 2 * len(self.GUIDANCE_COUNTS):]
        stats = {name: counts[2 * i] for i, name in enumerate(self.GUIDANCE_COUNTS) if counts[2 * i + 1] > 0}
        for i, name in enumerate(self.GUIDANCE_MEANS):
            weighted, weight = means[2 * i], means[2 * i + 1]
            if weight > 0:
                stats[name] = weighted / weight
        return waits, stats


TEACHER_BLOCKS = 16  # eval blocks the teacher check reads
STARVED_SHARE = 0.01  # guided share under which a logging window counts as starved of guidance
STARVED_WINDOWS = 3  # starved windows in a row before the warning


def starvation_cause(record: dict[str, float], config: TrainConfig) -> str:
    """Which rule of docs/method.md §3 removed the candidates, from a logging record's stage shares, and what to change."""
    scfg, threshold = config.surrogate, config.surrogate.probability_threshold
    if record["candidates_proposed"] < STARVED_SHARE:
        if scfg.endpoint and threshold > 0:
            return (f"The server sent no proposal: all were below the floor it applies, probability_threshold="
                    f"{threshold} (the surrogate is weak or untrained here). Lower --probability_threshold.")
        return "The surrogate proposed nothing at these positions (all masked or non-finite): check its input."
    if record["candidates_permitted"] < STARVED_SHARE:
        return ("No proposal maps to a base token (the vocabularies barely overlap): check the tokenizer pair and "
                "the alignment coverage logged at start.")
    if record["candidates_above_threshold"] < STARVED_SHARE:
        return (f"probability_threshold={threshold} removed them: the surrogate's probabilities are all below it "
                "(weak or untrained here). Lower --probability_threshold.")
    return ("Target exclusion removed them: the surrogate's only proposals above the threshold are the targets "
            "themselves, which loss_type surrogate leaves out (docs/method.md §3); loss_type kl keeps them.")


def _eval_names(metrics: dict[str, float]) -> dict[str, float]:
    """``evaluate()``'s metrics as the ``eval`` section names them: eval_loss -> loss (tracked as eval/loss)."""
    return {key.removeprefix("eval_"): value for key, value in metrics.items()}


def train(config: TrainConfig) -> TrainResult | None:
    """Run one training job end to end; returns the final evaluation.

    With --device tpu on several chips the job runs in processes started here
    (one per chip) and this returns None; metrics.jsonl holds the results.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return platform(config.training).launch(config.training, _train_process, config)


def platform(cfg: TrainingConfig) -> ModuleType:
    """The module that starts and initialises this run's processes (``launch``, ``init_backend``)."""
    if cfg.device == "tpu":
        from trainer import xla

        return xla
    from trainer import device

    return device


def _train_process(config: TrainConfig) -> TrainResult:
    """One training process: torchrun's, a TPU chip's, or the only one."""
    backend = platform(config.training).init_backend(config.training)
    # One copy of the log, from rank 0. The project's loggers get their level too: a library imported
    # before train() (transformers imports torch_xla) may have configured the root logger.
    for name in ("trainer", "surrogate_server"):
        logging.getLogger(name).setLevel(logging.INFO if backend.is_main else logging.WARNING)
    if not backend.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return Trainer(config, backend).train()
    finally:
        backend.shutdown()
