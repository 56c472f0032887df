"""A FastAPI app that submits batches and collects them in the background.

One BatchInfer for the app's lifetime (lifespan), routes that create and inspect batches, and a
background task that waits for each batch and applies its results. Serve it against OpenAI with
``uvicorn --factory examples.fastapi_app:app_from_env`` (reads BATCHINFER_DATABASE_URL and
OPENAI_API_KEY); run this file directly to exercise it once end to end against the emulator.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException

from batchinfer import BatchInfer, BatchNotFoundError, InvalidRequestError, OpenAIProvider


def create_app(database_url: str, *, api_key: str, base_url: str) -> FastAPI:
    tasks: set[asyncio.Task[Any]] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        provider = OpenAIProvider(api_key=api_key, base_url=base_url)
        async with BatchInfer(database_url, providers=[provider], poll_interval=0.2) as bi:
            await bi.migrate()
            app.state.bi = bi
            yield
            for task in tasks:
                task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.post("/summaries", status_code=202)
    async def submit(texts: list[str]) -> dict[str, Any]:
        bi: BatchInfer = app.state.bi
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
            )
        except InvalidRequestError as exc:
            raise HTTPException(422, str(exc)) from exc
        batch = await bi.submit_batch(batch)
        task = asyncio.create_task(bi.wait(batch), name=f"wait-{batch.id}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return {"batch_id": str(batch.id), "status": batch.status.value}

    @app.get("/summaries/{batch_id}")
    async def status(batch_id: uuid.UUID) -> dict[str, Any]:
        bi: BatchInfer = app.state.bi
        try:
            batch = await bi.get_batch(batch_id)
        except BatchNotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
        body: dict[str, Any] = {"status": batch.status.value, "cost": str(batch.total_cost)}
        if batch.results_applied_at is not None:
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

    async with Emulator(step_seconds=0.1) as emulator:
        app = create_app(database_url, api_key=emulator.api_key, base_url=emulator.base_url)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                answer = await client.post("/summaries", json=["tides", "comets", "bees"])
                answer.raise_for_status()
                batch_id = answer.json()["batch_id"]
                for _ in range(100):
                    body = (await client.get(f"/summaries/{batch_id}")).json()
                    if "summaries" in body:
                        break
                    await asyncio.sleep(0.1)
                print(body)
                assert body["status"] == "completed", body
                assert (await client.post("/summaries", json=[])).status_code == 422


if __name__ == "__main__":
    from batchinfer.testing.postgres import database_or_embedded

    with database_or_embedded(os.environ.get("BATCHINFER_DATABASE_URL")) as url:
        asyncio.run(_exercise(url))
