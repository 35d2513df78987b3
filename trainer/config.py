"""One config tree for a training run: defaults < YAML file < command-line flags.

Every option is declared once, here, as a dataclass field with its help text
(``option``, shared with the surrogate server's command line:
``surrogate_server.config_cli``). The command line (``trainer.cli``) is generated from
these fields; the flag of a field is its name unless it names others (the original
README's flat names such as ``--base_model`` or ``--surrogate_k``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surrogate_server.config_cli import Overrides, build_sections, check_choice, option
from surrogate_server.source import TORCH_DTYPES
from trainer.losses import LOSS_TYPES

MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # autocast mode -> a TORCH_DTYPES name
MIXED_PRECISION = ("no", *MIXED_PRECISION_DTYPES)
DEVICES = ("auto", "cuda", "cpu", "mps", "tpu")
DTYPES = ("auto", *TORCH_DTYPES)
ON_FAILURE = ("skip", "fail")
ALIGNMENTS = ("bytes", "tokens")
CONTROLS = ("none", "unigram")


@dataclass
class ModelConfig:
    """The base model: the one being trained."""

    name_or_path: str = option("gpt2", "Hub name or local directory of the base model.", "base_model")
    tokenizer: str | None = option(None, "Tokenizer hub name or directory (default: the model's).", "base_tokenizer")
    dtype: str = option(
        "float32",
        "Dtype the base weights are kept in. Keep float32 and set mixed_precision for "
        "mixed-precision training; bfloat16 here trains in pure bf16.",
        "model_dtype",
        choices=DTYPES,
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    init_from_scratch: bool = option(False, "Random init from the model's config instead of its weights.")
    attn_implementation: str = option("sdpa", "transformers attention implementation (sdpa, eager, ...).")
    trust_remote_code: bool = option(False, "Allow model code from the hub (transformers' trust_remote_code).")

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, DTYPES)


@dataclass
class SurrogateConfig:
    """The surrogate LM whose top-k proposals guide the base (docs/method.md §3-§5)."""

    name_or_path: str | None = option(None, "Hub name or local directory of the surrogate LM (in-process).", "surrogate_model")
    endpoint: str | None = option(
        None, "Surrogate server(s), host:port[,host:port...]; used instead of an in-process model.", "surrogate_endpoint"
    )
    dtype: str = option("auto", "Surrogate dtype (auto: bf16 on GPU, fp32 on CPU).", "surrogate_dtype", choices=DTYPES)
    k: int = option(30, "Top-k candidate tokens taken from the surrogate per position.", "surrogate_k")
    probability_threshold: float = option(0.02, "Drop candidates whose surrogate probability is below this.")
    loss_weight_initial: float = option(1.0, "Surrogate-loss weight at step 0.", "surrogate_loss_weight_initial")
    loss_weight_final: float = option(0.0, "Surrogate-loss weight at the last step (cosine decay).", "surrogate_loss_weight_final")
    alignment: str = option(
        "bytes",
        "What the surrogate reads: bytes = the block's text in its own tokenization (docs/method.md §2b); "
        "tokens = the base ids mapped one by one (§2).",
        "surrogate_alignment",
        choices=ALIGNMENTS,
    )
    length_ratio: float = option(
        1.125,
        "alignment bytes: surrogate tokens per base token of a block; the surrogate reads S = ratio x "
        "max_seq_length tokens, rounded up to a multiple of 8 (a longer text is cut; the cut is logged).",
        "surrogate_length_ratio",
    )
    chunk_tokens: int = option(1024, "Positions per lm_head/log-softmax/top-k chunk in the surrogate engine.", "surrogate_chunk_tokens")
    min_coverage: float = option(0.3, "Fail when fewer than this share of base tokens map to the surrogate vocabulary.")
    prefetch_depth: int = option(2, "Micro-batches of guidance requested ahead of training (remote surrogate).")
    on_failure: str = option(
        "skip",
        "When the surrogate server stays unreachable: train that batch on CE alone (skip) or save and stop (fail).",
        "surrogate_on_failure",
        choices=ON_FAILURE,
    )
    request_timeout: float = option(60.0, "Seconds one guidance request may take, retries included, before on_failure applies.", "surrogate_timeout")
    auth_token_file: str | None = option(None, "File holding the server's shared secret (else $SDCE_SURROGATE_TOKEN).", "surrogate_auth_token_file")
    tls_ca_file: str | None = option(None, "CA certificate (PEM) to verify a TLS surrogate server; unset = plaintext.", "surrogate_tls_ca_file")
    control: str = option(
        "none",
        "A teacher that knows nothing of the text, in place of the surrogate (a control run: what the guided loss "
        "does as a regulariser alone): unigram = the add-one smoothed unigram distribution of the training data's "
        "base tokens, the same top-k at every position (trainer.control).",
        "surrogate_control",
        choices=CONTROLS,
    )
    cache_dir: str | None = option(
        None,
        "Guidance cache directory (local or a mounted bucket): the surrogate's answers are stored there and read "
        "back by later epochs and runs on the same data (sdce-precompute fills it ahead); with the cache alone, "
        "no surrogate model or endpoint, the run reads every block's guidance from it.",
        "guidance_cache",
    )
    cache_max_gb: float = option(50.0, "Bound on the guidance cache directory's size, in GB.", "guidance_cache_max_gb")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"surrogate.k (--surrogate_k) must be at least 1, got {self.k}")
        if not 0.0 <= self.probability_threshold < 1.0:
            raise ValueError(
                f"surrogate.probability_threshold must be in [0, 1), got {self.probability_threshold}"
            )
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(f"surrogate.min_coverage must be in [0, 1], got {self.min_coverage}")
        if self.length_ratio <= 0:
            raise ValueError(f"surrogate.length_ratio must be > 0, got {self.length_ratio}")
        if self.cache_max_gb <= 0:
            raise ValueError(f"surrogate.cache_max_gb (--guidance_cache_max_gb) must be > 0, got {self.cache_max_gb}")
        if self.chunk_tokens < 1 or self.prefetch_depth < 0:
            raise ValueError("surrogate.chunk_tokens must be >= 1 and surrogate.prefetch_depth >= 0")
        check_choice("surrogate.dtype", self.dtype, DTYPES)
        check_choice("surrogate.on_failure", self.on_failure, ON_FAILURE)
        check_choice("surrogate.alignment", self.alignment, ALIGNMENTS)
        check_choice("surrogate.control", self.control, CONTROLS)


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into training blocks."""

    dataset_name: str | None = option(None, "Hub dataset name or local dataset directory.", "dataset")
    dataset_config: str | None = option(None, "Dataset configuration, e.g. wikitext-2-raw-v1.")
    train_file: str | None = option(None, "Local training file(s): txt, json, jsonl, csv or parquet (comma-separated).")
    eval_file: str | None = option(None, "Local evaluation file(s), same formats.")
    text_column: str = option("text", "Column holding the raw text.")
    max_seq_length: int = option(1024, "Tokens per packed training block.")
    eval_split_ratio: float = option(0.05, "Share split off for evaluation when the dataset has no eval split.")
    max_eval_blocks: int | None = option(None, "Evaluate on at most this many blocks (None: all; streaming: 256).")
    streaming: bool = option(
        False,
        "Read the training data as a stream (hub datasets, local files or shard globs such as 'data/*.jsonl'): "
        "tokenised and packed on the fly in the loader's workers, sharded over ranks, resumed from its saved "
        "position; memory does not grow with the corpus. Needs max_steps.",
    )
    document_mask: bool = option(
        False,
        "Attention stays within each document of a packed block: position ids restart after every EOS, which "
        "transformers' causal mask turns into one block per document (the surrogate's input follows the same rule).",
    )
    stream_batch_documents: int = option(
        1000, "streaming: documents tokenised and packed together; each such batch drops its last partial block."
    )
    num_workers: int = option(0, "DataLoader worker processes (at most 2 on TPU).", "dataloader_num_workers", "num_workers")
    preprocessing_num_workers: int | None = option(None, "Processes for tokenisation (datasets.map num_proc).")

    def __post_init__(self) -> None:
        if self.max_seq_length < 2:
            raise ValueError(f"data.max_seq_length must be at least 2, got {self.max_seq_length}")
        if not 0.0 < self.eval_split_ratio < 1.0:
            raise ValueError(f"data.eval_split_ratio must be in (0, 1), got {self.eval_split_ratio}")
        if self.stream_batch_documents < 1:
            raise ValueError(f"data.stream_batch_documents must be at least 1, got {self.stream_batch_documents}")


@dataclass
class TrainingConfig:
    """The optimisation loop, precision, devices, logging and checkpoints."""

    device: str = option("auto", "auto picks cuda, then mps, then cpu; tpu uses torch-xla.", choices=DEVICES)
    tpu_cores: int | None = option(None, "TPU chips (cores) per host; default: all the host has.")
    tpu_num_hosts: int = option(1, "Hosts in the TPU pod slice.")
    num_epochs: float = option(3.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = option(-1, "Optimizer steps to run; > 0 overrides num_epochs.")
    per_device_train_batch_size: int = option(4, "Sequences per device per micro-batch.", "batch_size", "per_device_train_batch_size")
    per_device_eval_batch_size: int | None = option(None, "Eval sequences per device (default: the train batch size).", "eval_batch_size", "per_device_eval_batch_size")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    learning_rate: float = option(1e-4, "Peak AdamW learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    warmup_steps: int = option(0, "Linear LR warm-up steps (before cosine decay).")
    warmup_ratio: float = option(0.0, "Warm-up as a share of total steps (used when warmup_steps is 0).")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this (0 disables clipping).")
    mixed_precision: str = option("no", "Autocast precision: no, bf16 or fp16 (fp16 only on CUDA).", choices=MIXED_PRECISION)
    loss_type: str = option("surrogate", "surrogate | kl | standard (docs/method.md §4).", choices=LOSS_TYPES)
    z_loss_multiplier: float = option(0.0, "Weight of the z-loss, logsumexp(z)^2.")
    fused_loss: bool = option(
        True,
        "Compute the loss from the final hidden states and the LM head chunk by chunk, never holding the "
        "full-vocabulary logits (trainer.losses.fused_sdce_loss); models whose head it cannot reproduce use logits.",
    )
    output_dir: str = option("./outputs", "Where checkpoints, the final model, config and logs go.")
    overwrite_output_dir: bool = option(False, "Start afresh even if output_dir already holds checkpoints.")
    resume_from_checkpoint: str | None = option(None, "A checkpoint directory, or 'latest' for the newest in output_dir.")
    logging_steps: int = option(10, "Log metrics every this many optimizer steps.")
    eval_steps: int | None = option(None, "Evaluate every this many optimizer steps (None: only at the end).")
    save_steps: int | None = option(500, "Checkpoint every this many optimizer steps (None: only the final model).")
    save_total_limit: int | None = option(3, "Keep at most this many checkpoints (None: all).")
    seed: int = option(42, "Seed for initialisation, data order and dropout.")
    wandb_project: str | None = option(None, "Log to this Weights & Biases project (WANDB_MODE=offline works).")
    wandb_run_name: str | None = option(None, "Weights & Biases run name.", "wandb_run_name", "run_name")
    wandb_tags: str | None = option(None, "Weights & Biases tags, comma-separated.", "wandb_tags", "tags")
    progress_bar: bool = option(True, "Show a progress bar on the main process.")

    def __post_init__(self) -> None:
        check_choice("training.device", self.device, DEVICES)
        check_choice("training.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("training.loss_type", self.loss_type, LOSS_TYPES)
        if self.mixed_precision == "fp16" and self.device == "tpu":
            raise ValueError("TPUs have no fp16: use --mixed_precision bf16 (or no) with --device tpu")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be at least 1")
        if self.num_epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set num_epochs > 0 or max_steps > 0")
        if self.logging_steps < 1:
            raise ValueError(f"logging_steps must be at least 1, got {self.logging_steps}")
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or null, got {value}")


@dataclass
class TrainConfig:
    """The whole run. YAML sections and attribute names match: model / surrogate / data / training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        guided = self.training.loss_type != "standard"
        control = self.surrogate.control != "none"  # a teacher built from the training data: no surrogate needed
        if guided and not (self.surrogate.name_or_path or self.surrogate.endpoint or self.surrogate.cache_dir
                           or control):
            raise ValueError(
                f"loss_type {self.training.loss_type!r} needs a surrogate: pass --surrogate_model NAME_OR_PATH "
                "or --surrogate_endpoint HOST:PORT (or --guidance_cache DIR holding its precomputed guidance), or "
                "train without one with --standard_training"
            )
        if guided and control and self.data.streaming:
            raise ValueError(
                f"--surrogate_control {self.surrogate.control} counts the tokens of the whole training set, which a "
                "stream does not have: drop --streaming (map-style data) or the control"
            )
        if not (self.data.dataset_name or self.data.train_file):
            raise ValueError("no training data: pass --dataset NAME_OR_DIR or --train_file PATH")
        if self.data.streaming and self.training.max_steps <= 0:
            raise ValueError("--streaming reads a stream of unknown length: set --max_steps (num_epochs needs a length)")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


SECTIONS: dict[str, type] = {"model": ModelConfig, "surrogate": SurrogateConfig, "data": DataConfig, "training": TrainingConfig}


def build_config(overrides: Overrides) -> TrainConfig:
    """A TrainConfig from nested ``{section: {key: value}}`` overrides on top of the defaults."""
    return TrainConfig(**build_sections(SECTIONS, overrides))
