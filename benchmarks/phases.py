"""One measured phase per process: ``python -m benchmarks.phases PHASE '{json params}'``.

A fresh process per phase makes its peak RSS its own. Each phase imports, connects, notes its
RSS (idle), resets the peak, runs the measured call with a watchdog task that sleeps 5 ms in a
loop and keeps its worst lateness (the longest the event loop was blocked), then prints one JSON
line: ``rate``, ``unit``, ``seconds``, ``peak_rss_mb``, ``idle_rss_mb``, ``worst_stall_ms``,
``wal_mb`` (the server's WAL written meanwhile: how hard the database worked, others' writes
included) and what the phase adds. The database URL comes from ``BATCHINFER_DATABASE_URL``.

Measured phases use only the public API (``BatchInfer`` verbs); the floor and the baseline in
``benchmarks.reference`` use SQL of their own on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from batchinfer import BatchInfer, OpenAIProvider
from benchmarks import data

API_KEY = "sk-emulator"
#: OpenAI's limits; beyond them (500,000 lines) create_batch gets limits raised to match.
MAX_REQUESTS = 50_000
STALL_TICK = 0.005

Params = dict[str, Any]
Result = dict[str, Any]


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Linux: start a new peak-RSS measurement for this process (clear_refs 5)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Meter:
    """Idle RSS, peak RSS and the worst event-loop stall around one measured block."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.worst_stall = 0.0
        self.idle_mb = 0.0
        self.peak_mb = 0.0
        self.peak_reset = False
        self.wal_mb: float | None = None

    async def _watch(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(STALL_TICK)
            late = time.perf_counter() - started - STALL_TICK
            self.worst_stall = max(self.worst_stall, late)

    @contextlib.asynccontextmanager
    async def measure(self) -> AsyncIterator[None]:
        wal_at = await _wal_position()
        self.idle_mb = status_mb("VmRSS")
        self.peak_reset = reset_peak_rss()
        watchdog = asyncio.create_task(self._watch())
        await asyncio.sleep(0)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds = time.perf_counter() - started
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            self.peak_mb = status_mb("VmHWM")
        if wal_at is not None:
            self.wal_mb = await _wal_since(wal_at)

    def result(self, count: float, unit: str, **extra: Any) -> Result:
        return {
            "rate": count / self.seconds,
            "unit": unit,
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_mb,
            "idle_rss_mb": self.idle_mb,
            "worst_stall_ms": self.worst_stall * 1000,
            "peak_reset": self.peak_reset,
            "wal_mb": self.wal_mb,
            **extra,
        }


def database_url() -> str:
    return os.environ["BATCHINFER_DATABASE_URL"]


def plain_url(url: str) -> str:
    """A libpq-style URL for asyncpg itself."""
    for prefix in ("postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        yield conn
    finally:
        await conn.close()


async def _wal_position() -> str | None:
    """Where the server's WAL is; the WAL a phase writes is how much the database worked."""
    try:
        async with connect(database_url()) as conn:
            position: str = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    except asyncpg.PostgresError:
        return None
    return position


async def _wal_since(position: str) -> float:
    async with connect(database_url()) as conn:
        written = await conn.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)", position
        )
    return float(written) / 1e6


def client(p: Params, *, requests: int = 0) -> BatchInfer:
    provider = OpenAIProvider(api_key=API_KEY, base_url=p["base_url"])
    if requests > MAX_REQUESTS:
        limits = dataclasses.replace(provider.limits, max_requests=requests, max_bytes=1 << 40)
        provider = OpenAIProvider(api_key=API_KEY, base_url=p["base_url"], limits=limits)
    return BatchInfer(database_url(), providers=[provider], schema=p["schema"])


async def create(p: Params) -> Result:
    """``create_batch`` of n requests, generated as they are consumed (cheap string slices)."""
    n, endpoint = int(p["n"]), p.get("endpoint", data.CHAT)
    meter = Meter()
    async with client(p, requests=n) as bi:
        await bi.stats()  # connected
        async with meter.measure():
            batch = await bi.create_batch(
                provider="openai",
                endpoint=endpoint,
                model=data.MODELS[endpoint],
                requests=data.requests(p["tag"], n, endpoint),
                metadata={"benchmark": p["tag"]},
            )
    return meter.result(n, "rows/s", batch=str(batch.id), input_mb=batch.input_bytes / 1e6)


async def submit(p: Params) -> Result:
    """``submit_batch`` end to end: the JSONL streamed from the database to the emulator."""
    meter = Meter()
    async with client(p) as bi:
        batch = await bi.get_batch(p["batch"])
        async with meter.measure():
            batch = await bi.submit_batch(batch)
    mb = batch.input_bytes / 1e6
    return meter.result(mb, "MB/s", input_mb=mb, provider_batch_id=batch.provider_batch_id)


async def _check_applied(bi: BatchInfer, batch_id: str, expect: Params) -> None:
    summary = await bi.summary(batch_id)
    by_status = summary["by_status"]
    wanted = {k: v for k, v in expect.items() if v}
    if by_status != wanted:
        raise RuntimeError(f"batch {batch_id}: {by_status} after apply, expected {wanted}")


async def apply(p: Params) -> Result:
    """``fetch_batch_results`` of one completed batch: download, parse, write, sweep, total."""
    meter = Meter()
    async with client(p) as bi:
        batch = await bi.get_batch(p["batch"])
        async with meter.measure():
            await bi.fetch_batch_results(batch)
        report = bi.last_apply_report
        await _check_applied(bi, p["batch"], p["expect"])
    applied = report.applied if report else 0
    return meter.result(batch.request_total, "results/s", applied=applied)


async def apply_many(p: Params) -> Result:
    """``fetch_batch_results`` of several batches at once in one process (asyncio.gather)."""
    meter = Meter()
    async with client(p) as bi:
        batches = [await bi.get_batch(b) for b in p["batches"]]
        async with meter.measure():
            await asyncio.gather(*(bi.fetch_batch_results(b) for b in batches))
        for b in p["batches"]:
            await _check_applied(bi, b, p["expect"])
    total = sum(b.request_total for b in batches)
    return meter.result(total, "results/s", batches=len(batches))


def phases() -> dict[str, Callable[[Params], Awaitable[Result]]]:
    from benchmarks import reference

    return {
        "create": create,
        "submit": submit,
        "apply": apply,
        "apply_many": apply_many,
        "floor": reference.floor,
        "baseline": reference.baseline,
    }


def main() -> None:
    phase, params = sys.argv[1], orjson.loads(sys.argv[2])
    result = asyncio.run(phases()[phase](params))
    print(orjson.dumps(result, default=_default).decode(), flush=True)


def _default(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    main()
