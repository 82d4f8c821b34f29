"""Argument helpers shared by the command modules (build, kv-cache, tune, verify, bench).

Use them as argparse `type=` functions: a bad value becomes a one-line usage error that names the
option (exit 2). Context lengths are read by `model/context.py`, the one parser and rule for them.
"""
from __future__ import annotations

import argparse

from .model.context import ContextError, parse_contexts


class UsageError(Exception):
    """The user asked for something invalid. Message: one line naming the value and what is accepted."""


def positive_int(text: str) -> int:
    """argparse type for counts (batch sizes, trials): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"bad value {text!r}: expected an integer >= 1") from None
    if value < 1:
        raise UsageError(f"bad value {text!r}: expected an integer >= 1")
    return value


def add_config_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--config NAME|PATH`: a preset name or a YAML file; load it with `ModelConfig.load`."""
    from .model.config import preset_names

    parser.add_argument("--config", default=default, required=default is None, metavar="NAME|PATH",
                        help=f"preset ({', '.join(preset_names())}) or path to a YAML config"
                             + (f" (default: {default})" if default else ""))


def _argparse_type(fn):
    """Wrap a helper that raises UsageError or ContextError so that argparse reports a bad option value."""

    def wrapped(text: str):
        try:
            return fn(text)
        except (UsageError, ContextError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    wrapped.__name__ = fn.__name__
    return wrapped


# argparse `type=` versions (argparse prefixes the option name to the message).
contexts_arg = _argparse_type(parse_contexts)
positive_int_arg = _argparse_type(positive_int)
