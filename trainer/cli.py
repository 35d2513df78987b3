"""Command line of ``train.py``, generated from the config dataclasses.

Precedence: defaults < ``--config`` YAML < flags. Every config field is a flag:
its flat name (the original README's, such as ``--base_model``, else the field's
own name) and its dotted name (``--model.name_or_path``); the conventions are
``surrogate_server.config_cli``'s, which the surrogate server's command line shares.

A user error (a ``ValueError``, from the config or from start-up: the device, the hub,
the data) ends the program with one message saying what to change and exit code 2;
``--debug`` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from surrogate_server import config_cli
from trainer.config import SECTIONS, TrainConfig, build_config

# Modules of the optional extras (pyproject.toml): which option needs each, and the extra that installs it.
EXTRAS = {
    "torch_xla": ("--device tpu", "tpu"),
    "grpc": ("--surrogate_endpoint", "client"),
    "wandb": ("--wandb_project", "wandb"),
}

USAGE_EXAMPLES = """\
examples:
  python train.py --base_model gpt2 --surrogate_model Qwen/Qwen3-0.6B \\
      --dataset wikitext --dataset_config wikitext-2-raw-v1 --batch_size 4 --learning_rate 1e-4 --num_epochs 3
  python train.py --standard_training --base_model gpt2 --dataset wikitext
  python train.py --config config.yaml --output_dir runs/a
  torchrun --nproc_per_node=4 train.py --config config.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    parser = config_cli.build_parser(
        SECTIONS,
        prog="train.py",
        usage="%(prog)s [--config FILE] [options]",
        description="Surrogate-guided cross-entropy (SDCE) training for causal language models.",
        epilog=USAGE_EXAMPLES,
    )
    parser.add_argument(
        "--standard_training", action="store_true", help="Plain cross-entropy, no surrogate (= --loss_type standard)."
    )
    parser.add_argument(
        "--debug", action="store_true", help="Show the traceback of an error instead of its message alone."
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Resolve the run's config from the command line (and the YAML file it names)."""
    return _parse(argv)[0]


def _parse(argv: Sequence[str] | None) -> tuple[TrainConfig, bool]:
    """(the run's config, whether --debug was given); a config error exits through ``parser.error`` (code 2)."""
    config, rest = parse_with(build_parser(), argv)
    return config, bool(rest.get("debug"))


def parse_with(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[TrainConfig, dict]:
    """The config from ``parser`` (``build_parser()`` plus a tool's own arguments) and those other arguments."""
    overrides, rest = config_cli.parse_overrides(parser, argv)
    if rest.get("standard_training"):
        overrides.setdefault("training", {})["loss_type"] = "standard"
    try:
        return build_config(overrides), rest
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    config, debug = _parse(argv)
    from surrogate_server.source import SurrogateUnavailable
    from trainer.train import train

    try:
        train(config)
    except SurrogateUnavailable as err:
        print(f"train.py: stopped: {err}", file=sys.stderr)
        return 1
    except (ValueError, ModuleNotFoundError) as err:
        message = _user_error(err)
        if debug or message is None:
            raise
        print(f"train.py: error: {message}", file=sys.stderr)
        return 2
    return 0


def _user_error(err: Exception) -> str | None:
    """What to tell the user about ``err``; None for an error that is not theirs (a missing core module)."""
    if not isinstance(err, ModuleNotFoundError):
        return str(err)
    module = (err.name or "").split(".")[0]
    if module not in EXTRAS:
        return None
    option, extra = EXTRAS[module]
    return f"{option} needs {module}, which is not installed: pip install 'sdce-training[{extra}]'"


if __name__ == "__main__":
    sys.exit(main())
