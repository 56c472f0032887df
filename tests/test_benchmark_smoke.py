"""The benchmark (benchmarks/run.py) runs end to end at 2,000 lines against the suite's
database. Only that it completes, prints its table and writes JSON with every phase: no timing
is asserted (the figures belong to the machine, not to the code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = {
    "create",
    "submit",
    "apply",
    "floor",
    "baseline",
    "apply responses",
    "apply embeddings",
    "apply x10",
}


def test_benchmark_quick_run(database_url: str, tmp_path: Path) -> None:
    out = tmp_path / "benchmark.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "BATCHINFER_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    header = proc.stdout.splitlines()[0].split()
    assert header[:2] == ["phase", "size"]
    assert "baseline" in header
    document = json.loads(out.read_text())
    rows = document["rows"]
    assert {r["phase"] for r in rows} == PHASES
    for r in rows:
        assert r["rate"] > 0, r
        assert r["peak_rss_mb"] > 0, r
        assert r["worst_stall_ms"] >= 0, r
        assert r["phase"] in proc.stdout
    apply = next(r for r in rows if r["phase"] == "apply")
    assert apply["ratio_to_floor"] is not None
    assert apply["ratio_to_baseline"] is not None
