"""An aiohttp app whose batches run themselves: a worker in the app, a handler at each end.

The same shape as ``fastapi_app.py``: a route creates a batch with ``submit=True`` and answers
202 at once; the worker that ``aiohttp_cleanup_ctx`` runs drives it to its end, then calls the
``reports`` handler, which records the run in the app's own table in the transaction that
marks the batch handled. Serve it with ``python -m aiohttp.web -P 8080
examples.aiohttp_app:app_from_env`` (reads BATCHINFER_DATABASE_URL, OPENAI_API_KEY and
OPENAI_BASE_URL); run this file to exercise it once against the emulator.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Unpack

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from batchinfer import Batch, BatchInfer, BatchNotFoundError, InvalidRequestError, OpenAIProvider
from batchinfer.integrations import BATCHINFER, WorkerArgs, aiohttp_cleanup_ctx

# The app's own table, in its default schema; in a real app its migrations create it.
REPORT_RUNS = """CREATE TABLE IF NOT EXISTS report_runs (
    batch_id uuid NOT NULL, status text NOT NULL, completed int NOT NULL, failed int NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now())"""
RUNS = sa.text("SELECT status, completed, failed FROM report_runs WHERE batch_id = :id")


async def reports_done(batch: Batch, conn: AsyncConnection) -> None:
    """Run by a worker once the batch has ended and its results are applied."""
    counts = batch.request_counts
    await conn.execute(
        sa.text(
            "INSERT INTO report_runs (batch_id, status, completed, failed) "
            "VALUES (:id, :status, :completed, :failed)"
        ),
        {"id": batch.id, "status": batch.status.value, "completed": counts.completed,
         "failed": counts.failed},
    )  # fmt: skip


def asyncpg_engine(url: str) -> AsyncEngine:
    return create_async_engine(sa.make_url(url).set(drivername="postgresql+asyncpg"))


def create_app(
    database_url: str,
    *,
    api_key: str,
    base_url: str,
    schema: str = "batchinfer",
    **worker: Unpack[WorkerArgs],
) -> web.Application:
    # The app's own engine, borrowed by BatchInfer; the handler writes with its connection.
    engine = asyncpg_engine(database_url)

    async def app_tables(app: web.Application) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.execute(sa.text(REPORT_RUNS))
        yield
        await engine.dispose()  # after batchinfer's context: cleanups run in reverse

    def make_bi() -> BatchInfer:
        provider = OpenAIProvider(api_key=api_key, base_url=base_url)
        bi = BatchInfer(engine, providers=[provider], schema=schema)
        bi.on_batch_end(reports_done, name="reports")  # in every process that runs workers
        return bi

    async def submit(request: web.Request) -> web.Response:
        texts = await request.json()
        try:
            batch = await request.app[BATCHINFER].create_batch(
                provider="openai",
                endpoint="/v1/chat/completions",
                model="gpt-4o-mini",
                requests=[
                    {
                        "custom_id": f"text-{i}",
                        "body": {"messages": [{"role": "user", "content": t}]},
                    }
                    for i, t in enumerate(texts)
                ],
                submit=True,  # no provider call here: the worker submits it
                handler="reports",
            )
        except InvalidRequestError as exc:
            raise web.HTTPUnprocessableEntity(text=str(exc)) from exc
        return web.json_response({"batch_id": str(batch.id)}, status=202)

    async def status(request: web.Request) -> web.Response:
        bi = request.app[BATCHINFER]
        try:
            batch = await bi.get_batch(request.match_info["batch_id"])
        except (BatchNotFoundError, InvalidRequestError) as exc:
            raise web.HTTPNotFound(text=str(exc)) from exc
        async with engine.connect() as conn:
            runs = [dict(row) for row in (await conn.execute(RUNS, {"id": batch.id})).mappings()]
        return web.json_response({"status": batch.status.value, "runs": runs})

    app = web.Application()
    app.cleanup_ctx.extend([app_tables, aiohttp_cleanup_ctx(make_bi, **worker)])
    app.router.add_post("/reports", submit)
    app.router.add_get("/reports/{batch_id}", status)
    return app


def app_from_env(argv: list[str] | None = None) -> web.Application:
    return create_app(
        os.environ["BATCHINFER_DATABASE_URL"],
        api_key=os.environ["OPENAI_API_KEY"],
        base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
    )


async def _exercise(database_url: str) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from batchinfer.testing import Emulator

    schema = f"example_{uuid.uuid4().hex[:8]}"  # this run's own, dropped at the end
    async with Emulator(step_seconds=0.1) as emulator:
        app = create_app(
            database_url, api_key=emulator.api_key, base_url=emulator.base_url, schema=schema,
            poll_schedule=(0.1,), idle_seconds=0.1,
        )  # fmt: skip
        async with TestClient(TestServer(app)) as client:
            answer = await client.post("/reports", json=["tides", "comets", "bees"])
            assert answer.status == 202, await answer.text()
            batch_id = (await answer.json())["batch_id"]
            for _ in range(300):  # until the handler has recorded the run
                body = await (await client.get(f"/reports/{batch_id}")).json()
                if body["runs"]:
                    break
                await asyncio.sleep(0.1)
            print(body)
            assert body["runs"] == [{"status": "completed", "completed": 3, "failed": 0}], body
            assert (await client.post("/reports", json=[])).status == 422
    engine = asyncpg_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        await conn.execute(
            sa.text("DELETE FROM report_runs WHERE batch_id = :id"), {"id": batch_id}
        )
    await engine.dispose()


if __name__ == "__main__":
    from batchinfer.testing.postgres import database_or_embedded

    with database_or_embedded(os.environ.get("BATCHINFER_DATABASE_URL")) as url:
        asyncio.run(_exercise(url))
