"""Byte-aligned surrogate input (docs/method.md §2b) against the id-by-id scheme (§2), GPT-2 -> Qwen3.

For each text and block length T it packs the GPT-2 token stream into blocks (EOS after every
document, as trainer.data does) and reports, on ONE CPU core (affinity pinned, one torch and one
tokenizers thread):

- base tokens/s of ``ByteAligner.align`` (best of --repeats) per second of the process's CPU time
  (what one core does, also on a busy machine) and per wall-clock second, beside the rate of
  Qwen3's tokenizer alone on the same documents (the floor: the aligner must run it);
- the guided share of positions, with S large enough that nothing is truncated, and the share of
  positions truncated at S = ceil(ratio * T / 8) * 8 for the --ratios;
- the surrogate tokens a block needs, as S/T quantiles (what ratio covers 99% / 99.9% / all blocks).

Then the id-by-id scheme's figures on the same documents: the share of documents whose mapped
sequence b2s[x] equals Qwen3's own tokenization, the share of base positions whose mapped prefix
still equals it (up to the first difference the surrogate reads its own tokenization; the
byte-aligned scheme's guided share is the comparable figure), and the share of base tokens that
are holes.

Texts: tinyshakespeare (one document per non-blank line, as trainer.data reads a .txt file) and
standard-library docstrings (the demo's corpus). Timings on a shared machine are noisy: rerun.

Usage:
    .venv/bin/python bench/bench_alignment.py
    .venv/bin/python bench/bench_alignment.py --lengths 256 --repeats 5 --max-tokens 100000
    .venv/bin/python bench/bench_alignment.py --tokenizers ../shared/data/tokenizers --ratios 1.0 1.125
"""

from __future__ import annotations

import os

# One core: set before tokenizers / torch start their thread pools.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.alignment import ByteAligner, align_vocabularies
from trainer.demo import stdlib_docstrings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def texts(args: argparse.Namespace) -> dict[str, list[str]]:
    lines = (args.shakespeare).read_text().splitlines()
    return {
        "tinyshakespeare": [line for line in lines if line.strip()],
        "docstrings": stdlib_docstrings(max_docs=args.max_docs),
    }


def stream(tokenizer: PreTrainedTokenizerFast, docs: list[str], max_tokens: int) -> tuple[np.ndarray, list[str]]:
    """The token stream (EOS after every document) cut to max_tokens, and the documents it holds."""
    ids, used = [], []
    for doc, encoded in zip(docs, tokenizer(docs, add_special_tokens=False)["input_ids"]):
        if len(ids) >= max_tokens:
            break
        ids += [*encoded, tokenizer.eos_token_id]
        used.append(doc)
    return np.array(ids[:max_tokens], dtype=np.int64), used


def time_align(aligner: ByteAligner, blocks: torch.Tensor, batch: int, repeats: int) -> tuple[float, float]:
    """Best (CPU, wall) seconds of a pass over all blocks, `batch` blocks per call."""
    cpu, wall = math.inf, math.inf
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for i in range(0, len(blocks), batch):
            aligner.align(blocks[i : i + batch])
        cpu, wall = min(cpu, time.process_time() - start_cpu), min(wall, time.perf_counter() - start_wall)
    return cpu, wall


def time_tokenizer(tokenizer: PreTrainedTokenizerFast, docs: list[str], repeats: int) -> float:
    """Best CPU seconds of Qwen3's tokenizer alone over the documents (its backend, batched, like the aligner)."""
    backend = tokenizer.backend_tokenizer
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        backend.encode_batch_fast(docs, add_special_tokens=False)
        best = min(best, time.process_time() - start)
    return best


def byte_aligned_rows(args, base, surrogate, corpora) -> list[str]:
    rows = []
    for length in args.lengths:
        size_max = 2 * length  # nothing truncated: the guided share and the S each block needs
        aligner = ByteAligner(base, surrogate, max_surrogate_tokens=size_max)
        sizes = [math.ceil(ratio * length / 8) * 8 for ratio in args.ratios]
        for name, docs in corpora.items():
            ids, used = stream(base, docs, args.max_tokens)
            blocks = torch.from_numpy(ids[: len(ids) // length * length].reshape(-1, length))
            aligned = aligner.align(blocks)
            counts = aligned.counts()
            assert counts.truncated == 0, "raise size_max"
            truncated = " | ".join(f"{float((aligned.guide_index >= size).float().mean()):.2%}" for size in sizes)
            ratios = aligned.surrogate_lengths.double() / length
            q99, q999 = (float(torch.quantile(ratios, q)) for q in (0.99, 0.999))
            cpu, wall = time_align(aligner, blocks, max(1, args.batch_tokens // length), args.repeats)
            floor = time_tokenizer(surrogate, used, args.repeats) * blocks.numel() / len(ids)
            rows.append(
                f"| {name} | {length} | {len(blocks)} | {blocks.numel() / cpu / 1e3:.0f}k"
                f" | {blocks.numel() / wall / 1e3:.0f}k | {blocks.numel() / floor / 1e3:.0f}k"
                f" | {counts.guided_share:.1%} | {truncated}"
                f" | {float(ratios.median()):.3f} | {q99:.3f} | {q999:.3f} | {float(ratios.max()):.3f} |"
            )
    return rows


def id_by_id_rows(base, surrogate, corpora, max_tokens: int) -> list[str]:
    b2s = align_vocabularies(base, surrogate).base_to_surrogate
    rows = []
    for name, docs in corpora.items():
        _, used = stream(base, docs, max_tokens)
        base_ids = base(used, add_special_tokens=False)["input_ids"]
        own = surrogate(used, add_special_tokens=False)["input_ids"]
        mapped = [b2s[torch.tensor(ids, dtype=torch.long)].tolist() for ids in base_ids]
        equal = sum(m == o for m, o in zip(mapped, own)) / len(used)
        in_sync = sum(common_prefix(m, o) for m, o in zip(mapped, own)) / sum(map(len, mapped))
        holes = sum(v == -1 for m in mapped for v in m) / sum(map(len, mapped))
        rows.append(f"| {name} | {len(used)} | {equal:.1%} | {in_sync:.1%} | {holes:.2%} |")
    return rows


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizers", type=Path, default=SHARED / "tokenizers", help="holds gpt2/ and qwen3/")
    parser.add_argument("--shakespeare", type=Path, default=SHARED / "tinyshakespeare" / "input.txt")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="block lengths T")
    parser.add_argument("--max-tokens", type=int, default=300_000, help="base tokens per text")
    parser.add_argument("--max-docs", type=int, default=4000, help="docstrings to read")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="base tokens per align() call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 1.125, 1.25], help="S = ceil(ratio*T/8)*8")
    parser.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the last allowed one)")
    args = parser.parse_args()

    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    base = AutoTokenizer.from_pretrained(args.tokenizers / "gpt2")
    surrogate = AutoTokenizer.from_pretrained(args.tokenizers / "qwen3")
    corpora = texts(args)
    print(f"GPT-2 -> Qwen3, one core (cpu {cpu}), {args.batch_tokens} base tokens per call, best of {args.repeats}\n")
    print("byte-aligned (§2b): base tokens per CPU second / per wall second; Qwen3's tokenizer alone per CPU second")
    truncated = " | ".join(f"truncated, S/T {ratio:g}" for ratio in args.ratios)
    print(
        f"| text | T | blocks | tokens/s (CPU) | tokens/s (wall) | tokenizer alone (CPU) | guided | {truncated} "
        "| S/T needed p50 | p99 | p99.9 | max |"
    )
    print("|---|" + "---:|" * (11 + len(args.ratios)))
    for row in byte_aligned_rows(args, base, surrogate, corpora):
        print(row, flush=True)
    print("\nid-by-id (§2): surrogate input b2s[x], holes masked")
    print(
        "| text | documents | mapped = Qwen3's own tokenization | positions before the first difference "
        "| holes (base tokens unmapped) |"
    )
    print("|---|---:|---:|---:|---:|")
    for row in id_by_id_rows(base, surrogate, corpora, args.max_tokens):
        print(row, flush=True)


if __name__ == "__main__":
    main()
