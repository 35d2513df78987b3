"""How much of a training step waits for surrogate guidance: remote prefetch vs in-process.

Trains the same tiny run (a GPT-2-shaped base, a Llama-shaped surrogate with another
tokenizer family, local data; all built here, offline) several ways and reads
``input_wait_share`` (the share of wall time the loop blocked on its next batch)
from the trainer's logs:

- standard: no guidance at all; what is left is data loading (the floor);
- in-process: the surrogate forward runs inline, before each step;
- remote, prefetch_depth 0: a request to the server per step, inline;
- remote, prefetch_depth 2: the background prefetcher (the default).

"blocked on guidance" is the share of the loop's time spent waiting for guidance
alone (``Guide.wait_seconds``), data loading excluded. Figures are medians over
logging windows, the first window (start-up, first connections) left out. The server
(one thread) shares this machine's cores with the trainer, so its forward also slows
the trainer's steps, and on a busy machine the figures move by a few percent from run
to run. Usage::

    python bench/bench_guidance_wait.py                 # ~1-2 min on 2 CPU cores
    python bench/bench_guidance_wait.py --steps 200 --batch_size 8 --seq_len 128

Prints a markdown table. Goal: remote with prefetch under 2% when the server keeps up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surrogate_server.process import ServerProcess  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", str(ROOT / ".cache" / "bench" / "datasets"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_assets(root: Path, seq_len: int) -> dict[str, Path]:
    """Tiny random-init base and surrogate (different tokenizer families) and a jsonl of local text."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from tests.tokenizer_factory import corpus, train_byte_level_bpe, train_sentencepiece_bpe

    texts = [t for t in corpus() if t.strip()]
    base_tok, surrogate_tok = train_byte_level_bpe(texts, 600), train_sentencepiece_bpe(texts, 700)
    torch.manual_seed(0)
    # The base is the larger model, as in real use, so that a server on this machine can keep up with it.
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(base_tok), n_positions=max(64, seq_len), n_embd=128, n_layer=4,
                                      n_head=4, bos_token_id=base_tok.bos_token_id, eos_token_id=base_tok.eos_token_id))
    surrogate = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(surrogate_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(64, seq_len),
        bos_token_id=surrogate_tok.bos_token_id, eos_token_id=surrogate_tok.eos_token_id))
    paths = {"base": root / "base", "surrogate": root / "surrogate", "data": root / "train.jsonl"}
    for model, tokenizer, path in ((base, base_tok, paths["base"]), (surrogate, surrogate_tok, paths["surrogate"])):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    paths["data"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 4))
    return paths


def run(paths: dict[str, Path], out: Path, args: argparse.Namespace, surrogate: dict | None) -> dict[str, float]:
    """One training run (``surrogate`` None: standard training); medians of its logged windows after the first."""
    from trainer.config import build_config
    from trainer.train import train

    config = build_config({
        "model": {"name_or_path": str(paths["base"])},
        "surrogate": {"k": 30, "probability_threshold": 0.0, "request_timeout": 10.0,
                      **(surrogate or {"name_or_path": "unused"})},
        "data": {"train_file": str(paths["data"]), "max_seq_length": args.seq_len, "max_eval_blocks": 1},
        "training": {"output_dir": str(out), "max_steps": args.steps, "per_device_train_batch_size": args.batch_size,
                     "logging_steps": args.window, "save_steps": None, "progress_bar": False, "device": "cpu",
                     "loss_type": "surrogate" if surrogate else "standard"},
    })
    result = train(config)
    windows = result.history[1:] or result.history
    tokens_per_step = args.batch_size * args.seq_len
    summary = {
        "input_wait_share": statistics.median(w["input_wait_share"] for w in windows),
        "step_ms": 1e3 * tokens_per_step / statistics.median(w["tokens_per_s"] for w in windows),
    }
    if surrogate:
        summary["guidance_wait_share"] = statistics.median(w["guidance_wait_share"] for w in windows)
    for key in ("guidance_latency_ms_p50", "guidance_bytes_per_token", "unguided_batches"):
        if key in windows[-1]:
            summary[key] = statistics.median(w[key] for w in windows)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--window", type=int, default=10, help="logging window (steps); the first is left out")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer (the server uses 1)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_guidance_wait_") as tmp:
        root = Path(tmp)
        paths = build_assets(root, args.seq_len)
        server = ServerProcess(paths["surrogate"], "--device", "cpu", "--dtype", "float32", cwd=ROOT,
                               env={"OMP_NUM_THREADS": "1"})
        with server:
            address = server.grpc
            modes = {
                "none (standard training)": None,
                "in-process": {"name_or_path": str(paths["surrogate"])},
                "remote, prefetch_depth 0": {"endpoint": address, "prefetch_depth": 0},
                "remote, prefetch_depth 2": {"endpoint": address, "prefetch_depth": 2},
            }
            results = {name: run(paths, root / f"run{i}", args, sur) for i, (name, sur) in enumerate(modes.items())}
    print(f"\n{args.steps} steps of {args.batch_size}x{args.seq_len} tokens, k=30, no threshold, CPU, trainer "
          f"{args.threads} thread(s); medians over logging windows of {args.window} steps after the first\n")
    floor = results["none (standard training)"]["input_wait_share"]
    print("| guidance | step time (ms) | input_wait_share | over standard | blocked on guidance | request p50 (ms) "
          "| bytes/token | unguided |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        latency = f"{r['guidance_latency_ms_p50']:.1f}" if "guidance_latency_ms_p50" in r else "-"
        wire = f"{r['guidance_bytes_per_token']:.0f}" if "guidance_bytes_per_token" in r else "-"
        guidance = f"{100 * r['guidance_wait_share']:.2f}%" if "guidance_wait_share" in r else "-"
        print(f"| {name} | {r['step_ms']:.1f} | {100 * r['input_wait_share']:.2f}% "
              f"| {100 * (r['input_wait_share'] - floor):+.2f}% | {guidance} | {latency} | {wire} "
              f"| {r.get('unguided_batches', 0):.0f} |")


if __name__ == "__main__":
    main()
