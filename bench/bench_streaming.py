"""--streaming at corpus scale: memory and start-up against corpus size, and the loader against the step.

Writes two local corpora of jsonl shards (--sizes, default 200 MB and 2000 MB; documents of
tinyshakespeare lines drawn at random, kept in .cache/bench-streaming for the next run), then
for each, in a fresh process, trains a GPT-2-shaped base with --streaming and reports:

- time to first step: from the start of ``Trainer(...)`` (data, model, eval set) to the end of
  the first optimizer step;
- peak resident memory of the process and its loader workers (``ru_maxrss``);
- the loader's tokens/s alone (the stream tokenised and packed, --loader-batches batches) and the
  training step's tokens/s (median over --steps), and their ratio.

Both sizes in one run; the larger corpus must change memory by < 100 MB and the time to the
first step by < 2x, and the loader must outrun the step by >= 5x.

    .venv/bin/python bench/bench_streaming.py
    .venv/bin/python bench/bench_streaming.py --sizes 20 200 --steps 10     # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def write_corpus(root: Path, megabytes: int, shards: int = 8) -> Path:
    """``megabytes`` of jsonl in ``shards`` files (reused when complete)."""
    folder = root / f"corpus-{megabytes}mb"
    done = folder / "COMPLETE"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    lines = [line for line in (SHARED / "tinyshakespeare" / "input.txt").read_text().splitlines() if line.strip()]
    rng = random.Random(megabytes)
    per_shard = megabytes * 2**20 // shards
    for shard in range(shards):
        with open(folder / f"part-{shard:05d}.jsonl", "w") as out:
            written = 0
            while written < per_shard:
                row = json.dumps({"text": " ".join(rng.choices(lines, k=rng.randint(5, 60)))}) + "\n"
                out.write(row)
                written += len(row)
    done.touch()
    return folder


def measure(args: argparse.Namespace, corpus: Path) -> dict[str, float]:
    """In this process: build the trainer on ``corpus``, time the loader alone, then train --steps steps."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from trainer.config import build_config
    from trainer.device import init_backend
    from trainer.train import Trainer

    torch.set_num_threads(args.threads)
    base = Path(args.work) / "base"
    if not (base / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
        GPT2LMHeadModel(GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                                   n_positions=args.seq_len)).save_pretrained(base)
        tokenizer.save_pretrained(base)
    config = build_config({
        "model": {"name_or_path": str(base)},
        "data": {"train_file": str(corpus / "*.jsonl"), "streaming": True, "max_seq_length": args.seq_len,
                 "num_workers": 1, "max_eval_blocks": 16},
        "training": {"loss_type": "standard", "max_steps": args.steps, "per_device_train_batch_size": args.batch,
                     "learning_rate": 1e-4, "logging_steps": 1, "save_steps": None, "device": "cpu",
                     "progress_bar": False, "output_dir": str(Path(args.work) / f"run-{corpus.name}"),
                     "overwrite_output_dir": True},
    })
    started = time.perf_counter()
    trainer = Trainer(config, init_backend(config.training))
    first_step = {}

    original = trainer.train_step

    def timed_step(micro, window):
        original(micro, window)
        first_step.setdefault("seconds", time.perf_counter() - started)

    trainer.train_step = timed_step
    result = trainer.train()
    loader, tokens = trainer._stream_loader(epoch=0), 0
    loader_started = time.perf_counter()
    for i, batch in enumerate(loader):
        tokens += batch["input_ids"].numel()
        if i + 1 == args.loader_batches:
            break
    loader_rate = tokens / (time.perf_counter() - loader_started)
    step_rate = statistics.median(h["tokens_per_s"] for h in result.history[1:])
    del loader
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"first_step_s": first_step["seconds"], "rss_mb": rss / 1024, "loader_tokens_per_s": loader_rate,
            "step_tokens_per_s": step_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[200, 2000], help="corpus sizes, MB of jsonl")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "bench-streaming"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one corpus, print JSON
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print("RESULT " + json.dumps(measure(args, Path(args.one))), flush=True)
        return
    work = Path(args.work)
    corpora = [write_corpus(work, size) for size in args.sizes]
    rows = {}
    for size, corpus in zip(args.sizes, corpora):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", str(corpus)], capture_output=True,
                              text=True, check=False)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"the {size} MB run failed:\n{done.stderr[-3000:]}")
        rows[size] = json.loads(line.removeprefix("RESULT "))
    small, large = (rows[size] for size in args.sizes)
    print(f"--streaming, GPT-2 shape {args.n_layer}x{args.n_embd}, {args.batch} x {args.seq_len} tokens a step, "
          f"1 loader worker, {args.threads} torch threads, standard CE\n")
    print("| corpus | time to first step | peak RSS | loader tokens/s | step tokens/s | loader / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        r = rows[size]
        print(f"| {size} MB | {r['first_step_s']:.1f} s | {r['rss_mb']:.0f} MB | {r['loader_tokens_per_s']:,.0f} | "
              f"{r['step_tokens_per_s']:,.0f} | {r['loader_tokens_per_s'] / r['step_tokens_per_s']:.1f}x |")
    print(f"\n{args.sizes[1] // args.sizes[0]}x the corpus: RSS {large['rss_mb'] - small['rss_mb']:+.0f} MB, time to "
          f"first step x{large['first_step_s'] / small['first_step_s']:.2f}")


if __name__ == "__main__":
    main()
