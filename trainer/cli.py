"""Command line of ``train.py``, generated from the config dataclasses.

Precedence: defaults < ``--config`` YAML < flags. Every config field is a flag:
its flat name (the original README's, such as ``--base_model``, else the field's
own name) and its dotted name (``--model.name_or_path``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from trainer.config import SECTIONS, TrainConfig, _unknown, build_config, field_types, load_yaml, merge

USAGE_EXAMPLES = """\
examples:
  python train.py --base_model gpt2 --surrogate_model Qwen/Qwen3-0.6B \\
      --dataset wikitext --dataset_config wikitext-2-raw-v1 --batch_size 4 --learning_rate 1e-4 --num_epochs 3
  python train.py --standard_training --base_model gpt2 --dataset wikitext
  python train.py --config config.yaml --output_dir runs/a
  torchrun --nproc_per_node=4 train.py --config config.yaml
"""


def _flags(section_name: str, fld: dataclasses.Field) -> list[str]:
    """A field's flags: its declared flat names (else its own name), and always --section.name."""
    names = fld.metadata.get("flags") or (fld.name,)
    return [f"--{name}" for name in names] + [f"--{section_name}.{fld.name}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        usage="%(prog)s [--config FILE] [options]",
        description="Surrogate-guided cross-entropy (SDCE) training for causal language models.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file with model/surrogate/data/training sections.")
    parser.add_argument(
        "--standard_training", action="store_true", help="Plain cross-entropy, no surrogate (= --loss_type standard)."
    )
    for section_name, section in SECTIONS.items():
        group = parser.add_argument_group(section_name, section.__doc__)
        types = field_types(section)
        for fld in dataclasses.fields(section):
            kwargs: dict[str, Any] = {"dest": f"{section_name}.{fld.name}", "help": fld.metadata.get("help")}
            if types[fld.name] is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["metavar"] = fld.name.upper()
                if fld.metadata.get("choices"):
                    kwargs["choices"] = fld.metadata["choices"]
            group.add_argument(*_flags(section_name, fld), **kwargs)
    return parser


def _known_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Resolve the run's config from the command line (and the YAML file it names)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        parser.error(str(_unknown("flag", flag.split("=")[0], _known_flags(parser))))
    values = vars(args)
    overrides: dict[str, dict[str, Any]] = {}
    if "config" in values:
        overrides = load_yaml(values.pop("config"))
    flags: dict[str, dict[str, Any]] = {}
    for dest, value in values.items():
        if "." in dest:
            section, key = dest.split(".", 1)
            flags.setdefault(section, {})[key] = value
    if values.get("standard_training"):
        flags.setdefault("training", {})["loss_type"] = "standard"
    try:
        return build_config(merge(overrides, flags))
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    from trainer.guide import SurrogateUnavailable
    from trainer.train import train

    try:
        train(config)
    except SurrogateUnavailable as err:
        print(f"train.py: stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
