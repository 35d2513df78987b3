"""Time and peak memory of sdce_loss forward+backward against plain cross-entropy.

Each case is forward + backward of one loss on random logits [B, T, V] that require
grad; time is the median over --repeats after --warmup runs, memory the peak above
what the inputs already hold. On CUDA peaks come from torch.cuda.max_memory_allocated;
on CPU each case runs in a fresh subprocess and the peak is its peak RSS
(resource.getrusage) minus its RSS once the inputs are built, so cases don't pollute
each other.

Usage:
    .venv/bin/python bench/bench_loss.py                          # CPU, GPT-2 vocab, 8 x 1024, k = 30
    .venv/bin/python bench/bench_loss.py --device cuda --repeats 20
    .venv/bin/python bench/bench_loss.py --batch 2 --seq 256      # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.losses import sdce_loss  # noqa: E402

KINDS = ("cross_entropy", "surrogate", "kl")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_inputs(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Random logits [B, T, V] (requiring grad), labels with ~1% ignored, k candidates per position."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq)
    labels = torch.randint(0, args.vocab, shape, generator=g, device=device)
    labels = labels.masked_fill(torch.rand(shape, generator=g, device=device) < 0.01, -100)
    cand_ids = torch.randint(0, args.vocab, (*shape, args.k), generator=g, device=device)
    cand_lp = torch.log(0.02 + 0.3 * torch.rand(*shape, args.k, generator=g, device=device)).sort(-1, True).values
    logits = torch.randn(*shape, args.vocab, generator=g, device=device, dtype=dtype).requires_grad_()
    return {"logits": logits, "labels": labels, "cand_ids": cand_ids, "cand_logprobs": cand_lp}


def forward_backward(kind: str, inputs: dict[str, torch.Tensor]) -> None:
    """One forward + backward; the gradient is dropped afterwards like an optimizer step would."""
    logits, labels = inputs["logits"], inputs["labels"]
    if kind == "cross_entropy":
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1), reduction="sum")
        loss = loss / (labels != -100).sum()
    else:
        loss, _ = sdce_loss(logits, labels, inputs["cand_ids"], inputs["cand_logprobs"], loss_type=kind,
                            surrogate_weight=0.5)
    loss.backward()
    logits.grad = None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(kind: str, dtype_name: str, args: argparse.Namespace) -> dict[str, float]:
    """Median milliseconds and peak extra MiB of one case, in this process."""
    device = torch.device(args.device)
    inputs = build_inputs(args, DTYPES[dtype_name], device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _rss_bytes()
    for _ in range(args.warmup):
        forward_backward(kind, inputs)
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        forward_backward(kind, inputs)
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # ru_maxrss is KiB on Linux
    return {"ms": 1e3 * statistics.median(times), "peak_mib": peak / 2**20}


def measure_in_subprocess(kind: str, dtype_name: str, args: argparse.Namespace) -> dict[str, float]:
    """Run one case in a fresh interpreter so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--case", f"{kind}:{dtype_name}", "--device", args.device,
           "--vocab", str(args.vocab), "--batch", str(args.batch), "--seq", str(args.seq), "--k", str(args.k),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(results: dict[tuple[str, str], dict[str, float]], args: argparse.Namespace) -> str:
    """Markdown table; ratios are against cross-entropy of the same dtype in this run."""
    lines = [
        f"sdce_loss vs F.cross_entropy, forward+backward, device={args.device}, V={args.vocab}, "
        f"B x T = {args.batch} x {args.seq}, k = {args.k}, median of {args.repeats} after {args.warmup} warm-up",
        "",
        "| loss | logits | median ms | time / CE | peak extra MiB | memory / CE |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (kind, dtype_name), r in results.items():
        ce = results[("cross_entropy", dtype_name)]
        lines.append(f"| {kind} | {dtype_name} | {r['ms']:.1f} | {r['ms'] / ce['ms']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['peak_mib'] / ce['peak_mib']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case, JSON out
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.device == "cpu" else 20
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case is not None:
        kind, dtype_name = args.case.split(":")
        print(json.dumps(measure(kind, dtype_name, args)))
        return
    results = {}
    for dtype_name in DTYPES:
        for kind in KINDS:
            run = measure_in_subprocess if args.device == "cpu" else measure
            results[(kind, dtype_name)] = run(kind, dtype_name, args)
            print(f"  {kind:>13} {dtype_name}: {results[(kind, dtype_name)]}", file=sys.stderr, flush=True)
    print(table(results, args))


if __name__ == "__main__":
    main()
