"""Command-line flags from the config dataclasses (blink/config.py): one `--flag` per field, typed and documented
from the field's metadata; `--help-all` shows the advanced ones `--help` leaves out."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def add_flags(parser: argparse.ArgumentParser, cls: type[Any], *, skip: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per field of the frozen dataclass `cls`, typed and documented from the field."""
    group = parser.add_argument_group(cls.__name__.removesuffix("Config").lower())
    for f in dataclasses.fields(cls):
        if f.name in skip or "env" in f.metadata:  # from the environment only (cli.py)
            continue
        default = f.default
        kind = type(default)
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata.get('help', '')} (default: {default})"
        if kind is bool:
            action = group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            choices = f.metadata.get("choices")
            metavar = None if choices else f.name.upper()
            action = group.add_argument(flag, type=kind, default=default, help=text, metavar=metavar, choices=choices)
        if f.metadata.get("advanced"):
            action.help = argparse.SUPPRESS
            ADVANCED_HELP[action] = text


# flags that `--help` leaves out and `--help-all` shows, with their help (add_flags)
ADVANCED_HELP: dict[argparse.Action, str] = {}


class HelpAll(argparse.Action):
    """`--help-all`: the help with every flag, the advanced ones (tuning and test knobs) too."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        help_ = "show every flag, tuning and test knobs included, and exit"
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help_)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None) -> None:
        for action in parser._actions:
            action.help = ADVANCED_HELP.get(action, action.help)
        parser.print_help()
        parser.exit()


def from_flags(cls: type[T], args: argparse.Namespace) -> T:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return cls(**values)
