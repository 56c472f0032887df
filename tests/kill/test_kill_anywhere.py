"""The kill-anywhere harness, small: ten seeded runs, each a child killed at a named point
(SIGKILL) and the flow run again, then every batch checked against the emulator's files.

The long run is ``python -m tests.kill --runs 300 --seed 1`` (see ``tests/kill/harness.py``).
``BATCHINFER_KILL_SEED`` changes the seed of this one.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.kill.harness import Harness

SEED = int(os.environ.get("BATCHINFER_KILL_SEED", "36"))
RUNS = 10


async def test_killed_anywhere_every_result_once_every_cost_exact(
    database_url: str, tmp_path: Path
) -> None:
    lines: list[str] = []
    harness = Harness(database_url, tmp_path, out=lines.append, verbose=True)
    try:
        figures = await harness.run_many(SEED, list(range(RUNS)))
    finally:
        await harness.aclose()
    print("\n" + "\n".join(lines) + "\n" + figures.report(SEED))
    assert figures.runs == RUNS
    assert not figures.anomalies, "\n\n".join(lines)
