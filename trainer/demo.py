"""The offline SDCE demo: no network, no downloads, a few minutes on a laptop CPU.

    python -m trainer.demo                      # the full demo (under 10 min on 2 CPU cores)
    python -m trainer.demo --quick              # a smoke run of a few seconds
    python -m trainer.demo --workdir /tmp/sdce --steps 800 --device cuda

Everything it needs is made on the spot from what every Python install has:

1. a corpus: the docstrings of the standard library (train.jsonl / valid.jsonl);
2. two tokenizers of different families trained on it: a GPT-2 style byte-level BPE
   for the base and a SentencePiece-style BPE (``▁`` spaces, ``<0xNN>`` byte
   fallback) for the surrogate, so the vocabulary alignment of docs/method.md §1 is real;
3. two model directories (config + tokenizer): a small GPT-2 base and a somewhat
   bigger Llama surrogate.

Then it trains the surrogate from scratch with plain cross-entropy, trains the base
twice from the same initialisation, data and budget (SDCE guided by that surrogate,
and standard cross-entropy), and prints a table of the two eval losses, also written
to ``WORKDIR/results.md``. Prepared assets and the trained surrogate are cached in
the work directory, keyed by their settings, so a second run goes straight to the
base runs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

# The demo never needs the hub; failing fast beats retrying a dead network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# On a CPU shared with other work, OpenMP threads that spin while waiting made training
# steps 4-5x slower (measured: 2 threads, 2 busy cores); sleeping waiters cost little
# when the cores are free. Read by the OpenMP runtime when torch loads it, so set first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402

from trainer.config import DEVICES, TrainConfig, build_config  # noqa: E402

log = logging.getLogger("trainer.demo")  # also when run as __main__

ASSET_FORMAT = 1  # bump when the preparation code changes what it writes
SEED = 42
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})
END_OF_TEXT = "<|endoftext|>"
SPIECE_SPECIALS = ("<unk>", "<s>", "</s>")
BYTE_PIECES = tuple(f"<0x{byte:02X}>" for byte in range(256))


@dataclass(frozen=True)
class AssetSpec:
    """What the prepared corpus, tokenizers and model configs depend on (their cache key)."""

    max_docs: int | None = None  # cap on corpus documents (None: all docstrings)
    min_chars: int = 32  # shorter docstrings are dropped
    valid_every: int = 50  # every this many-th document goes to valid.jsonl (2%)
    base_vocab_size: int = 4096
    surrogate_vocab_size: int = 4096
    max_positions: int = 256
    base_width: int = 128
    base_layers: int = 4
    base_heads: int = 4
    surrogate_width: int = 192
    surrogate_ffn: int = 512
    surrogate_layers: int = 4
    surrogate_heads: int = 4

    def key(self) -> str:
        blob = json.dumps([dataclasses.asdict(self), platform.python_version(), ASSET_FORMAT], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


QUICK_SPEC = AssetSpec(
    max_docs=400, base_vocab_size=512, surrogate_vocab_size=512, max_positions=64, base_width=32, base_layers=2,
    base_heads=2, surrogate_width=48, surrogate_ffn=96, surrogate_layers=2, surrogate_heads=2,
)


@dataclass(frozen=True)
class RunProfile:
    """Training budget of the three runs."""

    steps: int
    surrogate_steps: int
    seq_len: int
    batch_size: int
    learning_rate: float = 2e-3


FULL = RunProfile(steps=400, surrogate_steps=600, seq_len=128, batch_size=8)
QUICK = RunProfile(steps=6, surrogate_steps=6, seq_len=32, batch_size=4)


@dataclass(frozen=True)
class DemoAssets:
    root: Path

    @property
    def train_file(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def valid_file(self) -> Path:
        return self.root / "valid.jsonl"

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def surrogate_init_dir(self) -> Path:
        return self.root / "surrogate-init"

    @property
    def manifest(self) -> Path:
        return self.root / "assets.json"


# -- corpus ------------------------------------------------------------------------
def stdlib_sources() -> Iterator[Path]:
    """The standard library's .py files in a fixed (sorted) order, tests and IDLE left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if name not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def module_docstrings(path: Path) -> list[str]:
    """Docstrings of the module and of every class and function in it (none if it fails to parse)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


def stdlib_docstrings(min_chars: int = 32, max_docs: int | None = None) -> list[str]:
    """Distinct standard-library docstrings of at least ``min_chars`` characters, one document each."""
    seen: set[str] = set()
    docs: list[str] = []
    for path in stdlib_sources():
        for doc in module_docstrings(path):
            if len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                docs.append(doc)
                if max_docs is not None and len(docs) >= max_docs:
                    return docs
    return docs


def split_documents(docs: Sequence[str], valid_every: int) -> tuple[list[str], list[str]]:
    """Every ``valid_every``-th document (from the middle of each run) to valid, the rest to train."""
    is_valid = [i % valid_every == valid_every // 2 for i in range(len(docs))]
    return [d for d, v in zip(docs, is_valid) if not v], [d for d, v in zip(docs, is_valid) if v]


def write_jsonl(path: Path, docs: Sequence[str]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for doc in docs:
            out.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


# -- tokenizers --------------------------------------------------------------------
def train_byte_level_bpe(texts: Sequence[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A GPT-2 style tokenizer: byte-level BPE, ``<|endoftext|>`` as its only special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=max_length,
    )


def train_sentencepiece_bpe(texts: Sequence[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A Llama-2 style tokenizer: ``▁`` for spaces, BPE with ``<0xNN>`` byte-fallback pieces.

    Ids: ``<unk> <s> </s>``, then the 256 byte pieces, then the learned pieces, as in
    SentencePiece models. Characters outside the 150 most frequent go through bytes.
    """
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_PIECES),
        special_tokens=list(SPIECE_SPECIALS),
        limit_alphabet=150,
        show_progress=False,
    )
    learner.train_from_iterator(texts, trainer, length=len(texts))
    learned = json.loads(learner.to_str())["model"]
    pieces = list(SPIECE_SPECIALS) + list(BYTE_PIECES)
    known = set(pieces)
    pieces += [p for p, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]) if p not in known]
    merges = [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in learned["merges"]]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    tokenizer.add_special_tokens(list(SPIECE_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=max_length
    )


# -- model directories ---------------------------------------------------------------
def base_model_config(spec: AssetSpec, tokenizer: PreTrainedTokenizerFast) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.max_positions,
        n_embd=spec.base_width,
        n_layer=spec.base_layers,
        n_head=spec.base_heads,
        resid_pdrop=0.0,  # tiny models, short runs: dropout only slows them down
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def surrogate_model_config(spec: AssetSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.surrogate_width,
        intermediate_size=spec.surrogate_ffn,
        num_hidden_layers=spec.surrogate_layers,
        num_attention_heads=spec.surrogate_heads,
        num_key_value_heads=spec.surrogate_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def prepare_assets(workdir: Path, spec: AssetSpec) -> DemoAssets:
    """Corpus, tokenizers and model directories under ``workdir``, made once per ``spec``."""
    assets = DemoAssets(Path(workdir) / f"assets-{spec.key()}")
    made = (assets.manifest, assets.base_dir / "config.json", assets.surrogate_init_dir / "config.json")
    if all(path.is_file() for path in made):
        log.info("demo assets: reusing %s", assets.root)
        return assets
    start = time.perf_counter()
    staging = DemoAssets(assets.root.with_name(f".{assets.root.name}.tmp{os.getpid()}"))
    shutil.rmtree(staging.root, ignore_errors=True)
    staging.root.mkdir(parents=True)
    docs = stdlib_docstrings(spec.min_chars, spec.max_docs)
    train_docs, valid_docs = split_documents(docs, spec.valid_every)
    write_jsonl(staging.train_file, train_docs)
    write_jsonl(staging.valid_file, valid_docs)
    # Model directories that AutoConfig/AutoTokenizer (and init_from_scratch) load like hub models.
    base_tok = train_byte_level_bpe(train_docs, spec.base_vocab_size, spec.max_positions)
    base_tok.save_pretrained(staging.base_dir)
    base_model_config(spec, base_tok).save_pretrained(staging.base_dir)
    surrogate_tok = train_sentencepiece_bpe(train_docs, spec.surrogate_vocab_size, spec.max_positions)
    surrogate_tok.save_pretrained(staging.surrogate_init_dir)
    surrogate_model_config(spec, surrogate_tok).save_pretrained(staging.surrogate_init_dir)
    manifest = {
        "spec": dataclasses.asdict(spec),
        "python": platform.python_version(),
        "documents": {"train": len(train_docs), "valid": len(valid_docs)},
        "characters": sum(map(len, docs)),
        "vocab": {"base": len(base_tok), "surrogate": len(surrogate_tok)},
    }
    staging.manifest.write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(assets.root, ignore_errors=True)  # a leftover without its manifest
    staging.root.rename(assets.root)
    log.info(
        "demo assets: %d documents (%.1f MB of text), vocab %d/%d, made in %.1fs at %s",
        len(docs),
        manifest["characters"] / 1e6,
        len(base_tok),
        len(surrogate_tok),
        time.perf_counter() - start,
        assets.root,
    )
    return assets


# -- the three runs ------------------------------------------------------------------
def run_config(
    assets: DemoAssets,
    profile: RunProfile,
    *,
    model_dir: Path,
    output_dir: Path,
    steps: int,
    loss_type: str,
    surrogate_dir: Path | None = None,
    device: str = "auto",
) -> TrainConfig:
    """One demo run: from-scratch init, the demo corpus, a fixed step budget, final model only."""
    return build_config(
        {
            "model": {"name_or_path": str(model_dir), "init_from_scratch": True},
            "surrogate": {"name_or_path": str(surrogate_dir) if surrogate_dir else None},
            "data": {
                "train_file": str(assets.train_file),
                "eval_file": str(assets.valid_file),
                "max_seq_length": profile.seq_len,
            },
            "training": {
                "loss_type": loss_type,
                "device": device,
                "max_steps": steps,
                "per_device_train_batch_size": profile.batch_size,
                "learning_rate": profile.learning_rate,
                "warmup_steps": max(1, steps // 20),
                "weight_decay": 0.1,
                "logging_steps": max(1, steps // 10),
                "save_steps": None,
                "output_dir": str(output_dir),
                "overwrite_output_dir": True,
                "seed": SEED,
            },
        }
    )


def surrogate_output_dir(assets: DemoAssets, profile: RunProfile) -> Path:
    """Where the trained surrogate goes, keyed by what its training depends on."""
    recipe = [profile.surrogate_steps, profile.seq_len, profile.batch_size, profile.learning_rate, SEED]
    return assets.root / f"trained-surrogate-{hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:8]}"


def demo_configs(
    assets: DemoAssets, profile: RunProfile, workdir: Path, device: str = "auto"
) -> dict[str, TrainConfig]:
    """The surrogate run and the two base runs (SDCE, standard), in the order they run."""
    surrogate_dir = surrogate_output_dir(assets, profile)
    base = {"model_dir": assets.base_dir, "steps": profile.steps, "device": device}
    return {
        "surrogate": run_config(
            assets, profile, model_dir=assets.surrogate_init_dir, output_dir=surrogate_dir,
            steps=profile.surrogate_steps, loss_type="standard", device=device,
        ),
        "sdce": run_config(
            assets, profile, output_dir=workdir / "runs" / "sdce", loss_type="surrogate",
            surrogate_dir=surrogate_dir, **base,
        ),
        "standard": run_config(assets, profile, output_dir=workdir / "runs" / "standard", loss_type="standard", **base),
    }


ROW_TITLES = {
    "surrogate": "surrogate (Llama, trained first)",
    "sdce": "base + SDCE",
    "standard": "base, standard CE",
}


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per run (eval loss, perplexity, steps, wall time), then SDCE minus standard."""

    def number(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        "| run | loss | eval loss | perplexity | steps | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        wall = f"{row['wall_seconds']:.0f} s" + (" (cached)" if row.get("cached") else "")
        lines.append(
            f"| {ROW_TITLES.get(name, name)} | {row['loss_type']} | {number(row['eval_loss'], '.4f')} "
            f"| {number(row['perplexity'], '.2f')} | {row['steps']} | {wall} |"
        )
    sdce, standard = results.get("sdce", {}).get("eval_loss"), results.get("standard", {}).get("eval_loss")
    if sdce is not None and standard is not None:
        verdict = "SDCE better" if sdce < standard else "standard better"
        lines += ["", f"SDCE - standard eval loss: {sdce - standard:+.4f} ({verdict})"]
    return "\n".join(lines)


def _run(name: str, config: TrainConfig) -> dict[str, Any]:
    from trainer.train import train  # the heavy part, imported only when training

    log.info("demo: training %s (%s, %d steps)", name, config.training.loss_type, config.training.max_steps)
    result = train(config)
    return {
        "loss_type": config.training.loss_type,
        "eval_loss": result.eval_loss,
        "perplexity": result.perplexity,
        "steps": result.steps,
        "wall_seconds": result.wall_seconds,
    }


def trained_surrogate(config: TrainConfig) -> dict[str, Any]:
    """Train the surrogate unless this exact run already finished (its summary is the marker)."""
    summary = Path(config.training.output_dir) / "demo_run.json"
    if summary.is_file():
        log.info("demo: reusing the trained surrogate in %s", summary.parent)
        return {**json.loads(summary.read_text()), "cached": True}
    row = _run("surrogate", config)
    summary.write_text(json.dumps(row))
    return row


def demo_setup(quick: bool = False, **profile_overrides: int | None) -> tuple[RunProfile, AssetSpec]:
    """The budget and the assets of the full (or quick) demo; ``profile_overrides``: RunProfile fields (None: kept)."""
    profile, spec = (QUICK, QUICK_SPEC) if quick else (FULL, AssetSpec())
    profile = dataclasses.replace(profile, **{k: v for k, v in profile_overrides.items() if v is not None})
    return profile, dataclasses.replace(spec, max_positions=max(spec.max_positions, profile.seq_len))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.demo",
        description="Offline SDCE demo: stdlib-docstring corpus, local tokenizers, tiny GPT-2 base, Llama surrogate.",
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path.cwd() / ".cache" / "sdce-demo", help="Assets, runs and results.md."
    )
    parser.add_argument(
        "--steps", type=int, help=f"Optimizer steps of each base run (default {FULL.steps}; quick {QUICK.steps})."
    )
    parser.add_argument(
        "--surrogate_steps", type=int, help=f"Steps of the surrogate run (default {FULL.surrogate_steps})."
    )
    parser.add_argument("--seq_len", type=int, help=f"Tokens per training block (default {FULL.seq_len}).")
    parser.add_argument("--batch_size", type=int, help=f"Blocks per step (default {FULL.batch_size}).")
    parser.add_argument("--quick", action="store_true", help="Tiny corpus, models and budget: a smoke test in seconds.")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="Training device.")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = ("steps", "surrogate_steps", "seq_len", "batch_size")
    profile, spec = demo_setup(args.quick, **{name: getattr(args, name) for name in names})
    workdir = args.workdir.resolve()
    start = time.perf_counter()
    assets = prepare_assets(workdir, spec)
    configs = demo_configs(assets, profile, workdir, args.device)
    results = {"surrogate": trained_surrogate(configs["surrogate"])}
    for name in ("sdce", "standard"):
        results[name] = _run(name, configs[name])
    table = results_table(results)
    total = time.perf_counter() - start
    report = f"# SDCE demo\n\n{table}\n\nTotal wall time {total:.0f} s. Settings: {dataclasses.asdict(profile)}\n"
    (workdir / "results.md").write_text(report)
    print(f"\n{table}\n\ntotal wall time {total:.0f} s; written to {workdir / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
