"""Benchmark of the surrogate server: throughput, latency and wire size against a real server process.

Usage::

    python bench/bench_server.py                          # small model trained here for a moment, CPU, ~2 min
    python bench/bench_server.py --model ./my-surrogate --device cuda --rows 4 --seq_len 1024
    python bench/bench_server.py --config qwen3-0.6b-shape --device cuda --rows 4 --seq_len 1024

Prints markdown tables:

1. tokens/s and p50/p99 request latency with 1, 4 and 16 concurrent gRPC clients (one
   connection each, each sending its next request when the last is answered), dynamic
   batching on and off (two server processes, both up, cells interleaved, in this run);
2. response bytes per token at k = 30 with and without the 0.02 probability floor, on real
   English text (the docstrings of the standard library, or --text FILE);
3. on CUDA: a plain transformers forward + log_softmax + torch.topk baseline and the
   in-process engine on the same batches, measured in this process before the servers
   start, and the server's best throughput as a share of the bf16 matmul ceiling.

The default model is small (Qwen3 shape, hidden 128, 2 layers, a 4096-token BPE trained on
the text) and is trained for --train_steps (8 x 64 tokens each) on the text first, so its
predictions are peaked like a real LM's: with random weights almost nothing clears the
0.02 floor and the wire-size figure would mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protos.sdce.surrogate.v1 import surrogate_pb2 as pb  # noqa: E402
from protos.sdce.surrogate.v1 import surrogate_pb2_grpc as pb_grpc  # noqa: E402
from surrogate_server import codec  # noqa: E402
from surrogate_server.process import ServerProcess  # noqa: E402

FLOOR = math.log(0.02)


# ---------------------------------------------------------------- model and text

STDLIB_MODULES = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
                  "difflib", "email.message", "enum", "functools", "http.client", "inspect", "io", "itertools", "json",
                  "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics",
                  "string", "subprocess", "tarfile", "textwrap", "threading", "unittest", "urllib.parse",
                  "zipfile")


def stdlib_text() -> str:
    """English text: docstrings of STDLIB_MODULES, their functions, classes and methods (deduplicated)."""
    texts = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            members = [obj, *vars(obj).values()] if isinstance(obj, type) else [obj]
            texts += [m.__doc__ for m in members if isinstance(getattr(m, "__doc__", None), str) and len(m.__doc__) > 40
                      and (callable(m) or m is module)]
    return "\n\n".join(dict.fromkeys(texts))


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(text.split("\n\n"), trainers.BpeTrainer(
        vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def build_model_dir(args: argparse.Namespace, text: str, folder: Path) -> Path:
    """A saved model + tokenizer: --model as is, the Qwen3-0.6B shape with random weights, or a small trained one."""
    if args.model:
        return Path(args.model) if Path(args.model).is_dir() else args.model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = train_tokenizer(text, 4096)
    torch.manual_seed(0)
    if args.config == "qwen3-0.6b-shape":
        config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                             rope_theta=1_000_000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
        model = Qwen3ForCausalLM(config)
    else:
        config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                             tie_word_embeddings=False)
        model = Qwen3ForCausalLM(config)
        train_briefly(model, tokenizer(text)["input_ids"], args.train_steps, seq_len=64)
    path = folder / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_briefly(model: torch.nn.Module, ids: list[int], steps: int, seq_len: int) -> None:
    """A few AdamW steps of next-token prediction so the model's distributions are peaked."""
    if steps < 1:
        return
    started = time.perf_counter()
    tokens = torch.tensor(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (8,), generator=generator)
        batch = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"trained the small model for {steps} steps in {time.perf_counter() - started:.0f} s "
          f"(final loss {loss.item():.2f})", file=sys.stderr)


def token_windows(model_dir: Path | str, text: str, rows: int, seq_len: int, vocab_size: int) -> list[np.ndarray]:
    """The text tokenised by the served model's tokenizer, cut into [rows, seq_len] requests."""
    from transformers import AutoTokenizer

    ids = np.asarray(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"], dtype=np.int64) % vocab_size
    per_request = rows * seq_len
    count = len(ids) // per_request
    if count < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one request of {rows} x {seq_len}")
    return [ids[i * per_request:(i + 1) * per_request].reshape(rows, seq_len) for i in range(count)]


# ---------------------------------------------------------------- server process and clients

def start_server(model_dir: Path | str, args: argparse.Namespace, *flags: str) -> ServerProcess:
    """``python -m surrogate_server`` on loopback, free ports, with the benchmark's limits."""
    return ServerProcess(
        model_dir, "--device", args.device, "--dtype", args.dtype, "--log_level", "WARNING",
        "--max_batch_tokens", str(args.max_batch_tokens), "--max_wait_ms", str(args.max_wait_ms),
        "--max_tokens_per_request", str(max(args.rows * args.seq_len, 1024)), *flags, cwd=ROOT, boot_timeout=600,
    ).start()


@dataclass
class LoadResult:
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch_requests: float
    queue_ms: float  # server-side, median
    compute_ms: float  # server-side, median
    requests: int


async def run_load(address: str, windows: list[np.ndarray], clients: int, seconds: float, k: int,
                   floor: float | None) -> LoadResult:
    """``clients`` closed-loop clients for ``seconds``; latency from send to decoded answer."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(clients)]
    latencies: list[float] = []
    batch_requests: list[int] = []
    queue_ms: list[float] = []
    compute_ms: list[float] = []
    tokens = 0

    async def client(index: int, channel: grpc.aio.Channel, deadline: float) -> None:
        nonlocal tokens
        stub = pb_grpc.SurrogateStub(channel)
        i = index
        while time.perf_counter() < deadline:
            ids = windows[i % len(windows)]
            i += clients
            request = pb.TopKRequest(input_ids=codec.pack(ids, pb.INT32), k=k)
            if floor is not None:
                request.logprob_floor = floor
            sent = time.perf_counter()
            response = await stub.TopK(request, timeout=120)
            codec.decode_topk(response.counts, response.ids, response.logprobs, k)
            latencies.append(time.perf_counter() - sent)
            batch_requests.append(response.timings.batch_requests)
            queue_ms.append(response.timings.queue_ms)
            compute_ms.append(response.timings.compute_ms)
            tokens += ids.size

    try:
        for channel in channels:  # warm-up: connect, first forward
            await pb_grpc.SurrogateStub(channel).TopK(pb.TopKRequest(input_ids=codec.pack(windows[0], pb.INT32), k=k))
        started = time.perf_counter()
        await asyncio.gather(*(client(i, ch, started + seconds) for i, ch in enumerate(channels)))
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    latencies.sort()
    return LoadResult(tokens / elapsed, 1000 * statistics.median(latencies),
                      1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                      statistics.fmean(batch_requests), statistics.median(queue_ms), statistics.median(compute_ms),
                      len(latencies))


async def wire_sizes(address: str, windows: list[np.ndarray], k: int, floor: float | None,
                     max_requests: int) -> tuple[float, float, float]:
    """Response and request bytes per token, and entries sent per position, over the text."""
    response_bytes = request_bytes = positions = entries = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SurrogateStub(channel)
        for ids in windows[:max_requests]:
            request = pb.TopKRequest(input_ids=codec.pack(ids, pb.INT32), k=k)
            if floor is not None:
                request.logprob_floor = floor
            response = await stub.TopK(request, timeout=120)
            response_bytes += response.ByteSize()
            request_bytes += request.ByteSize()
            positions += ids.size
            entries += len(response.ids.data) // 4
    return response_bytes / positions, request_bytes / positions, entries / positions


# ---------------------------------------------------------------- CUDA baselines

def cuda_baselines(model_dir: Path | str, windows: list[np.ndarray], args: argparse.Namespace) -> dict[str, float]:
    """Tokens/s of model(...).logits + log_softmax + topk and of the engine, in process; FLOP counts."""
    from transformers import AutoModelForCausalLM

    from surrogate_server.engine import SurrogateEngine

    engine = SurrogateEngine.from_pretrained(str(model_dir), device=args.device, dtype=args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=engine.dtype, attn_implementation="sdpa")
    model = model.to(engine.device).eval()
    batch = torch.from_numpy(np.concatenate(windows[:args.baseline_rows // args.rows or 1])).to(engine.device)

    @torch.inference_mode()
    def plain() -> None:
        logits = model(input_ids=batch, use_cache=False).logits.float()
        torch.log_softmax(logits, dim=-1).topk(args.k, dim=-1)

    def engine_call() -> None:
        engine.topk(batch, torch.ones_like(batch), args.k)

    results = {name: batch.numel() / _cuda_time(fn) for name, fn in (("plain", plain), ("engine", engine_call))}
    config = model.config
    # Matmul FLOPs per token: 2 x (every weight but the embedding lookup, lm_head included) + attention
    # (QK^T and AV over on average T/2 keys, causal).
    embedding = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters())
    matmul_params = params if config.tie_word_embeddings else params - embedding
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 2 * config.num_hidden_layers * batch.shape[1] * config.num_attention_heads * head_dim
    results["flops_per_token"] = 2 * matmul_params + attention
    results["matmul_tflops"] = _matmul_ceiling(engine.dtype)
    return results


def _cuda_time(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def _matmul_ceiling(dtype: torch.dtype, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    seconds = _cuda_time(lambda: a @ b, repeats=20)
    return 2 * n**3 / seconds / 1e12


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hub name or local directory (default: a small model built here)")
    parser.add_argument("--config", default=None, choices=["qwen3-0.6b-shape"], help="random weights of this shape")
    parser.add_argument("--text", default=None, help="text file (default: the standard library's docstrings)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rows", type=int, default=2, help="sequences per request (B)")
    parser.add_argument("--seq_len", type=int, default=128, help="positions per sequence (T)")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=4.0, help="per (batching, clients) cell")
    parser.add_argument("--max_batch_tokens", type=int, default=8192)
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--train_steps", type=int, default=100, help="for the default small model")
    parser.add_argument("--wire_requests", type=int, default=40, help="requests of text for the bytes/token figure")
    parser.add_argument("--baseline_rows", type=int, default=16, help="CUDA baseline batch rows")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    text = Path(args.text).read_text() if args.text else stdlib_text()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="sdce-bench-") as folder:
        model_dir = build_model_dir(args, text, Path(folder))
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
        windows = token_windows(model_dir, text, args.rows, args.seq_len, vocab)
        baselines = cuda_baselines(model_dir, windows, args) if cuda else None
        if cuda:
            torch.cuda.empty_cache()  # the baselines' models are gone; leave the GPU to the servers
        clients = [int(c) for c in args.clients.split(",")]
        load: dict[tuple[bool, int], LoadResult] = {}
        wire: dict[str, tuple[float, float, float]] = {}
        # Both servers up at once, cells interleaved (on, off, on, off, ...): load from elsewhere on a
        # shared machine then hits both settings alike instead of whichever ran second.
        servers = {batching: start_server(model_dir, args, *([] if batching else ["--no_batching"]))
                   for batching in (True, False)}
        try:
            for count in clients:
                for batching, server in servers.items():
                    load[batching, count] = asyncio.run(
                        run_load(server.grpc, windows, count, args.seconds, args.k + 1, FLOOR))
            for name, floor in (("none", None), ("0.02", FLOOR)):
                wire[name] = asyncio.run(wire_sizes(servers[True].grpc, windows, args.k, floor, args.wire_requests))
        finally:
            for server in servers.values():
                server.stop()
    print_tables(args, load, wire, baselines, clients)
    return 0


def print_tables(args: argparse.Namespace, load: dict[tuple[bool, int], LoadResult],
                 wire: dict[str, tuple[float, float, float]], baselines: dict[str, float] | None,
                 clients: list[int]) -> None:
    where = f"device {args.device}, dtype {args.dtype}, requests of {args.rows} x {args.seq_len} tokens, " \
            f"k = {args.k + 1} (k + 1), floor 0.02, --max_wait_ms {args.max_wait_ms}, " \
            f"--max_batch_tokens {args.max_batch_tokens}"
    print(f"\n### Server throughput and latency ({where})\n")
    print("| batching | clients | tokens/s | p50 ms | p99 ms | requests per forward | server queue ms (p50) "
          "| server forward ms (p50) | requests |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batching in (True, False):
        for count in clients:
            r = load[batching, count]
            print(f"| {'on' if batching else 'off'} | {count} | {r.tokens_per_s:,.0f} | {r.p50_ms:.1f} | "
                  f"{r.p99_ms:.1f} | {r.mean_batch_requests:.1f} | {r.queue_ms:.1f} | {r.compute_ms:.1f} | "
                  f"{r.requests} |")
    dense = args.k * (4 + 4)
    print(f"\n### Bytes per token on the wire (k = {args.k}, real text; dense [k] f32 + i32 would be {dense} B)\n")
    print("| floor | response B/token | entries sent per position | request B/token |")
    print("|---|---:|---:|---:|")
    for name, (response, request, entries) in wire.items():
        print(f"| {name} | {response:.1f} | {entries:.2f} | {request:.1f} |")
    if baselines is not None:
        best = max(r.tokens_per_s for r in load.values())
        flops = baselines["flops_per_token"]
        ceiling = baselines["matmul_tflops"]
        print(f"\n### GPU: in-process baselines (batch {args.baseline_rows} x {args.seq_len}) and the matmul ceiling\n")
        print("| path | tokens/s | TFLOP/s | share of bf16 matmul ceiling |")
        print("|---|---:|---:|---:|")
        for name, rate in (("transformers forward + log_softmax + topk", baselines["plain"]),
                           ("SurrogateEngine in process", baselines["engine"]), ("server, best cell", best)):
            print(f"| {name} | {rate:,.0f} | {rate * flops / 1e12:.1f} | {rate * flops / 1e12 / ceiling:.0%} |")
        print(f"\nbf16 matmul ceiling measured here: {ceiling:.0f} TFLOP/s (8192^3 matmul)")


if __name__ == "__main__":
    sys.exit(main())
