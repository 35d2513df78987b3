"""Training throughput: tokens/s of a GPT-2-shaped base, standard vs SDCE, 1 vs 2 ranks.

Usage::

    python bench/bench_throughput.py                    # CPU, small shapes, ~4 min on 2 cores
    python bench/bench_throughput.py --device cuda --n_layer 12 --n_embd 768 --n_head 12 \\
        --seq_len 1024 --batch 8 --mixed_precision bf16 --ranks 1   # GPT-2 small on one GPU, with MFU

Each cell is a real ``train.py`` run (``torchrun --nproc_per_node=2`` for 2 ranks) of
``--steps`` optimizer steps on a randomly initialised GPT-2-shaped base with a local
byte-level BPE, guided by a Llama-shaped surrogate with a SentencePiece-style
vocabulary (as Qwen is to GPT-2: another tokenizer family). Rows: ``standard`` (CE
alone), ``sdce in-process`` (each rank runs its own surrogate copy), ``sdce remote``
(every rank streams guidance requests to one ``python -m surrogate_server`` process on
this machine). tokens/s is the median of the trainer's own per-step figure (global:
all ranks) over the steps after ``--warmup``; it includes waiting for data and
guidance. On CUDA, MFU = 6 N + 12 L H T FLOPs per token (the base model's training
FLOPs; the surrogate's forward is overhead, not counted) over the GPU's peak.

Prints a markdown table. Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surrogate_server.process import ServerProcess  # noqa: E402
from trainer.tracking import read_metrics  # noqa: E402

# Dense bf16 peak TFLOP/s by device name fragment (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}


def build_models(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """(base dir, surrogate dir, train file) written under ``work``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from tests.tokenizer_factory import corpus, train_byte_level_bpe, train_sentencepiece_bpe

    texts = [t for t in corpus() if t.strip()]
    base_tok = train_byte_level_bpe(texts, args.vocab)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(base_tok), n_positions=args.seq_len, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        bos_token_id=base_tok.bos_token_id, eos_token_id=base_tok.eos_token_id,
    ))
    base.save_pretrained(work / "base")
    base_tok.save_pretrained(work / "base")
    sur_tok = train_sentencepiece_bpe(texts, args.vocab)
    heads = max(args.surrogate_hidden // 64, 1)
    surrogate = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(sur_tok), hidden_size=args.surrogate_hidden, intermediate_size=3 * args.surrogate_hidden,
        num_hidden_layers=args.surrogate_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=args.seq_len, bos_token_id=sur_tok.bos_token_id, eos_token_id=sur_tok.eos_token_id,
    ))
    surrogate.save_pretrained(work / "surrogate")
    sur_tok.save_pretrained(work / "surrogate")
    train_file = work / "train.jsonl"
    with train_file.open("w") as f:
        for _ in range(args.repeat_text):
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return work / "base", work / "surrogate", train_file


def run(args: argparse.Namespace, paths: tuple[Path, Path, Path], out: Path, ranks: int, guidance: list[str]) -> float:
    """Median tokens/s (all ranks) of one train.py run after the warm-up steps."""
    base, _, train_file = paths
    flags = [
        "train.py", "--base_model", str(base), "--train_file", str(train_file), "--max_seq_length", str(args.seq_len),
        "--batch_size", str(args.batch), "--max_steps", str(args.steps), "--logging_steps", "1", "--save_steps", "none",
        "--max_eval_blocks", "1", "--device", args.device, "--mixed_precision", args.mixed_precision,
        "--no_progress_bar", "--output_dir", str(out), "--dataloader_num_workers", "1", *guidance,
    ]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]
    done = subprocess.run([*launcher, *flags], cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(launcher[-1:] + flags[:1])} failed:\n{done.stderr[-3000:]}")
    rates = [r["tokens_per_s"] for r in read_metrics(out)][args.warmup:]
    return statistics.median(rates)


def flops_per_token(args: argparse.Namespace) -> float:
    """Training FLOPs per token of the base (PaLM appendix B): 6 N + 12 L H T."""
    n_params = 12 * args.n_layer * args.n_embd**2 + args.vocab * args.n_embd  # blocks + tied embedding/lm_head
    return 6 * n_params + 12 * args.n_layer * args.n_embd * args.seq_len


def peak_flops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)
    return None


def table(results: dict[tuple[str, int], float], args: argparse.Namespace) -> str:
    peak = peak_flops(args)
    fpt = flops_per_token(args)
    rows = sorted({name for name, _ in results}, key=["standard", "sdce in-process", "sdce remote"].index)
    header = "| run | " + " | ".join(f"{r} rank{'s' * (r > 1)} tok/s" for r in args.ranks)
    header += " | " + " | ".join(f"MFU {r}r" for r in args.ranks) if peak else ""
    lines = [header + " |", "|" + "---|" * (1 + len(args.ranks) * (2 if peak else 1))]
    for name in rows:
        cells = [f"{results[name, r]:,.0f}" if (name, r) in results else "n/a" for r in args.ranks]
        if peak:
            cells += [f"{results[name, r] * fpt / (peak * r):.1%}" if (name, r) in results else "n/a" for r in args.ranks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary of base and surrogate")
    parser.add_argument("--surrogate_hidden", type=int, default=256)
    parser.add_argument("--surrogate_layers", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip_remote", action="store_true", help="no surrogate-server rows")
    parser.add_argument("--repeat_text", type=int, default=12, help="copies of the text in the training file")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one run may take")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")
    results: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        work = Path(tmp)
        paths = build_models(args, work)
        cases = [("standard", ["--standard_training"]), ("sdce in-process", ["--surrogate_model", str(paths[1])])]
        server = ServerProcess(paths[1], "--device", "cuda" if args.device.startswith("cuda") else "cpu",
                               "--log_level", "WARNING", cwd=ROOT)
        if not args.skip_remote:
            cases.append(("sdce remote", ["--surrogate_endpoint", server.start().grpc]))
        try:
            for name, guidance in cases:
                for ranks in args.ranks:
                    out = work / f"{name.replace(' ', '-')}-{ranks}"
                    results[name, ranks] = run(args, paths, out, ranks, guidance)
                    print(f"{name}, {ranks} rank(s): {results[name, ranks]:,.0f} tokens/s", file=sys.stderr, flush=True)
        finally:
            server.stop(timeout=60)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    print(f"GPT-2-shaped base: {args.n_layer} layers x {args.n_embd}, vocab {args.vocab}, seq {args.seq_len}, "
          f"batch {args.batch}/rank, {'fp32' if args.mixed_precision == 'no' else args.mixed_precision}; surrogate: Llama-shaped {args.surrogate_layers} x "
          f"{args.surrogate_hidden}; {device}\n")
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
