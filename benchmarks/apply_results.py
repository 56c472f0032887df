"""Benchmark: create, submit and apply the results of one large batch, with a baseline.

The emulator runs in its own process (as the provider would be on another machine) and serves
the files over loopback HTTP. The baseline is the reference design's shape, measured in the same
run on the same data: read the whole file, then per line load the row, update it and commit.

    python benchmarks/apply_results.py --requests 50000
    BATCHINFER_DATABASE_URL=postgresql://... python benchmarks/apply_results.py

Prints rates and the ratio to the baseline. Peak memory is this process's own VmHWM, reset
before each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
import sqlalchemy as sa

from batchinfer import BatchInfer, OpenAIProvider
from batchinfer.testing.postgres import database_or_embedded


def reset_peak_rss() -> None:
    """Linux: start a new peak-RSS measurement for this process (clear_refs 5)."""
    gc.collect()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def requests(n: int, words: int) -> list[dict[str, object]]:
    return [
        {
            "custom_id": f"r{i}",
            "body": {
                "messages": [
                    {"role": "system", "content": "Summarise the text in one sentence."},
                    {"role": "user", "content": " ".join(f"w{i}x{j}" for j in range(words))},
                ]
            },
        }
        for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_server(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/batches", headers={"Authorization": "Bearer k"}):
                    return
            await asyncio.sleep(0.05)
    raise RuntimeError("the emulator did not start")


async def baseline(
    bi: BatchInfer, engine_url: str, batch_id: uuid.UUID, base: str, limit: int
) -> float:
    """The reference's shape: whole file in memory, then load + update + commit per row."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from batchinfer.client import _asyncpg_url

    batch = await bi.get_batch(batch_id)
    engine = create_async_engine(_asyncpg_url(engine_url))
    schema = bi.schema
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{base}/files/{batch.output_file_id}/content",
            headers={"Authorization": "Bearer k"},
        ) as resp,
    ):
        body = await resp.read()
    done = 0
    async with engine.connect() as conn:
        for line in body.splitlines()[:limit]:
            record = orjson.loads(line)
            row = (
                await conn.execute(
                    sa.text(
                        f"SELECT id, status FROM {schema}.completions "
                        "WHERE batch_id = :b AND custom_id = :c"
                    ),
                    {"b": batch_id, "c": record["custom_id"]},
                )
            ).one()
            resp_body = record["response"]["body"]
            usage = resp_body["usage"]
            await conn.execute(
                sa.text(
                    f"UPDATE {schema}.completions SET status = 'completed', "
                    "response_body = CAST(:body AS jsonb), output_text = :text, "
                    "prompt_tokens = :p, completion_tokens = :o, completed_at = now() "
                    "WHERE id = :id"
                ),
                {
                    "body": orjson.dumps(resp_body).decode(),
                    "text": resp_body["choices"][0]["message"]["content"],
                    "p": usage["prompt_tokens"],
                    "o": usage["completion_tokens"],
                    "id": row.id,
                },
            )
            await conn.commit()
            done += 1
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return done / elapsed


async def run(args: argparse.Namespace, database_url: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    emulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchinfer",
            "emulator",
            "--port",
            str(port),
            "--step-seconds",
            "0.5",
            "--api-key",
            "k",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        await wait_for_server(base)
        provider = OpenAIProvider(api_key="k", base_url=base)
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        async with BatchInfer(
            database_url, providers=[provider], schema=schema, poll_interval=0.25
        ) as bi:
            await bi.migrate()
            reqs = requests(args.requests, args.words)
            t0 = time.perf_counter()
            batch = await bi.create_batch(
                provider="openai",
                endpoint="/v1/chat/completions",
                model="gpt-4o-mini",
                requests=reqs,
            )
            create_s = time.perf_counter() - t0
            del reqs
            mb = batch.input_bytes / 1e6
            # Each phase runs in a fresh process, so its peak memory is its own.
            upload = await child("upload", database_url, schema, base, batch.id)
            submit = await child("submit", database_url, schema, base, batch.id)
            while (await bi.fetch_batch_status(batch)).value != "completed":
                await asyncio.sleep(0.25)
            applied = await child("apply", database_url, schema, base, batch.id)
            submit_s, apply_s = submit["seconds"], applied["seconds"]
            ours = args.requests / apply_s

            twin = await bi.create_batch(
                provider="openai",
                endpoint="/v1/chat/completions",
                model="gpt-4o-mini",
                requests=requests(args.requests, args.words),
            )
            twin = await bi.submit_batch(twin)
            while (await bi.fetch_batch_status(twin)).value != "completed":
                await asyncio.sleep(0.25)
            base_rate = await baseline(bi, database_url, twin.id, base, args.baseline_rows)
            async with bi._store.db.engine.begin() as conn:
                await conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))

        print(f"requests                 {args.requests:,} ({mb:.1f} MB of JSONL)")
        print(f"create                   {args.requests / create_s:,.0f} rows/s ({create_s:.2f} s)")
        print(
            f"upload from the database {mb / upload['seconds']:,.1f} MB/s "
            f"({upload['seconds']:.2f} s, to a server that discards it)"
        )
        print(
            f"submit (upload+create)   {mb / submit_s:,.1f} MB/s ({submit_s:.2f} s, "
            "to the emulator, which stores and indexes the file)"
        )
        print(f"apply results            {ours:,.0f} results/s ({apply_s:.2f} s)")
        print(
            f"baseline (per-row+commit) {base_rate:,.0f} results/s "
            f"(first {args.baseline_rows:,} lines)"
        )
        print(f"ratio to baseline        {ours / base_rate:.1f}x")
        for name, phase in (("upload", upload), ("submit", submit), ("apply", applied)):
            print(
                f"peak RSS, {name:<6}         {phase['peak_mb']:.0f} MB "
                f"(the process idle, connected: {phase['idle_mb']:.0f} MB)"
            )
    finally:
        emulator.terminate()
        emulator.wait()


async def child(
    phase: str, database_url: str, schema: str, base: str, batch_id: uuid.UUID
) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--schema",
        schema,
        "--base",
        base,
        "--batch",
        str(batch_id),
        env={**os.environ, "BATCHINFER_DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the {phase} phase failed")
    result: dict[str, float] = orjson.loads(out.splitlines()[-1])
    return result


async def _sink() -> tuple[aiohttp.web.AppRunner, str]:
    """A server that reads an upload and throws it away: the client's side of the upload alone."""
    from aiohttp import web

    async def files(request: web.Request) -> web.Response:
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, aiohttp.BodyPartReader):
                while await part.read_chunk(1 << 20):
                    pass
        return web.json_response({"id": "file-sink"})

    app = web.Application()
    app.router.add_post("/v1/files", files)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"


async def run_phase(args: argparse.Namespace, database_url: str) -> None:
    runner = None
    if args.phase == "upload":
        runner, args.base = await _sink()
    provider = OpenAIProvider(api_key="k", base_url=args.base)
    async with BatchInfer(database_url, providers=[provider], schema=args.schema) as bi:
        batch = await bi.get_batch(args.batch)  # connects and warms up
        idle = peak_rss_mb()
        reset_peak_rss()
        t0 = time.perf_counter()
        if args.phase == "submit":
            await bi.submit_batch(batch)
        elif args.phase == "upload":
            submitter = bi._submitter
            await provider.upload_input(
                lambda: submitter._input_stream(batch, provider), filename="sink.jsonl"
            )
        else:
            await bi.fetch_batch_results(batch)
        seconds = time.perf_counter() - t0
    if runner is not None:
        await runner.cleanup()
    print(orjson.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(), "idle_mb": idle}).decode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--words", type=int, default=120, help="words per prompt (line size)")
    parser.add_argument("--baseline-rows", type=int, default=5_000)
    parser.add_argument("--phase", choices=["upload", "submit", "apply"], help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--batch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    url = os.environ.get("BATCHINFER_DATABASE_URL")
    if args.phase:
        assert url is not None
        asyncio.run(run_phase(args, url))
        return
    with database_or_embedded(url) as database_url:
        asyncio.run(run(args, database_url))


if __name__ == "__main__":
    main()
