"""``python -m tests.kill --runs 300 --seed 1``: the long kill-anywhere run.

Uses ``--database``, else ``BATCHINFER_TEST_DATABASE_URL``, else an embedded Postgres started
for the run. Prints a line per run with ``-v``, every anomaly with its parameters, the command
that repeats it and the children's logs, then the figures. Exits 1 if there was an anomaly.
``--run N`` (repeatable) runs only those runs of the seed, with the same parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from batchinfer.testing.postgres import database_or_embedded
from tests.kill.harness import Figures, Harness


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.kill", description=__doc__)
    parser.add_argument("--runs", type=int, default=50, help="how many runs (default 50)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run", type=int, action="append", help="only this run (repeatable)")
    parser.add_argument("--database", default=os.environ.get("BATCHINFER_TEST_DATABASE_URL"))
    parser.add_argument("--workdir", type=Path, help="children's logs (default: a temp dir)")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per run")
    return parser.parse_args()


def _say(line: str) -> None:
    print(line, flush=True)


async def _main(args: argparse.Namespace, database_url: str, workdir: Path) -> Figures:
    harness = Harness(database_url, workdir, verbose=args.verbose, out=_say)
    try:
        runs = args.run if args.run else list(range(args.runs))
        return await harness.run_many(args.seed, runs)
    finally:
        await harness.aclose()


def main() -> int:
    args = _args()
    with (
        database_or_embedded(args.database) as url,
        tempfile.TemporaryDirectory(prefix="batchinfer-kill-") as tmp,
    ):
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        figures = asyncio.run(_main(args, url, workdir))
        print(figures.report(args.seed), flush=True)
        if figures.anomalies and args.workdir is None:
            print("(logs were in a temp dir, now deleted: pass --workdir to keep them)")
    return 1 if figures.anomalies else 0


if __name__ == "__main__":
    sys.exit(main())
