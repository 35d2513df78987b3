"""Command line of ``train.py``, generated from the config dataclasses.

Precedence: defaults < ``--config`` YAML < flags. Every config field is a flag:
its flat name (the original README's, such as ``--base_model``, else the field's
own name) and its dotted name (``--model.name_or_path``); the conventions are
``surrogate_server.config_cli``'s, which the surrogate server's command line shares.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from surrogate_server import config_cli
from trainer.config import SECTIONS, TrainConfig, build_config

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
    return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Resolve the run's config from the command line (and the YAML file it names)."""
    parser = build_parser()
    overrides, rest = config_cli.parse_overrides(parser, argv)
    if rest.get("standard_training"):
        overrides.setdefault("training", {})["loss_type"] = "standard"
    try:
        return build_config(overrides)
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    from surrogate_server.source import SurrogateUnavailable
    from trainer.train import train

    try:
        train(config)
    except SurrogateUnavailable as err:
        print(f"train.py: stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
