"""Benchmark: create, submit and apply the results of batches of 5,000 to 500,000 lines.

    python -m benchmarks.run --sizes 5000,50000,500000 --json out.json
    nox -s benchmark -- --sizes 5000,50000
    python -m benchmarks.run --quick            # 2,000 lines: a smoke run for CI

The database is ``--database`` or ``BATCHINFER_DATABASE_URL`` (an embedded Postgres when
neither is given); each group of phases below works in a fresh schema of its own, dropped
afterwards, and apply starts from a vacuumed, checkpointed table (as it would hours after the
submit). The emulator runs in a process of its own (``benchmarks.emulator``), as the provider
would be on another machine, and each measured phase in a fresh process
(``benchmarks.phases``), so its peak RSS is its own. For each size, on chat requests
(``benchmarks.data``: ~1.5 KB output lines with usage, ~10% error lines, a 200 KB line every
10,000):

- create: ``create_batch`` (rows/s);
- submit: ``submit_batch`` end to end, the JSONL streamed from the database (MB/s). Only up
  to 50,000 lines, OpenAI's limit; beyond it the batch gets its provider batch from a stand-in
  upload and its result files are written straight into the emulator (set-up, not measured);
- apply: ``fetch_batch_results`` (results/s);
- floor: one server-side ``UPDATE ... FROM`` of the same results staged in a temp table;
- baseline: the reference design, whole file read then a load, an update and a commit per
  result (``benchmarks.reference``).

Then a small responses batch and a small embeddings batch are applied, and a process applies
10 batches of up to 50,000 lines at once (``asyncio.gather``). Every phase reports its rate,
peak RSS, idle RSS (imported and connected), worst event-loop stall and the WAL the server
wrote meanwhile; apply its ratio to the floor and the baseline; successive sizes the scale
check (10x the lines in at most 11x the time). The table goes to stdout, progress to stderr,
all of it to ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from batchinfer import BatchInfer, OpenAIProvider
from batchinfer.providers.base import InputStream
from batchinfer.testing.postgres import database_or_embedded
from benchmarks import data, report
from benchmarks.phases import API_KEY, MAX_REQUESTS, connect
from benchmarks.reference import settle

ROOT = Path(__file__).resolve().parent.parent
MIXED_MAX = 5_000
CONCURRENT_MAX = 50_000


class StandInProvider(OpenAIProvider):
    """Set-up only: uploads a one-line stand-in instead of the batch's JSONL, so a batch of any
    size gets a provider batch at the emulator; ``/craft`` then completes it with result files
    for every line of the real batch."""

    async def upload_input(self, stream: InputStream, *, filename: str) -> str:
        message = {"role": "user", "content": "stand-in"}
        body = orjson.dumps({"model": data.MODELS[data.CHAT], "messages": [message]})
        line = self.encode_line("stand-in", data.CHAT, body)

        async def one_line() -> AsyncIterator[bytes]:
            yield line

        return await super().upload_input(one_line, filename=filename)


class Bench:
    def __init__(self, args: argparse.Namespace, url: str, urls: dict[str, str]) -> None:
        self.args = args
        self.url = url
        self.base_url = urls["base_url"]
        self.control_url = urls["control"]
        self.schema = ""
        self.rows: list[report.Row] = []
        self.data: dict[str, dict[str, Any]] = {}
        self.started = time.perf_counter()
        self.http = aiohttp.ClientSession()

    @contextlib.asynccontextmanager
    async def fresh_schema(self) -> AsyncIterator[None]:
        """An empty schema for one group of phases, dropped afterwards: one size's rows do not
        weigh on the next size's figures, and nothing is left behind."""
        self.schema = f"bench_{uuid.uuid4().hex[:10]}"
        self.bi = BatchInfer(
            self.url,
            providers=[OpenAIProvider(api_key=API_KEY, base_url=self.base_url)],
            schema=self.schema,
        )
        self.stand_in = BatchInfer(
            self.url,
            providers=[StandInProvider(api_key=API_KEY, base_url=self.base_url)],
            schema=self.schema,
        )
        try:
            await self.bi.migrate()
            yield
        finally:
            await self.bi.aclose()
            await self.stand_in.aclose()
            async with connect(self.url) as conn:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    async def settle(self) -> None:
        """Before apply: vacuum and checkpoint, as the hours a batch runs would have (unless
        --no-settle: then apply meets the table as the submit just left it)."""
        if self.args.no_settle:
            return
        async with connect(self.url) as conn:
            await settle(conn, self.schema)

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", file=sys.stderr)

    async def child(self, phase: str, **params: Any) -> dict[str, Any]:
        params = {"schema": self.schema, "base_url": self.base_url, **params}
        env = {
            **os.environ,
            "BATCHINFER_DATABASE_URL": self.url,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.phases",
            phase,
            orjson.dumps(params).decode(),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"phase {phase} failed:\n{err.decode(errors='replace')[-4000:]}")
        result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
        self.log(f"  {phase}: {result['rate']:,.1f} {result['unit']} ({result['seconds']:.2f} s)")
        return result

    async def control(self, path: str, **params: Any) -> dict[str, Any]:
        """A call to the emulator process's control API (POST with params, else GET)."""
        method = "POST" if params else "GET"
        body = orjson.dumps(params) if params else None
        async with self.http.request(method, self.control_url + path, data=body) as resp:
            resp.raise_for_status()
            answer: dict[str, Any] = orjson.loads(await resp.read())
            return answer

    async def wait_done(self, batch_id: uuid.UUID | str) -> str:
        """Poll until the emulator has completed the batch; its provider batch id."""
        deadline = time.monotonic() + 900
        while (status := (await self.bi.fetch_batch_status(batch_id)).value) != "completed":
            if status in ("failed", "expired", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"batch {batch_id} ended {status} at the emulator")
            await asyncio.sleep(0.05)
        provider_batch_id = (await self.bi.get_batch(batch_id)).provider_batch_id
        assert provider_batch_id is not None
        return provider_batch_id

    async def crafted(self, batch_id: uuid.UUID | str, tag: str, n: int) -> dict[str, Any]:
        batch = await self.stand_in.submit_batch(batch_id)
        files = await self.control("/craft", batch=batch.provider_batch_id, tag=tag, n=n)
        await self.wait_done(batch_id)
        return files | {"provider_batch_id": batch.provider_batch_id}

    def note(self, label: str, n: int, input_mb: float, files: dict[str, Any]) -> dict[str, int]:
        """Describe a batch's data; the completion counts its apply must leave."""
        self.data[label] = {"lines": n, "input_mb": input_mb} | files
        return {"completed": files["output_lines"], "failed": files["error_lines"]}

    async def single(self, size: int) -> None:
        tag = f"c{size}"
        self.log(f"{tag}: {size:,} chat requests")
        created = await self.child("create", tag=tag, n=size)
        batch = created["batch"]
        self.rows.append(report.row("create", size, created))
        if size <= MAX_REQUESTS:
            await self.control("/fail", tag=tag, n=size)
            submitted = await self.child("submit", batch=batch)
            self.rows.append(report.row("submit", size, submitted))
            provider_batch_id = await self.wait_done(batch)
            files = await self.control("/rewrite", batch=provider_batch_id)
        else:
            self.log(f"  over {MAX_REQUESTS:,} lines: no submit; result files crafted")
            files = await self.crafted(batch, tag, size)
            provider_batch_id = files.pop("provider_batch_id")
        expect = self.note(f"chat {size:,}", size, created["input_mb"], files)
        await self.settle()
        applied = await self.child("apply", batch=batch, expect=expect)
        floor = await self.child("floor", batch=batch)
        baseline = await self.child("baseline", batch=batch, rows=self.args.baseline_rows)
        await self.control("/forget", batch=provider_batch_id)
        self.rows += [
            report.row("apply", size, applied),
            report.row("floor", size, floor),
            report.row("baseline", size, baseline),
        ]

    async def mixed(self, size: int) -> None:
        for endpoint, name, letter in (
            (data.RESPONSES, "apply responses", "r"),
            (data.EMBEDDINGS, "apply embeddings", "e"),
        ):
            tag = f"{letter}{size}"
            self.log(f"{tag}: {size:,} {endpoint} requests")
            batch = await self.bi.create_batch(
                provider="openai",
                endpoint=endpoint,
                model=data.MODELS[endpoint],
                requests=data.requests(tag, size, endpoint),
            )
            await self.control("/fail", tag=tag, n=size)
            await self.bi.submit_batch(batch)
            provider_batch_id = await self.wait_done(batch.id)
            files = await self.control("/rewrite", batch=provider_batch_id)
            expect = self.note(f"{name[6:]} {size:,}", size, batch.input_bytes / 1e6, files)
            await self.settle()
            applied = await self.child("apply", batch=str(batch.id), expect=expect)
            await self.control("/forget", batch=provider_batch_id)
            self.rows.append(report.row(name, size, applied))

    async def concurrent(self, per: int, count: int) -> None:
        self.log(f"{count} batches of {per:,} chat requests, applied at once")
        ids: list[str] = []
        provider_ids: list[str] = []
        expect: dict[str, int] = {}
        for k in range(count):
            tag = f"m{k}x{per}"
            batch = await self.bi.create_batch(
                provider="openai",
                endpoint=data.CHAT,
                model=data.MODELS[data.CHAT],
                requests=data.requests(tag, per),
            )
            files = await self.crafted(batch.id, tag, per)
            provider_ids.append(files.pop("provider_batch_id"))
            if k == 0:  # the same lines in every batch, under other custom_ids
                expect = self.note(f"chat {count}x{per:,}", per, batch.input_bytes / 1e6, files)
            ids.append(str(batch.id))
        await self.settle()
        applied = await self.child("apply_many", batches=ids, expect=expect)
        for provider_batch_id in provider_ids:
            await self.control("/forget", batch=provider_batch_id)
        self.rows.append(report.row(f"apply x{count}", per, applied, batches=count))

    async def run(self) -> dict[str, Any]:
        try:
            for size in self.args.sizes:
                async with self.fresh_schema():
                    await self.single(size)
            async with self.fresh_schema():
                await self.mixed(self.args.mixed_size)
            async with self.fresh_schema():
                await self.concurrent(self.args.concurrent_size, self.args.concurrent)
            emulator = await self.control("/stats")
        finally:
            await self.http.close()
        report.add_ratios(self.rows)
        return {
            "rows": self.rows,
            "scale": report.scale_checks(self.rows),
            "data": self.data,
            "emulator": emulator,
        }


async def main_async(args: argparse.Namespace, url: str) -> dict[str, Any]:
    emulator = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.emulator",
        "--step-seconds",
        str(args.step_seconds),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    load = os.getloadavg()
    try:
        assert emulator.stdout is not None
        ready = await asyncio.wait_for(emulator.stdout.readline(), 60)
        if not ready:
            raise RuntimeError("the emulator process did not start")
        started = time.perf_counter()
        document = await Bench(args, url, orjson.loads(ready)).run()
        document["total_seconds"] = time.perf_counter() - started
    finally:
        emulator.terminate()
        await emulator.wait()
    async with connect(url) as conn:
        version = await conn.fetchval("SHOW server_version")
    document["machine"] = report.machine(version, load)
    document["code"] = report.code_version(ROOT)
    return document


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="See the module docstring (benchmarks/run.py) for what each phase measures.",
    )
    parser.add_argument("--sizes", default="5000,50000", help="lines per batch, comma-separated")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--database", default=os.environ.get("BATCHINFER_DATABASE_URL"))
    parser.add_argument("--quick", action="store_true", help="2,000 lines: a smoke run for CI")
    parser.add_argument("--baseline-rows", type=int, default=3_000, help="baseline sample")
    parser.add_argument("--concurrent", type=int, default=10, help="batches applied at once")
    parser.add_argument("--step-seconds", type=float, default=0.05, help="emulator step")
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="apply right after the submit's writes, without the VACUUM and CHECKPOINT first",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.baseline_rows = "2000", 300
    args.sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    if not args.sizes or min(args.sizes) < 10:
        parser.error("--sizes needs sizes of at least 10 lines")
    args.mixed_size = min(args.sizes[0], 200 if args.quick else MIXED_MAX)
    args.concurrent_size = 200 if args.quick else min(args.sizes[-1], CONCURRENT_MAX)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with database_or_embedded(args.database) as url:
        document = asyncio.run(main_async(args, url))
    document["settings"] = {k: v for k, v in vars(args).items() if k not in ("database", "json")}
    document["markdown"] = report.markdown(document["rows"])
    print(report.table(document["rows"]))
    print()
    for line in report.data_lines(document["data"]) + report.scale_lines(document["scale"]):
        print(line)
    if any(size > MAX_REQUESTS for size in args.sizes):
        print(
            f"submit is measured up to {MAX_REQUESTS:,} lines (OpenAI's limit per batch); "
            "larger batches get their result files written into the emulator directly"
        )
    if args.json:
        report.write_json(args.json, document)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
