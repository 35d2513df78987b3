"""What the guidance cache saves: a 3-epoch SDCE run without it, with it, and from a precomputed cache.

On the offline demo's setup (``trainer.demo``: stdlib docstrings, a byte-level BPE GPT-2 base, a
SentencePiece Llama surrogate trained first; k = 30, floor 0.02, the defaults), trained on the first
``--docs`` training documents for 3 epochs, all in one run:

1. ``no cache``: the surrogate answers every batch of every epoch;
2. ``cache, filled in epoch 1``: it answers epoch 1, the cache epochs 2-3;
3. ``precomputed``: ``sdce-precompute`` first (timed apart), then training with the surrogate absent.

Reported: wall time, surrogate forwards, share of time the step waited on guidance, eval loss (all
three must agree), bytes per base token on disk, and the cache's read throughput (rows in random
order from a fresh reader, so from the Parquet shards, not memory) against the training step's.

    python bench/bench_cache.py              # ~5 min on 2 cores
    python bench/bench_cache.py --docs 300   # smaller
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import demo  # noqa: E402
from trainer.cache import GuidanceCache, namespaces  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.precompute import precompute  # noqa: E402
from trainer.tracking import read_metrics  # noqa: E402
from trainer.train import train  # noqa: E402


def configure(base: TrainConfig, output_dir: Path, *, train_file: Path, cache: Path | None,
              surrogate: bool = True) -> TrainConfig:
    scfg = dataclasses.replace(base.surrogate, cache_dir=str(cache) if cache else None,
                               name_or_path=base.surrogate.name_or_path if surrogate else None)
    return dataclasses.replace(
        base, surrogate=scfg, data=dataclasses.replace(base.data, train_file=str(train_file)),
        training=dataclasses.replace(base.training, output_dir=str(output_dir), max_steps=-1, num_epochs=3,
                                     logging_steps=5, progress_bar=False))


def summarise(name: str, config: TrainConfig, seconds: float) -> dict:
    records = read_metrics(config.training.output_dir)
    evals = read_metrics(config.training.output_dir, "eval")
    steps = records[-1]["step"]
    return {"run": name, "wall_s": seconds, "steps": steps,
            "forwards": sum(r.get("guidance_requests", 0) for r in records),
            "guidance_wait_share": sum(r["guidance_wait_share"] for r in records) / len(records),
            "tokens_per_s": sum(r["tokens_per_s"] for r in records) / len(records),
            "eval_loss": evals[-1]["loss"]}


def read_throughput(cache_dir: Path, rows_per_call: int, seq_len: int) -> dict:
    """Rows per second read by a fresh reader in random order, rows_per_call at a time (a micro-batch)."""
    (directory, namespace), = namespaces(cache_dir)
    reader = GuidanceCache(cache_dir, namespace, max_bytes=10**12)
    keys = list(reader._index)
    random.Random(0).shuffle(keys)
    started = time.perf_counter()
    for i in range(0, len(keys), rows_per_call):
        assert all(answer is not None for answer in reader.get(keys[i: i + rows_per_call]))
    seconds = time.perf_counter() - started
    return {"rows": len(keys), "rows_per_s": len(keys) / seconds, "base_tokens_per_s": len(keys) * seq_len / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=600, help="Training documents (the first ones of the demo's).")
    parser.add_argument("--workdir", type=Path, default=Path.cwd() / ".cache" / "sdce-demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    profile, spec = demo.demo_setup()
    workdir = args.workdir.resolve()
    assets = demo.prepare_assets(workdir, spec)
    configs = demo.demo_configs(assets, profile, workdir)
    demo.trained_surrogate(configs["surrogate"])
    root = workdir / "bench-cache"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    train_file = root / "train.jsonl"
    with assets.train_file.open() as source:
        train_file.write_text("".join(line for _, line in zip(range(args.docs), source)))
    sdce = configs["sdce"]

    rows = []
    for name, cache in (("no cache", None), ("cache, filled in epoch 1", root / "cache-epochs")):
        config = configure(sdce, root / name.split(",")[0].replace(" ", "-"), train_file=train_file, cache=cache)
        started = time.perf_counter()
        train(config)
        rows.append(summarise(name, config, time.perf_counter() - started))
    cache = root / "cache-precomputed"
    filled = precompute(configure(sdce, root / "precompute", train_file=train_file, cache=cache),
                        batch_size=4 * profile.batch_size)
    config = configure(sdce, root / "precomputed", train_file=train_file, cache=cache, surrogate=False)
    started = time.perf_counter()
    train(config)
    rows.append(summarise("precomputed (surrogate absent)", config, time.perf_counter() - started))

    print(f"\n## 3 epochs of SDCE on {args.docs} demo documents ({rows[0]['steps']} steps of "
          f"{profile.batch_size} x {profile.seq_len} tokens, k = {sdce.surrogate.k}, floor "
          f"{sdce.surrogate.probability_threshold})\n")
    print("| run | wall time | surrogate forwards | guidance wait share | tokens/s | eval loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['run']} | {row['wall_s']:.1f} s | {row['forwards']:.0f} | {100 * row['guidance_wait_share']:.1f}% "
              f"| {row['tokens_per_s']:.0f} | {row['eval_loss']:.6f} |")
    print(f"\nprecompute: {filled['blocks']} blocks in {filled['seconds']:.1f} s; "
          f"{filled['bytes'] / 1e6:.2f} MB on disk = {filled['bytes_per_token']:.1f} B per base token")
    speed = read_throughput(cache, profile.batch_size, profile.seq_len)
    step = rows[0]["tokens_per_s"]
    print(f"cache reads (fresh reader, random order, {profile.batch_size} rows a call): {speed['rows_per_s']:.0f} "
          f"rows/s = {speed['base_tokens_per_s']:.0f} base tokens/s, {speed['base_tokens_per_s'] / step:.0f}x the "
          f"training step's {step:.0f} tokens/s")
    print(json.dumps({"runs": rows, "precompute": filled, "reads": speed}))


if __name__ == "__main__":
    main()
