"""``sdce-precompute``: fill the guidance cache ahead of training, from the run's own config and data pipeline.

    sdce-precompute --config config.yaml --guidance_cache /mnt/bucket/guidance
    torchrun --nproc_per_node 8 -m trainer.precompute --config config.yaml --guidance_cache DIR
    sdce-precompute --config config.yaml --surrogate_endpoint host:50051 --guidance_cache DIR

It reads every training block once, in order (this rank's share of them under torchrun), asks the
surrogate (in-process on this machine's GPU, or the server) for what the cache lacks and stores it, so
a training run with the same config and ``--guidance_cache DIR`` reads every block's guidance from the
cache and needs no surrogate at all (leave --surrogate_model / --surrogate_endpoint out). Rows already
in the cache are skipped: an interrupted run started again computes only what is missing. With
``--streaming`` it reads one pass of the stream. The last line printed is a JSON summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from trainer.cli import build_parser, parse_with
from trainer.config import TrainConfig
from trainer.data import build_lm_datasets, build_streaming_datasets, first_blocks
from trainer.guidance import guided_batches
from trainer.models import build_guide, load_tokenizer
from trainer.train import collate_fn, platform

log = logging.getLogger("trainer.precompute")


def precompute(config: TrainConfig, batch_size: int | None = None) -> dict[str, Any]:
    """Fill ``config.surrogate.cache_dir`` with the guidance of every training block; the job's summary."""
    scfg, cfg = config.surrogate, config.training
    if not scfg.cache_dir:
        raise ValueError("sdce-precompute needs --guidance_cache DIR: the cache to fill")
    if cfg.loss_type == "standard":
        raise ValueError("loss_type standard uses no guidance: precompute for --loss_type surrogate or kl")
    if not (scfg.name_or_path or scfg.endpoint):
        raise ValueError("sdce-precompute needs the surrogate: --surrogate_model NAME_OR_PATH or "
                         "--surrogate_endpoint HOST:PORT")
    started = time.perf_counter()
    backend = platform(cfg).init_backend(cfg)
    try:
        tokenizer = load_tokenizer(config.model)
        if config.data.streaming:
            blocks, _ = build_streaming_datasets(config.data, tokenizer, seed=cfg.seed, rank=backend.rank,
                                                 world_size=backend.world_size)
            blocks.set_epoch(0)
            total = None
        else:
            train_set, _ = build_lm_datasets(config.data, tokenizer, seed=cfg.seed)
            blocks = Subset(train_set, range(backend.rank, len(train_set), backend.world_size))
            total = len(blocks)
        text = tokenizer.decode(first_blocks(blocks, 64)["input_ids"].flatten().tolist())
        guide = build_guide(config, tokenizer, backend.device, text)
        cache = guide.source.cache
        loader = DataLoader(blocks, batch_size=batch_size or cfg.per_device_train_batch_size,
                            num_workers=backend.dataloader_workers(config.data.num_workers),
                            collate_fn=collate_fn(guide, config, tokenizer))
        depth = scfg.prefetch_depth if scfg.endpoint else 0
        bar = tqdm(total=total, unit="block", desc="precompute", disable=not (backend.is_main and cfg.progress_bar))
        for batch in guided_batches(loader, guide, depth):
            bar.update(len(batch["input_ids"]))
            bar.set_postfix(cached=cache.totals["hits"], computed=cache.totals["misses"])
        bar.close()
        guide.source.close()  # writes the last shard
        counts = torch.tensor([cache.totals["hits"] + cache.totals["misses"], cache.totals["misses"],
                               cache.totals["dropped"]], dtype=torch.float64, device=backend.device)
        blocks_seen, computed, dropped = (int(v) for v in backend.all_reduce_sum(counts).tolist())
        backend.barrier()  # every rank's shards are written: the size is the job's
        stored = cache.bytes
        tokens = blocks_seen * config.data.max_seq_length
        summary = {"blocks": blocks_seen, "computed": computed, "cached": blocks_seen - computed, "dropped": dropped,
                   "cache_dir": str(cache.dir), "bytes": stored, "bytes_per_token": stored / max(tokens, 1),
                   "seconds": round(time.perf_counter() - started, 2)}
        if backend.is_main:
            log.info("guidance of %d blocks in %s: %d computed, %d already there; %.1f MB, %.1f B per base token",
                     blocks_seen, cache.dir, computed, blocks_seen - computed, stored / 1e6, summary["bytes_per_token"])
        return summary
    finally:
        backend.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "sdce-precompute"
    parser.description = __doc__.split("\n\n")[0].removeprefix("``sdce-precompute``: ")
    parser.add_argument("--precompute_batch_size", type=int, default=None,
                        help="Blocks per surrogate request (default: the training batch size).")
    config, rest = parse_with(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = precompute(config, rest.get("precompute_batch_size"))
    except ValueError as err:
        if rest.get("debug"):
            raise
        print(f"sdce-precompute: error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # torchrun: the job's summary, once
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
