"""The command line: `python -m dsv4_compile <command> [options]`.

Structure
---------
- `COMMANDS` is the dispatch table: command name -> module and one-line help. A command module
  defines two functions and nothing else is required:

      def add_arguments(parser: argparse.ArgumentParser) -> None   # the command's own options
      def run(args: argparse.Namespace) -> int | None              # None means 0

  Adding a command (build, tune, verify, bench, ...) = write that module and add one line to
  `COMMANDS`. A command module is imported only when its command runs (or its --help is asked
  for), so a command with heavy or missing optional dependencies cannot break the others.
- Shared helpers for command modules live in `arguments.py` (`UsageError`, `contexts_arg`,
  `positive_int_arg`, `add_config_argument`), so that a command module never imports this one: the
  CLI imports the commands, never the reverse. Context lengths follow one rule, `model/context.py`.

Exit codes (`main` returns them; `python -m dsv4_compile` exits with them):
    0  success
    1  internal error (a bug or an environment failure): one line on stderr; the traceback only
       with --debug
    2  user mistake (bad option, unknown preset, bad YAML, bad context length: `UsageError`,
       `ConfigError`, `ContextError` or an argparse error): one line on stderr naming what was wrong and what is
       accepted, no traceback (--debug adds the traceback for developers)
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Sequence

from .arguments import UsageError
from .model.config import ConfigError
from .model.context import ContextError

PROG = "dsv4_compile"
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Command:
    module: str  # importable module with add_arguments(parser) and run(args)
    help: str    # one line, shown by `python -m dsv4_compile --help`


# The dispatch table. Keep it sorted by name; one line per command.
COMMANDS: dict[str, Command] = {
    "bench": Command("dsv4_compile.bench", "side-by-side GPU benchmarks of the Triton kernels against torch, flex_attention and SDPA"),
    "build": Command("dsv4_compile.build", "compile, export (AOTInductor, ONNX, TensorRT) and verify a model into a build folder"),
    "generate": Command("dsv4_compile.generate", "generate tokens with a build's prefill-cache and decode engines"),
    "inspect": Command("dsv4_compile.checkpoint.summary",
                       "describe a checkpoint folder (layout, config, dtypes, bytes, hash layers) without loading weights"),
    "kv-cache": Command("dsv4_compile.kv_report",
                        "KV-cache bytes per context length from the real cache layout, beside the seed figures"),
    "tune": Command("dsv4_compile.tune", "Optuna sweeps of the Triton kernels per GPU and context length -> tuning/tables/<gpu>.yaml"),
    "verify": Command("dsv4_compile.verify", "compare every engine of a build with the eager model, in a fresh process"),
}


# ---- parsers ----------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line) instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _top_parser() -> ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {cmd.help}" for name, cmd in sorted(COMMANDS.items()))
    parser = ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile, tune and deploy DeepSeek-V4-style models.",
        epilog=f"commands:\n{listing}\n\nRun `{PROG} <command> --help` for a command's options.\n"
               "Exit codes: 0 success, 1 internal error, 2 usage or config error.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("command", nargs="?", metavar="<command>", choices=sorted(COMMANDS),
                        help=f"one of: {', '.join(sorted(COMMANDS))}")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _command_parser(name: str, command: Command):
    module = importlib.import_module(command.module)
    parser = ArgumentParser(prog=f"{PROG} {name}", description=command.help)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    module.add_arguments(parser)
    return module, parser


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


# ---- entry point --------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # known before parsing, so that parse failures honour it too
    prog = PROG
    try:
        top = _top_parser().parse_args(argv)
        debug = debug or top.debug
        if top.command is None:
            raise UsageError(f"missing command; accepted: {', '.join(sorted(COMMANDS))} (see: {PROG} --help)")
        prog = f"{PROG} {top.command}"
        module, parser = _command_parser(top.command, COMMANDS[top.command])
        args = parser.parse_args(top.args)
        args.debug = debug or getattr(args, "debug", False)
        args.command_line = [top.command, *top.args]  # what a command's error may tell the user to rerun
        code = module.run(args)
        sys.stdout.flush()
        return EXIT_OK if code is None else int(code)
    except (UsageError, ConfigError, ContextError) as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:  # argparse's --help, or a command that exits on its own
        return exit_.code if isinstance(exit_.code, int) else (EXIT_OK if exit_.code is None else EXIT_INTERNAL)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as err:  # noqa: BLE001 (the one place that turns any failure into exit code 1)
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"{prog}: internal error: {type(err).__name__}: {_one_line(err)}{hint}", file=sys.stderr)
        return EXIT_INTERNAL
