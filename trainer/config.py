"""One config tree for a training run: defaults < YAML file < command-line flags.

Every option is declared once, here, as a dataclass field with its help text in
``metadata``. The command line (``trainer.cli``) is generated from these fields;
the flag of a field is its name unless ``metadata["flags"]`` names others (the
original README's flat names such as ``--base_model`` or ``--surrogate_k``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOSS_TYPES = ("surrogate", "kl", "standard")
MIXED_PRECISION = ("no", "bf16", "fp16")
DEVICES = ("auto", "cuda", "cpu", "mps", "tpu")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ON_FAILURE = ("skip", "fail")


def _opt(default: Any, help: str, *flags: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its help text, command-line flags and allowed values."""
    metadata = {"help": help, "flags": flags, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """The base model: the one being trained."""

    name_or_path: str = _opt("gpt2", "Hub name or local directory of the base model.", "base_model")
    tokenizer: str | None = _opt(None, "Tokenizer hub name or directory (default: the model's).", "base_tokenizer")
    dtype: str = _opt(
        "float32",
        "Dtype the base weights are kept in. Keep float32 and set mixed_precision for "
        "mixed-precision training; bfloat16 here trains in pure bf16.",
        "model_dtype",
        choices=DTYPES,
    )
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    init_from_scratch: bool = _opt(False, "Random init from the model's config instead of its weights.")
    attn_implementation: str = _opt("sdpa", "transformers attention implementation (sdpa, eager, ...).")
    trust_remote_code: bool = _opt(False, "Allow model code from the hub (transformers' trust_remote_code).")

    def __post_init__(self) -> None:
        _check_choice("model.dtype", self.dtype, DTYPES)


@dataclass
class SurrogateConfig:
    """The surrogate LM whose top-k proposals guide the base (SDCE.md §3-§5)."""

    name_or_path: str | None = _opt(None, "Hub name or local directory of the surrogate LM (in-process).", "surrogate_model")
    endpoint: str | None = _opt(
        None, "Surrogate server(s), host:port[,host:port...]; used instead of an in-process model.", "surrogate_endpoint"
    )
    dtype: str = _opt("auto", "Surrogate dtype (auto: bf16 on GPU, fp32 on CPU).", "surrogate_dtype", choices=DTYPES)
    k: int = _opt(30, "Top-k candidate tokens taken from the surrogate per position.", "surrogate_k")
    probability_threshold: float = _opt(0.02, "Drop candidates whose surrogate probability is below this.")
    loss_weight_initial: float = _opt(1.0, "Surrogate-loss weight at step 0.", "surrogate_loss_weight_initial")
    loss_weight_final: float = _opt(0.0, "Surrogate-loss weight at the last step (cosine decay).", "surrogate_loss_weight_final")
    chunk_tokens: int = _opt(1024, "Positions per lm_head/log-softmax/top-k chunk in the surrogate engine.", "surrogate_chunk_tokens")
    min_coverage: float = _opt(0.3, "Fail when fewer than this share of base tokens map to the surrogate vocabulary.")
    prefetch_depth: int = _opt(2, "Micro-batches of guidance requested ahead of training (remote surrogate).")
    on_failure: str = _opt(
        "skip",
        "When the surrogate server stays unreachable: train that batch on CE alone (skip) or save and stop (fail).",
        "surrogate_on_failure",
        choices=ON_FAILURE,
    )
    request_timeout: float = _opt(60.0, "Seconds one guidance request may take, retries included, before on_failure applies.", "surrogate_timeout")
    auth_token_file: str | None = _opt(None, "File holding the server's shared secret (else $SDCE_SURROGATE_TOKEN).", "surrogate_auth_token_file")
    tls_ca_file: str | None = _opt(None, "CA certificate (PEM) to verify a TLS surrogate server; unset = plaintext.", "surrogate_tls_ca_file")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"surrogate.k (--surrogate_k) must be at least 1, got {self.k}")
        if not 0.0 <= self.probability_threshold < 1.0:
            raise ValueError(
                f"surrogate.probability_threshold must be in [0, 1), got {self.probability_threshold}"
            )
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(f"surrogate.min_coverage must be in [0, 1], got {self.min_coverage}")
        if self.chunk_tokens < 1 or self.prefetch_depth < 0:
            raise ValueError("surrogate.chunk_tokens must be >= 1 and surrogate.prefetch_depth >= 0")
        _check_choice("surrogate.dtype", self.dtype, DTYPES)
        _check_choice("surrogate.on_failure", self.on_failure, ON_FAILURE)


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into training blocks."""

    dataset_name: str | None = _opt(None, "Hub dataset name or local dataset directory.", "dataset")
    dataset_config: str | None = _opt(None, "Dataset configuration, e.g. wikitext-2-raw-v1.")
    train_file: str | None = _opt(None, "Local training file(s): txt, json, jsonl, csv or parquet (comma-separated).")
    eval_file: str | None = _opt(None, "Local evaluation file(s), same formats.")
    text_column: str = _opt("text", "Column holding the raw text.")
    max_seq_length: int = _opt(1024, "Tokens per packed training block.")
    eval_split_ratio: float = _opt(0.05, "Share split off for evaluation when the dataset has no eval split.")
    max_eval_blocks: int | None = _opt(None, "Evaluate on at most this many blocks (None: all).")
    num_workers: int = _opt(0, "DataLoader worker processes (at most 2 on TPU).", "dataloader_num_workers", "num_workers")
    preprocessing_num_workers: int | None = _opt(None, "Processes for tokenisation (datasets.map num_proc).")

    def __post_init__(self) -> None:
        if self.max_seq_length < 2:
            raise ValueError(f"data.max_seq_length must be at least 2, got {self.max_seq_length}")
        if not 0.0 < self.eval_split_ratio < 1.0:
            raise ValueError(f"data.eval_split_ratio must be in (0, 1), got {self.eval_split_ratio}")


@dataclass
class TrainingConfig:
    """The optimisation loop, precision, devices, logging and checkpoints."""

    device: str = _opt("auto", "auto picks cuda, then mps, then cpu; tpu uses torch-xla.", choices=DEVICES)
    tpu_cores: int | None = _opt(None, "TPU chips (cores) per host; default: all the host has.")
    tpu_num_hosts: int = _opt(1, "Hosts in the TPU pod slice.")
    num_epochs: float = _opt(3.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _opt(-1, "Optimizer steps to run; > 0 overrides num_epochs.")
    per_device_train_batch_size: int = _opt(4, "Sequences per device per micro-batch.", "batch_size", "per_device_train_batch_size")
    per_device_eval_batch_size: int | None = _opt(None, "Eval sequences per device (default: the train batch size).", "eval_batch_size", "per_device_eval_batch_size")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    learning_rate: float = _opt(1e-4, "Peak AdamW learning rate.")
    weight_decay: float = _opt(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    warmup_steps: int = _opt(0, "Linear LR warm-up steps (before cosine decay).")
    warmup_ratio: float = _opt(0.0, "Warm-up as a share of total steps (used when warmup_steps is 0).")
    max_grad_norm: float = _opt(1.0, "Clip the gradient norm to this (0 disables clipping).")
    mixed_precision: str = _opt("no", "Autocast precision: no, bf16 or fp16 (fp16 only on CUDA).", choices=MIXED_PRECISION)
    loss_type: str = _opt("surrogate", "surrogate | kl | standard (SDCE.md §4).", choices=LOSS_TYPES)
    z_loss_multiplier: float = _opt(0.0, "Weight of the z-loss, logsumexp(z)^2.")
    output_dir: str = _opt("./outputs", "Where checkpoints, the final model, config and logs go.")
    overwrite_output_dir: bool = _opt(False, "Start afresh even if output_dir already holds checkpoints.")
    resume_from_checkpoint: str | None = _opt(None, "A checkpoint directory, or 'latest' for the newest in output_dir.")
    logging_steps: int = _opt(10, "Log metrics every this many optimizer steps.")
    eval_steps: int | None = _opt(None, "Evaluate every this many optimizer steps (None: only at the end).")
    save_steps: int | None = _opt(500, "Checkpoint every this many optimizer steps (None: only the final model).")
    save_total_limit: int | None = _opt(3, "Keep at most this many checkpoints (None: all).")
    seed: int = _opt(42, "Seed for initialisation, data order and dropout.")
    wandb_project: str | None = _opt(None, "Log to this Weights & Biases project (WANDB_MODE=offline works).")
    wandb_run_name: str | None = _opt(None, "Weights & Biases run name.")
    progress_bar: bool = _opt(True, "Show a progress bar on the main process.")

    def __post_init__(self) -> None:
        _check_choice("training.device", self.device, DEVICES)
        _check_choice("training.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("training.loss_type", self.loss_type, LOSS_TYPES)
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
        if guided and not (self.surrogate.name_or_path or self.surrogate.endpoint):
            raise ValueError(
                f"loss_type {self.training.loss_type!r} needs a surrogate: pass --surrogate_model NAME_OR_PATH "
                "or --surrogate_endpoint HOST:PORT, or train without one with --standard_training"
            )
        if not (self.data.dataset_name or self.data.train_file):
            raise ValueError("no training data: pass --dataset NAME_OR_DIR or --train_file PATH")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


SECTIONS: dict[str, type] = {"model": ModelConfig, "surrogate": SurrogateConfig, "data": DataConfig, "training": TrainingConfig}


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type.

    PyYAML reads ``1e-4`` as a string and the command line gives only strings,
    so both go through here. ``null``/``none`` give None for optional fields.
    """
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        annotation = next(a for a in args if a is not type(None))
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: cannot read {value!r} as {annotation.__name__}") from None
    return value


def field_types(section: type) -> dict[str, Any]:
    """Resolved annotations of a section's fields (the module uses postponed annotations)."""
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _unknown(kind: str, name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(known))}"
    return ValueError(f"unknown {kind} {name!r}{hint}")


def build_config(overrides: dict[str, dict[str, Any]]) -> TrainConfig:
    """A TrainConfig from nested ``{section: {key: value}}`` overrides on top of the defaults."""
    unknown = set(overrides) - set(SECTIONS)
    for name in sorted(unknown):
        raise _unknown("config section", name, list(SECTIONS))
    sections = {}
    for section_name, section in SECTIONS.items():
        values = overrides.get(section_name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config section {section_name!r} must be a mapping, got {values!r}")
        types_ = field_types(section)
        for key in values:
            if key not in types_:
                raise _unknown(f"key in section {section_name!r}:", key, list(types_))
        sections[section_name] = section(
            **{key: coerce(value, types_[key], f"{section_name}.{key}") for key, value in values.items()}
        )
    return TrainConfig(**sections)


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML config file into nested overrides."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected sections model/surrogate/data/training at the top level")
    return data


def merge(base: dict[str, dict[str, Any]], top: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Overlay ``top`` on ``base`` section by section (neither is modified)."""
    merged = {name: dict(values or {}) for name, values in base.items()}
    for name, values in top.items():
        merged.setdefault(name, {}).update(values)
    return merged

