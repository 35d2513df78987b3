"""Config dataclasses and the command lines generated from them, for both programs.

``train.py`` and ``sdce-surrogate-server`` declare every option once, as a dataclass
field made with :func:`option` (help text, extra flag names, allowed values). A
program is a set of *sections* (``{"training": TrainingConfig, ...}``); its command
line follows one convention:

- every field is ``--name`` (or the flat names its ``flags`` declare, e.g. the original
  README's ``--base_model``) and also ``--section.name``;
- booleans are ``--name`` / ``--no_name``; ``--help`` shows each default;
- ``--config FILE`` reads a YAML file of ``section: {key: value}``; precedence is
  defaults < YAML < flags;
- an unknown flag, section or key is an error that names the closest valid one.

Fields without help text (``dataclasses.field`` without ``option``) are not options.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

Overrides = dict[str, dict[str, Any]]


def option(default: Any, help: str, *flags: str, choices: Sequence[str] | None = None) -> Any:
    """A config field with its help text, command-line flags (default: its own name) and allowed values."""
    metadata = {"help": help, "flags": flags, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def options(section: type) -> list[dataclasses.Field]:
    """The fields of a section that are options (declared with :func:`option`)."""
    return [f for f in dataclasses.fields(section) if "help" in f.metadata]


def field_types(section: type) -> dict[str, Any]:
    """Resolved annotations of a section's fields (modules use postponed annotations)."""
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type.

    PyYAML reads ``1e-4`` as a string and the command line gives only strings,
    so both go through here. ``null``/``none`` give None for optional fields.
    """
    args = typing.get_args(annotation)
    if type(None) in args:
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
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
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


def unknown(kind: str, name: str, known: Sequence[str]) -> ValueError:
    """The error for a name that is not one of ``known``, suggesting the closest."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(known))}"
    return ValueError(f"unknown {kind} {name!r}{hint}")


def build_sections(sections: Mapping[str, type], overrides: Overrides) -> dict[str, Any]:
    """Each section's instance, from nested ``{section: {key: value}}`` overrides on top of its defaults."""
    for name in sorted(set(overrides) - set(sections)):
        raise unknown("config section", name, list(sections))
    built = {}
    for section_name, section in sections.items():
        values = overrides.get(section_name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config section {section_name!r} must be a mapping, got {values!r}")
        types = {f.name: field_types(section)[f.name] for f in options(section)}
        for key in values:
            if key not in types:
                raise unknown(f"key in section {section_name!r}:", key, list(types))
        built[section_name] = section(
            **{key: coerce(value, types[key], f"{section_name}.{key}") for key, value in values.items()}
        )
    return built


def load_yaml(path: str | Path, keys: Mapping[str, Collection[str]] | None = None) -> Overrides:
    """Read a YAML config file into nested overrides.

    ``keys``: each section's option names; with them a top-level entry that is not a
    section of keys is an error that says where it belongs.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected sections at the top level, each a mapping of keys to values")
    for name, values in data.items() if keys is not None else ():
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"{path}: {_not_a_section(name, values, keys)}")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what the YAML parser found wrong, and where."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return str(err).replace("\n", " ")
    mark = err.problem_mark
    context = f"{err.context}, " if err.context else ""
    return f"{context}{err.problem} (line {mark.line + 1}, column {mark.column + 1})"


def _not_a_section(name: Any, value: Any, keys: Mapping[str, Collection[str]]) -> str:
    """The message for a top-level YAML entry whose value is not a mapping, with where it belongs."""
    sections = ", ".join(keys)
    if name in keys:
        example = f"{name}: {{{next(iter(keys[name]))}: ...}}"
        return f"section {name!r} must be a mapping of key: value, got {value!r}; write it as {example}"
    homes = [section for section, known in keys.items() if name in known]
    dotted = [f"{section}.{key}" for section, known in keys.items() for key in known]
    close = difflib.get_close_matches(str(name), dotted, n=1, cutoff=0.5)
    if homes:
        hint = f"; it belongs in section {homes[0]!r}: {homes[0]}: {{{name}: {value}}}"
    elif close:
        section, key = close[0].split(".", 1)
        hint = f"; did you mean {section}: {{{key}: {value}}}?"
    else:
        hint = ""
    return f"top-level key {name!r} is not a section (the top level holds the sections {sections}){hint}"


def merge(base: Overrides, top: Overrides) -> Overrides:
    """Overlay ``top`` on ``base`` section by section (neither is modified)."""
    merged = {name: dict(values or {}) for name, values in base.items()}
    for name, values in top.items():
        merged.setdefault(name, {}).update(values)
    return merged


def build_parser(sections: Mapping[str, type], **kwargs: Any) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and one group of flags per section.

    Flags that are not given leave no value (``argparse.SUPPRESS``), so that only what
    the command line says overrides the YAML; ``--help`` still shows each default.
    """
    parser = argparse.ArgumentParser(allow_abbrev=False, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    parser.add_argument("--config", metavar="FILE", help="YAML file: sections of key: value (flags override it).")
    for section_name, section in sections.items():
        group = parser.add_argument_group(section_name, section.__doc__)
        types = field_types(section)
        for fld in options(section):
            names = [f"--{name}" for name in (fld.metadata["flags"] or (fld.name,))] + [f"--{section_name}.{fld.name}"]
            dest, help_text = f"{section_name}.{fld.name}", _help(fld)
            if types[fld.name] is bool:
                group.add_argument(*names, dest=dest, action="store_true", help=help_text)
                negated = [f"--no_{name}" for name in (fld.metadata["flags"] or (fld.name,))]
                group.add_argument(*negated, dest=dest, action="store_false", help=argparse.SUPPRESS)
            else:
                group.add_argument(*names, dest=dest, metavar=fld.name.upper(), help=help_text,
                                   choices=fld.metadata["choices"])
    return parser


def _help(fld: dataclasses.Field) -> str:
    default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
    if isinstance(default, bool):
        return f"{fld.metadata['help']} (default: on; --no_{fld.name} turns it off)" if default else \
            f"{fld.metadata['help']} (default: off)"
    return fld.metadata["help"] if default is None else f"{fld.metadata['help']} (default: {default})"


def parse_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[Overrides, dict[str, Any]]:
    """(YAML < flags overrides by section, the parser's other values) from the command line.

    An unknown flag exits through ``parser.error`` naming the closest known one.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        flag = next((u for u in extra if u.startswith("-")), extra[0])
        known = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]
        parser.error(str(unknown("flag", flag.split("=")[0], known)))
    values = vars(args)
    keys: dict[str, dict[str, None]] = {}  # each section's option names, in order (--name and --no_name: once)
    for action in parser._actions:
        if "." in action.dest:
            section, key = action.dest.split(".", 1)
            keys.setdefault(section, {})[key] = None
    try:
        overrides = load_yaml(values.pop("config"), keys) if "config" in values else {}
    except ValueError as err:
        parser.error(str(err))
    flags: Overrides = {}
    rest = {}
    for dest, value in values.items():
        if "." in dest:
            section, key = dest.split(".", 1)
            flags.setdefault(section, {})[key] = value
        else:
            rest[dest] = value
    return merge(overrides, flags), rest
