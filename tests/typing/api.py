"""Checked by mypy --strict, never run: the public API as an application would use it."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy.ext.asyncio import create_async_engine

from batchinfer import (
    Batch,
    BatchInfer,
    BatchStatus,
    Completion,
    InvalidRequestError,
    OpenAIProvider,
    Price,
    TransientProviderError,
)


async def nightly(texts: list[str]) -> list[tuple[str, str | None, Decimal | None]]:
    engine = create_async_engine("postgresql+asyncpg://app@db/app")
    provider = OpenAIProvider(api_key="sk-...", batch_discount="0.5")
    prices = {"my-model": Price(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("2"))}
    async with BatchInfer(engine, providers=[provider], prices=prices) as bi:
        await bi.migrate()
        try:
            batch: Batch = await bi.create_batch(
                provider="openai",
                endpoint="/v1/chat/completions",
                model="gpt-4o-mini",
                requests=[
                    {"custom_id": f"t{i}", "body": {"messages": [{"role": "user", "content": t}]}}
                    for i, t in enumerate(texts)
                ],
                metadata={"purpose": "nightly"},
            )
        except InvalidRequestError as exc:
            raise SystemExit(str(exc)) from exc
        batch = await bi.submit_batch(batch)
        status: BatchStatus = await bi.fetch_batch_status(batch.id)
        if status.is_terminal:
            batch = await bi.fetch_batch_results(str(batch.id))
        try:
            batch = await bi.wait(batch, poll_interval=60)
        except TransientProviderError:
            batch = await bi.get_batch(batch)
        out = []
        async for completion in bi.completions(batch, status="completed"):
            c: Completion = completion
            out.append((c.custom_id, c.output_text, c.total_cost))
        live: Completion = await bi.complete(
            provider="openai", endpoint="/v1/responses", model="gpt-4o-mini", body={"input": "hi"}
        )
        out.append((live.custom_id, live.output_text, live.total_cost))
        return out
