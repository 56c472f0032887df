"""Benchmark: create, submit and apply the results of one large batch, with a baseline.

The emulator runs in its own process (as the provider would be on another machine) and serves
the files over loopback HTTP. The baseline is the reference design's shape, measured in the same
run on the same data: read the whole file, then per line load the row, update it and commit.

    python benchmarks/apply_results.py --requests 50000
    BATCHINFER_DATABASE_URL=postgresql://... python benchmarks/apply_results.py

Prints rates and the ratio to the baseline. Peak memory is this process's own VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
import sqlalchemy as sa

from batchinfer import BatchInfer, OpenAIProvider
from batchinfer.testing.postgres import start_embedded_postgres


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
    schema = bi.store.schema
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
            t0 = time.perf_counter()
            batch = await bi.submit_batch(batch)
            submit_s = time.perf_counter() - t0
            mb = batch.input_bytes / 1e6
            del reqs
            while (await bi.fetch_batch_status(batch)).value != "completed":
                await asyncio.sleep(0.25)
            t0 = time.perf_counter()
            batch = await bi.fetch_batch_results(batch)
            apply_s = time.perf_counter() - t0
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
            async with bi.store._engine.begin() as conn:
                await conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))

        print(f"requests                 {args.requests:,} ({mb:.1f} MB of JSONL)")
        print(f"create                   {args.requests / create_s:,.0f} rows/s ({create_s:.2f} s)")
        print(f"submit (upload+create)   {mb / submit_s:,.1f} MB/s ({submit_s:.2f} s)")
        print(f"apply results            {ours:,.0f} results/s ({apply_s:.2f} s)")
        print(
            f"baseline (per-row+commit) {base_rate:,.0f} results/s "
            f"(first {args.baseline_rows:,} lines)"
        )
        print(f"ratio to baseline        {ours / base_rate:.1f}x")
        print(f"peak RSS of this process {peak_rss_mb():.0f} MB")
    finally:
        emulator.terminate()
        emulator.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--words", type=int, default=120, help="words per prompt (line size)")
    parser.add_argument("--baseline-rows", type=int, default=5_000)
    args = parser.parse_args()
    url = os.environ.get("BATCHINFER_DATABASE_URL")
    if url:
        asyncio.run(run(args, url))
        return
    with tempfile.TemporaryDirectory() as tmp:
        server = start_embedded_postgres(Path(tmp) / "pgdata")
        try:
            asyncio.run(run(args, server.url))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
