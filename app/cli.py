"""The ``netmoe`` console command.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser
whose ``func`` default runs the command and returns an exit code. Modules keep heavy imports
(torch, OR-Tools, grpc) inside their run functions so ``netmoe --help`` stays fast.

Conventions every subcommand follows: bad input (a flag, a variable, a file) ends with one line
naming it and its value and exit code 2; Ctrl-C ends with exit code 130 and no traceback; help
shows every flag's default.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from netmoe import __version__

# Order is the order shown in --help.
COMMANDS = ["netmoe.app.demo", "netmoe.app.evaluate", "netmoe.server.cli", "netmoe.server.health",
            "netmoe.app.sources", "netmoe.app.record"]
BENCHES = ["netmoe.app.bench.solver", "netmoe.app.bench.cluster", "netmoe.app.bench.service"]

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, what shells report for a process ended by Ctrl-C


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already states the default or there is none to
    state (None, "", a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not has_default(action):
            return text
        return super()._get_help_string(action)


def has_default(action: argparse.Action) -> bool:
    """False for defaults that mean "not set": None, "", a switch that is off."""
    value = action.default
    return not (value is None or value is False or value == "" or value is argparse.SUPPRESS)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (exit code 2)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="netmoe",
        description="Dynamic sample placement for Mixture-of-Experts training.",
    )
    parser.add_argument("--version", action="version", version=f"netmoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name in BENCHES:
        importlib.import_module(name).register(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = " ".join(filter(None, ("netmoe", args.command, getattr(args, "bench", None))))
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        # Bad input (trace files, flags, variables): one clear line, not a traceback.
        print(f"{name}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly; flushing at exit would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
