"""The benchmark's results: rows, the ratios to floor and baseline, the scale check, and the
one table (plain aligned text) and JSON document they are printed as."""

from __future__ import annotations

import hashlib
import itertools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import orjson

Row = dict[str, Any]

COLUMNS = (
    "phase",
    "size",
    "rate",
    "peak RSS",
    "idle RSS",
    "worst stall",
    "ratio to floor",
    "ratio to baseline",
    "WAL written",
)
#: Applying 10x the lines may take at most this much more than 10x the time.
SCALE_SLACK = 1.1


def compared(phase: str) -> bool:
    """Rows compared with the floor and the baseline of their (per-batch) size."""
    return phase == "apply" or phase.startswith("apply x")


def row(phase: str, size: int, result: dict[str, Any], *, batches: int = 1) -> Row:
    return {
        "phase": phase,
        "size": size,
        "batches": batches,
        "rate": result["rate"],
        "unit": result["unit"],
        "seconds": result["seconds"],
        "peak_rss_mb": result["peak_rss_mb"],
        "idle_rss_mb": result["idle_rss_mb"],
        "worst_stall_ms": result["worst_stall_ms"],
        "ratio_to_floor": None,
        "ratio_to_baseline": None,
        "detail": {k: v for k, v in result.items() if k not in _MAIN_KEYS},
    }


_MAIN_KEYS = {"rate", "unit", "seconds", "peak_rss_mb", "idle_rss_mb", "worst_stall_ms"}


def add_ratios(rows: list[Row]) -> None:
    """Apply's rate over the floor's and the baseline's at the same (per-batch) size."""
    by_key = {(r["phase"], r["size"]): r for r in rows}
    for r in rows:
        if not compared(r["phase"]):
            continue
        floor = by_key.get(("floor", r["size"]))
        baseline = by_key.get(("baseline", r["size"]))
        if floor:
            r["ratio_to_floor"] = r["rate"] / floor["rate"]
        if baseline:
            r["ratio_to_baseline"] = r["rate"] / baseline["rate"]


def scale_checks(rows: list[Row]) -> list[dict[str, Any]]:
    """For each pair of successive single-batch apply sizes: the time ratio against the size
    ratio (at most SCALE_SLACK times it, e.g. 11x for 10x the lines), and both peak RSS."""
    applied = sorted((r for r in rows if r["phase"] == "apply"), key=lambda r: r["size"])
    floors = {r["size"]: r for r in rows if r["phase"] == "floor"}
    checks = []
    for small, large in itertools.pairwise(applied):
        size_ratio = large["size"] / small["size"]
        time_ratio = large["seconds"] / small["seconds"]
        floor_small, floor_large = floors.get(small["size"]), floors.get(large["size"])
        floor_ratio = (
            floor_large["seconds"] / floor_small["seconds"] if floor_small and floor_large else None
        )
        checks.append(
            {
                "small": small["size"],
                "large": large["size"],
                "size_ratio": size_ratio,
                "time_ratio": time_ratio,
                "target": size_ratio * SCALE_SLACK,
                "ok": time_ratio <= size_ratio * SCALE_SLACK,
                "floor_time_ratio": floor_ratio,
                "peak_rss_mb": [small["peak_rss_mb"], large["peak_rss_mb"]],
                "wal_mb": [small["detail"].get("wal_mb"), large["detail"].get("wal_mb")],
            }
        )
    return checks


def _size(r: Row) -> str:
    return f"{r['batches']}x{r['size']:,}" if r["batches"] > 1 else f"{r['size']:,}"


def _rate(r: Row) -> str:
    value = r["rate"]
    number = f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
    return f"{number} {r['unit']}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def cells(r: Row) -> list[str]:
    return [
        r["phase"],
        _size(r),
        _rate(r),
        f"{r['peak_rss_mb']:,.0f} MB",
        f"{r['idle_rss_mb']:,.0f} MB",
        f"{r['worst_stall_ms']:,.1f} ms",
        _ratio(r["ratio_to_floor"]),
        _ratio(r["ratio_to_baseline"]),
        _mb(r["detail"].get("wal_mb")),
    ]


def _mb(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e3:,.2f} GB" if value >= 1e3 else f"{value:,.0f} MB"


def table(rows: list[Row]) -> str:
    body = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    left = {0, 1}

    def fmt(line: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(body[0]), rule, *(fmt(line) for line in body[1:])])


def markdown(rows: list[Row]) -> str:
    """The same table as Markdown, for the README."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def scale_lines(checks: list[dict[str, Any]]) -> list[str]:
    lines = []
    for c in checks:
        floor = c["floor_time_ratio"]
        lines.append(
            f"scale: apply of {c['large']:,} took {c['time_ratio']:.1f}x the time of "
            f"{c['small']:,} ({c['size_ratio']:.0f}x the lines; target <= {c['target']:.0f}x: "
            f"{'ok' if c['ok'] else 'MISSED'}; the floor took "
            f"{'-' if floor is None else f'{floor:.1f}x'}); peak RSS "
            f"{c['peak_rss_mb'][0]:,.0f} MB vs {c['peak_rss_mb'][1]:,.0f} MB; "
            f"WAL {_mb(c['wal_mb'][0])} vs {_mb(c['wal_mb'][1])}"
        )
    return lines


def data_lines(data: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for tag, d in data.items():
        out.append(
            f"data, {tag}: {d['input_mb']:,.1f} MB of requests; results: "
            f"{d['output_lines']:,} output lines ({d['output_bytes'] / 1e6:,.1f} MB, "
            f"mean {d['output_bytes'] / max(d['output_lines'], 1):,.0f} B, longest "
            f"{d['longest_line'] / 1e3:,.0f} KB) + {d['error_lines']:,} error lines"
        )
    return out


def machine(postgres_version: str, load_at_start: tuple[float, ...]) -> dict[str, Any]:
    """The machine, and its load average at the start and the end (others' work skews rates)."""
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "postgres": postgres_version,
        "platform": platform.platform(),
        "load_average_start": [round(x, 2) for x in load_at_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def code_version(root: Path) -> dict[str, Any]:
    """Which code was measured: the commit, the files changed since, and a digest of the
    package's sources (the tree may be edited between runs without a commit)."""
    digest = hashlib.sha256()
    for source in sorted((root / "batchinfer").rglob("*.py")):
        digest.update(source.relative_to(root).as_posix().encode() + b"\0" + source.read_bytes())
    version: dict[str, Any] = {"sources_sha256": digest.hexdigest()[:16]}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "batchinfer"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return version
    version["commit"] = commit.stdout.strip() or None
    version["changed"] = [line[3:] for line in changed.stdout.splitlines()]
    return version


def write_json(path: str, document: dict[str, Any]) -> None:
    Path(path).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
