"""A FastAPI app whose batches run themselves: a worker in the app, a handler at each end.

A route creates a batch with ``submit=True`` and answers 202 at once. The worker that the
lifespan runs submits it, polls it, applies its results, then calls the ``summaries`` handler,
which records the run in the app's own table within the transaction that marks the batch
handled: exactly once, even if the process dies half-way. Serve it against OpenAI with
``uvicorn --factory examples.fastapi_app:app_from_env`` (reads BATCHINFER_DATABASE_URL,
OPENAI_API_KEY and OPENAI_BASE_URL); run this file to exercise it once against the emulator.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Unpack

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from batchinfer import Batch, BatchInfer, BatchNotFoundError, InvalidRequestError, OpenAIProvider
from batchinfer.integrations import WorkerArgs, lifespan

# The app's own table, in its default schema; in a real app its migrations create it.
SUMMARY_RUNS = """CREATE TABLE IF NOT EXISTS summary_runs (
    batch_id uuid NOT NULL, status text NOT NULL, completed int NOT NULL, failed int NOT NULL,
    cost numeric, recorded_at timestamptz NOT NULL DEFAULT now())"""
RUNS = sa.text("SELECT status, completed, failed FROM summary_runs WHERE batch_id = :id")


async def summaries_done(batch: Batch, conn: AsyncConnection) -> None:
    """Run by a worker once the batch has ended and its results are applied."""
    counts = batch.request_counts
    await conn.execute(
        sa.text(
            "INSERT INTO summary_runs (batch_id, status, completed, failed, cost) "
            "VALUES (:id, :status, :completed, :failed, :cost)"
        ),
        {"id": batch.id, "status": batch.status.value, "completed": counts.completed,
         "failed": counts.failed, "cost": batch.total_cost},
    )  # fmt: skip


def register_handlers(bi: BatchInfer) -> None:
    """In every process that runs workers: the app's, and any
    ``batchinfer worker --handlers examples.fastapi_app:register_handlers``."""
    bi.on_batch_end(summaries_done, name="summaries")


def asyncpg_engine(url: str) -> AsyncEngine:
    return create_async_engine(sa.make_url(url).set(drivername="postgresql+asyncpg"))


def create_app(
    database_url: str,
    *,
    api_key: str,
    base_url: str,
    schema: str = "batchinfer",
    **worker: Unpack[WorkerArgs],
) -> FastAPI:
    # The app's own engine, borrowed by BatchInfer; the handler writes with its connection.
    engine = asyncpg_engine(database_url)

    def make_bi() -> BatchInfer:
        provider = OpenAIProvider(api_key=api_key, base_url=base_url)
        bi = BatchInfer(engine, providers=[provider], schema=schema)
        register_handlers(bi)
        return bi

    batchinfer = lifespan(make_bi, **worker)

    @asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text(SUMMARY_RUNS))
            async with batchinfer(app):  # sets app.state.batchinfer, runs the worker
                yield
        finally:
            await engine.dispose()

    app = FastAPI(lifespan=app_lifespan)

    @app.post("/summaries", status_code=202)
    async def submit(texts: list[str], request: Request) -> dict[str, str]:
        bi: BatchInfer = request.app.state.batchinfer
        try:
            batch = await bi.create_batch(
                provider="openai",
                endpoint="/v1/chat/completions",
                model="gpt-4o-mini",
                requests=[
                    {
                        "custom_id": f"text-{i}",
                        "body": {"messages": [{"role": "user", "content": f"Summarise: {t}"}]},
                    }
                    for i, t in enumerate(texts)
                ],
                submit=True,  # no provider call here: the worker submits it
                handler="summaries",
            )
        except InvalidRequestError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"batch_id": str(batch.id)}

    @app.get("/summaries/{batch_id}")
    async def status(batch_id: uuid.UUID, request: Request) -> dict[str, Any]:
        bi: BatchInfer = request.app.state.batchinfer
        try:
            batch = await bi.get_batch(batch_id)
        except BatchNotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
        async with engine.connect() as conn:
            runs = [dict(row) for row in (await conn.execute(RUNS, {"id": batch_id})).mappings()]
        body: dict[str, Any] = {"status": batch.status.value, "runs": runs}
        if runs:  # the handler has run: the results are in
            body["summaries"] = [c.output_text async for c in bi.completions(batch)]
        return body

    return app


def app_from_env() -> FastAPI:
    return create_app(
        os.environ["BATCHINFER_DATABASE_URL"],
        api_key=os.environ["OPENAI_API_KEY"],
        base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
    )


async def _exercise(database_url: str) -> None:
    import httpx

    from batchinfer.testing import Emulator

    schema = f"example_{uuid.uuid4().hex[:8]}"  # this run's own, dropped at the end
    async with Emulator(step_seconds=0.1) as emulator:
        app = create_app(
            database_url, api_key=emulator.api_key, base_url=emulator.base_url, schema=schema,
            poll_schedule=(0.1,), idle_seconds=0.1,
        )  # fmt: skip
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://app") as client,
        ):
            answer = await client.post("/summaries", json=["tides", "comets", "bees"])
            assert answer.status_code == 202, answer.text
            batch_id = answer.json()["batch_id"]
            for _ in range(300):  # until the handler has recorded the run
                body = (await client.get(f"/summaries/{batch_id}")).json()
                if body["runs"]:
                    break
                await asyncio.sleep(0.1)
            print(body)
            assert body["runs"] == [{"status": "completed", "completed": 3, "failed": 0}], body
            assert len(body["summaries"]) == 3, body
            assert (await client.post("/summaries", json=[])).status_code == 422
    engine = asyncpg_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        await conn.execute(
            sa.text("DELETE FROM summary_runs WHERE batch_id = :id"), {"id": batch_id}
        )
    await engine.dispose()


if __name__ == "__main__":
    from batchinfer.testing.postgres import database_or_embedded

    with database_or_embedded(os.environ.get("BATCHINFER_DATABASE_URL")) as url:
        asyncio.run(_exercise(url))
