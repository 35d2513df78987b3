"""Time and peak memory of the LM head + loss, forward+backward: plain CE, sdce_loss and fused_sdce_loss.

Each case is forward + backward w.r.t. hidden [B, T, H] and the LM head weight [V, H] of
  cross_entropy      logits = hidden @ W.T, then F.cross_entropy                    (a)
  sdce_<aux>         logits = hidden @ W.T, then sdce_loss (today's path)           (b)
  fused_<aux>        fused_sdce_loss(hidden, W, ...): logits only chunk by chunk    (c)
for aux = surrogate and kl, with k candidates per position. Time is the median over --repeats
after --warmup runs, memory the peak above what the inputs already hold (the gradients of
hidden and W count: every case makes them). On CUDA peaks come from
torch.cuda.max_memory_allocated; on CPU each case runs in a fresh subprocess and the peak is
its peak RSS (resource.getrusage) minus its RSS once the inputs are built, so cases don't
pollute each other. Ratios are against (b) of the same aux type (cross_entropy: against
sdce_surrogate), measured in the same run.

Usage:
    .venv/bin/python bench/bench_loss.py                          # CPU, GPT-2 vocab, 8 x 1024, H = 768, k = 30, fp32
    .venv/bin/python bench/bench_loss.py --device cuda --repeats 20   # fp32 and bf16
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
from trainer.losses import DEFAULT_CHUNK_TOKENS, fused_sdce_loss, sdce_loss  # noqa: E402

KINDS = ("cross_entropy", "sdce_surrogate", "sdce_kl", "fused_surrogate", "fused_kl")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_inputs(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Random hidden [B, T, H] and LM head [V, H] (requiring grad), labels with ~1% ignored, k candidates."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq)
    labels = torch.randint(0, args.vocab, shape, generator=g, device=device)
    labels = labels.masked_fill(torch.rand(shape, generator=g, device=device) < 0.01, -100)
    cand_ids = torch.randint(0, args.vocab, (*shape, args.k), generator=g, device=device)
    cand_lp = torch.log(0.02 + 0.3 * torch.rand(*shape, args.k, generator=g, device=device)).sort(-1, True).values
    hidden = torch.randn(*shape, args.hidden, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g, device=device) / args.hidden**0.5).to(dtype)
    return {"hidden": hidden, "weight": weight.requires_grad_(), "labels": labels, "cand_ids": cand_ids,
            "cand_logprobs": cand_lp}


def forward_backward(kind: str, inputs: dict[str, torch.Tensor], chunk_tokens: int) -> None:
    """One forward + backward; the gradients are dropped afterwards like an optimizer step would."""
    hidden, weight, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
    path, _, aux = kind.partition("_")
    cands = {"cand_ids": inputs["cand_ids"], "cand_logprobs": inputs["cand_logprobs"]}
    if kind == "cross_entropy":
        logits = hidden @ weight.T
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1), reduction="sum")
        loss = loss / (labels != -100).sum()
        del logits  # as in a training step: only autograd holds what it saved
    elif path == "sdce":
        loss, _ = sdce_loss(hidden @ weight.T, labels, **cands, loss_type=aux, surrogate_weight=0.5)
    else:
        loss, _ = fused_sdce_loss(hidden, weight, labels, **cands, loss_type=aux, surrogate_weight=0.5,
                                  chunk_tokens=chunk_tokens)
    loss.backward()
    hidden.grad = weight.grad = None


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
        forward_backward(kind, inputs, args.chunk_tokens)
    times, cpu_times = [], []
    for _ in range(args.repeats):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        forward_backward(kind, inputs, args.chunk_tokens)
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # ru_maxrss is KiB on Linux
    return {"ms": 1e3 * statistics.median(times), "cpu_ms": 1e3 * statistics.median(cpu_times),
            "peak_mib": peak / 2**20}


def measure_in_subprocess(kind: str, dtype_name: str, args: argparse.Namespace) -> dict[str, float]:
    """Run one case in a fresh interpreter so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--case", f"{kind}:{dtype_name}", "--device", args.device,
           "--vocab", str(args.vocab), "--batch", str(args.batch), "--seq", str(args.seq), "--k", str(args.k),
           "--hidden", str(args.hidden), "--chunk_tokens", str(args.chunk_tokens),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def baseline_kind(kind: str) -> str:
    """The case a row's ratios are against: today's unfused sdce_loss of the same aux type."""
    return "sdce_surrogate" if kind == "cross_entropy" else "sdce_" + kind.partition("_")[2]


def table(results: dict[tuple[str, str], dict[str, float]], args: argparse.Namespace) -> str:
    """Markdown table; ratios are against baseline_kind of the same dtype in this run.

    On CPU the time ratio is of CPU time (all threads of the process), which other jobs on a shared
    machine disturb far less than wall time; on CUDA it is of wall time.
    """
    clock = "cpu_ms" if args.device == "cpu" else "ms"
    lines = [
        f"LM head + loss, forward+backward w.r.t. hidden and W, device={args.device}, V={args.vocab}, "
        f"B x T = {args.batch} x {args.seq}, H = {args.hidden}, k = {args.k}, fused chunk_tokens = "
        f"{args.chunk_tokens}, median of {args.repeats} after {args.warmup} warm-up",
        "",
        f"| case | dtype | wall ms | CPU ms | {'CPU' if clock == 'cpu_ms' else 'wall'} time / sdce_loss "
        "| peak extra MiB | memory / sdce_loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (kind, dtype_name), r in results.items():
        base = results[(baseline_kind(kind), dtype_name)]
        lines.append(f"| {kind} | {dtype_name} | {r['ms']:.0f} | {r['cpu_ms']:.0f} | {r[clock] / base[clock]:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--chunk_tokens", type=int, default=DEFAULT_CHUNK_TOKENS, help="of fused_sdce_loss")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated, of hidden and W (default: fp32 on CPU, whose bf16 matmul is ~40x "
                             "slower; fp32,bf16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case, JSON out
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.device == "cpu" else 20
    if args.dtypes is None:
        args.dtypes = "fp32" if args.device == "cpu" else "fp32,bf16"
    args.dtypes = args.dtypes.split(",")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if not set(args.dtypes) <= set(DTYPES):
        parser.error(f"--dtypes must be among {sorted(DTYPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case is not None:
        kind, dtype_name = args.case.split(":")
        print(json.dumps(measure(kind, dtype_name, args)))
        return
    results = {}
    for dtype_name in args.dtypes:
        for kind in KINDS:
            run = measure_in_subprocess if args.device == "cpu" else measure
            results[(kind, dtype_name)] = run(kind, dtype_name, args)
            print(f"  {kind:>13} {dtype_name}: {results[(kind, dtype_name)]}", file=sys.stderr, flush=True)
    print(table(results, args))


if __name__ == "__main__":
    main()
