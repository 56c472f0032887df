"""Workers inside web apps: a FastAPI app and an aiohttp app on real Postgres and the emulator.

Each app creates a batch with ``submit=True`` in a request handler and learns of its end
through its completion handler, never by polling; shutting the app down stops the worker
promptly and leaves no claim and no worker row behind.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import Batch, BatchInfer, BatchStatus, OpenAIProvider
from batchinfer.errors import ClosedError
from batchinfer.integrations import (
    BATCHINFER,
    WorkerArgs,
    aiohttp_cleanup_ctx,
    lifespan,
    running_worker,
)
from batchinfer.testing import Emulator
from batchinfer.worker import Worker
from tests.helpers import chat_requests, eventually

FAST: WorkerArgs = {"poll_schedule": (0.05,), "idle_seconds": 0.05, "lease_seconds": 2}


@pytest.fixture
async def fast_emulator() -> AsyncIterator[Emulator]:
    async with Emulator(step_seconds=0.05) as emu:
        yield emu


class Ends:
    """A factory for the app's BatchInfer whose handler records each batch that ends."""

    def __init__(self, database_url: str, schema: str, emulator: Emulator) -> None:
        self.database_url, self.schema, self.emulator = database_url, schema, emulator
        self.ended: list[Batch] = []
        self.event = asyncio.Event()
        self.made: list[BatchInfer] = []

    def __call__(self) -> BatchInfer:
        provider = OpenAIProvider(api_key=self.emulator.api_key, base_url=self.emulator.base_url)
        # A URL, not the shared engine: the app's BatchInfer owns what it opens.
        bi = BatchInfer(self.database_url, providers=[provider], schema=self.schema)

        @bi.on_batch_end(name="summaries")
        async def summaries_done(batch: Batch) -> None:
            self.ended.append(batch)
            self.event.set()

        self.made.append(bi)
        return bi


async def create(bi: BatchInfer, n: int = 3) -> Batch:
    return await bi.create_batch(
        provider="openai",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        requests=chat_requests(n),
        submit=True,
        handler="summaries",
    )


async def leftovers(engine: AsyncEngine, schema: str) -> tuple[int, int]:
    """Claims still held, and rows of workers still said to be alive."""
    async with engine.connect() as conn:
        claims = await conn.scalar(
            sa.text(f'SELECT count(*) FROM "{schema}".batches WHERE claimed_by IS NOT NULL')
        )
        workers = await conn.scalar(sa.text(f'SELECT count(*) FROM "{schema}".workers'))
    return int(claims or 0), int(workers or 0)


async def test_a_fastapi_app_runs_a_worker_and_learns_of_each_end_through_its_handler(
    database_url: str, schema: str, fast_emulator: Emulator, engine: AsyncEngine
) -> None:
    ends = Ends(database_url, schema, fast_emulator)
    app = FastAPI(lifespan=lifespan(ends, **FAST))

    @app.post("/summaries", status_code=202)
    async def submit(request: Request) -> dict[str, str]:
        batch = await create(request.app.state.batchinfer)
        return {"batch_id": str(batch.id)}

    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://app") as client,
    ):
        assert ends.made == [app.state.batchinfer]  # made once, at startup
        answer = await client.post("/summaries")
        assert answer.status_code == 202
        async with asyncio.timeout(10):
            await ends.event.wait()
        assert [str(b.id) for b in ends.ended] == [answer.json()["batch_id"]]
        assert ends.ended[0].status is BatchStatus.COMPLETED
        assert ends.ended[0].results_applied_at is not None
        assert (await app.state.batchinfer.stats()).workers_alive == 1

        # Shut down with one more batch just handed to the worker: its claim must not linger.
        await client.post("/summaries")
        started = time.monotonic()
    assert time.monotonic() - started < 3
    assert await leftovers(engine, schema) == (0, 0)
    with pytest.raises(ClosedError):
        await ends.made[0].stats()


async def test_an_aiohttp_app_runs_a_worker_and_learns_of_each_end_through_its_handler(
    database_url: str, schema: str, fast_emulator: Emulator, engine: AsyncEngine
) -> None:
    ends = Ends(database_url, schema, fast_emulator)

    async def submit(request: web.Request) -> web.Response:
        batch = await create(request.app[BATCHINFER])
        return web.json_response({"batch_id": str(batch.id)}, status=202)

    app = web.Application()
    app.cleanup_ctx.append(aiohttp_cleanup_ctx(ends, **FAST))
    app.router.add_post("/summaries", submit)

    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        assert ends.made == [app[BATCHINFER]]
        answer = await client.post("/summaries")
        assert answer.status == 202
        batch_id = (await answer.json())["batch_id"]
        async with asyncio.timeout(10):
            await ends.event.wait()
        assert [str(b.id) for b in ends.ended] == [batch_id]
        await client.post("/summaries")
    finally:
        started = time.monotonic()
        await client.close()
    assert time.monotonic() - started < 3
    assert await leftovers(engine, schema) == (0, 0)


async def test_an_aiohttp_app_can_keep_it_under_a_key_of_its_own_without_a_worker(
    database_url: str, schema: str, fast_emulator: Emulator
) -> None:
    key = web.AppKey("reports", BatchInfer)
    app = web.Application()
    app.cleanup_ctx.append(
        aiohttp_cleanup_ctx(Ends(database_url, schema, fast_emulator), key=key, worker=False)
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        bi = app[key]
        assert BATCHINFER not in app
        assert (await bi.stats()).workers_alive == 0  # migrated, and no worker
    finally:
        await client.close()
    with pytest.raises(ClosedError):
        await bi.stats()


async def test_an_async_factory_and_no_migration(
    database_url: str, schema: str, fast_emulator: Emulator
) -> None:
    ends = Ends(database_url, schema, fast_emulator)

    async def make_bi() -> BatchInfer:
        bi = ends()
        await bi.migrate()  # done by the app itself, say by its deploy script
        return bi

    app = FastAPI(lifespan=lifespan(make_bi, migrate=False, worker=False))
    async with app.router.lifespan_context(app):
        assert app.state.batchinfer is ends.made[0]
        assert (await app.state.batchinfer.stats()).workers_alive == 0


def never_called() -> BatchInfer:
    raise AssertionError("the factory is called only when the app starts")


def test_worker_options_are_checked_before_the_app_starts() -> None:
    with pytest.raises(TypeError, match="worker=False"):
        lifespan(never_called, worker=False, concurrency=2)
    with pytest.raises(TypeError, match="worker=False"):
        aiohttp_cleanup_ctx(never_called, worker=False, idle_seconds=1)
    # The typed options are exactly BatchInfer.worker's keyword arguments.
    params = set(inspect.signature(BatchInfer.worker).parameters) - {"self"}
    assert set(WorkerArgs.__annotations__) == params


def test_importing_it_imports_no_web_framework() -> None:
    code = "import sys, batchinfer.integrations; print({'starlette', 'fastapi'} & set(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "set()\n"


async def test_a_factory_that_returns_something_else_fails_the_startup() -> None:
    app = FastAPI(lifespan=lifespan(lambda: object()))  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must return a BatchInfer"):
        async with app.router.lifespan_context(app):
            pass


# -- a worker that dies ---------------------------------------------------------------------


async def _die(self: Worker) -> None:
    await asyncio.sleep(0)
    raise RuntimeError("the worker broke")


async def test_a_worker_that_dies_is_logged_at_once_and_raised_at_the_end(
    bi: BatchInfer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(Worker, "run", _die)
    caplog.set_level(logging.ERROR, logger="batchinfer.integrations")

    async def app_runs() -> None:
        async with running_worker(bi, **FAST) as worker:
            for _ in range(5):
                await asyncio.sleep(0)
            # The app runs on, but the death is in the log already, not only at shutdown.
            (record,) = caplog.records
            assert record.getMessage().startswith(f"batchinfer.worker_died worker {worker.id}")
            assert "RuntimeError: the worker broke" in record.getMessage()
            assert record.exc_info is not None

    with pytest.raises(RuntimeError, match="the worker broke"):
        await app_runs()


async def test_the_block_s_own_exception_wins_over_a_dead_worker(
    bi: BatchInfer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(Worker, "run", _die)

    async def app_fails() -> None:
        async with running_worker(bi, **FAST):
            for _ in range(5):
                await asyncio.sleep(0)
            raise KeyError("the app's own")

    with pytest.raises(KeyError):
        await app_fails()
    assert [r.getMessage().split()[0] for r in caplog.records] == ["batchinfer.worker_died"]


async def test_running_worker_stops_its_worker_and_releases_everything(
    bi: BatchInfer, engine: AsyncEngine, schema: str
) -> None:
    # An emulator that never moves on: the batch stays in flight while the app runs.
    async with Emulator(step_seconds=3600) as slow:
        provider = OpenAIProvider(api_key=slow.api_key, base_url=slow.base_url)
        async with BatchInfer(engine, providers=[provider], schema=schema) as app_bi:
            batch = await create(app_bi)
            async with running_worker(app_bi, **FAST) as worker:
                assert isinstance(worker, Worker)

                async def submitted() -> Any:
                    return (await app_bi.get_batch(batch)).provider_batch_id

                await eventually(submitted)
                started = time.monotonic()
            assert time.monotonic() - started < 3
    assert await leftovers(engine, schema) == (0, 0)
    assert (await bi.get_batch(batch)).status is BatchStatus.VALIDATING
