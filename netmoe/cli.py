"""The ``netmoe`` console command.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser
whose ``func`` default runs the command and returns an exit code. Modules keep heavy imports
(torch, OR-Tools, grpc) inside their run functions so ``netmoe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order shown in --help.
COMMANDS = ["netmoe.demo", "netmoe.evaluate", "netmoe.server.cli", "netmoe.server.health",
            "netmoe.convert", "netmoe.record"]
BENCHES = ["netmoe.bench.solver", "netmoe.bench.cluster", "netmoe.bench.service"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netmoe",
        description="Dynamic sample placement for Mixture-of-Experts training.",
    )
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
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        # Bad input (trace files, flags): one clear line, not a traceback.
        print(f"netmoe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
