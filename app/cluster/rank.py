"""One rank of a sequence of training runs:
``python -m netmoe.app.cluster.rank --plan P --out DIR``.

Runs inside the testbed (env:// rendezvous, RANK and WORLD_SIZE set by the launcher). The plan
JSON is a list of ``{"name": str, "port": int, "config": TrainConfig fields}``; each entry is one
full run of ``netmoe.app.reference.train.train`` (its own process group on MASTER_PORT = port,
its own model from the same checkpoint and seed), and this rank writes
``DIR/<name>/rank<RANK>.json``.
Running every mode and repeat in one process pays torch's import once per rank instead of once
per run (about 10 s per launch of 8 processes on 2 cores), and lets the bench interleave modes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netmoe.app.cluster.rank")
    parser.add_argument("--plan", type=Path, required=True, help="JSON list of runs")
    parser.add_argument("--out", type=Path, required=True, help="folder of the result files")
    args = parser.parse_args(argv)
    from netmoe.app.reference.train import TrainConfig, train

    plan = json.loads(args.plan.read_text())
    if not isinstance(plan, list) or not plan:
        raise ValueError(f"--plan must hold a non-empty list of runs, got {type(plan).__name__}")
    rank = os.environ["RANK"]
    for entry in plan:
        cfg = TrainConfig.from_dict(entry["config"])
        os.environ["MASTER_PORT"] = str(int(entry["port"]))
        result = train(cfg)
        out = args.out / entry["name"] / f"rank{rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(result.to_json())
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
