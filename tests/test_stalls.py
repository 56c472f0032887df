"""A batch nobody can move ends a wait with the reason, wherever the failing steps run; and
results a provider promised but never delivered are given up on after a grace."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    BatchInfer,
    BatchStalledError,
    BatchStatus,
    CompletionStatus,
    OpenAIProvider,
)
from batchinfer.testing import Emulator, FakeClock
from tests.helpers import calls, chat_requests

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


async def test_wait_gives_up_on_a_batch_whose_worker_keeps_failing(
    engine: AsyncEngine, schema: str, emulator: Emulator, bi: BatchInfer
) -> None:
    """The worker runs elsewhere with a revoked key: the waiting app makes no provider call,
    is woken by each recorded failure, and ends with the worker's error."""
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(2), submit=True
    )
    await bi._store.claims.heartbeat("elsewhere", hostname="h", pid=1, seconds=120)
    waiting = asyncio.create_task(bi.wait(batch))
    clock = FakeClock()
    revoked = OpenAIProvider(api_key="sk-revoked", base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[revoked], schema=schema) as broken:
        worker = broken.worker(clock=clock, poll_schedule=(60,))
        for _ in range(3):
            assert not waiting.done()
            assert await worker.run_once() == 1
            clock.advance(61)
    with pytest.raises(BatchStalledError, match="AuthenticationError") as stalled:
        await asyncio.wait_for(waiting, 10)
    assert stalled.value.last_error is not None
    assert "invalid_api_key" in stalled.value.last_error or "401" in stalled.value.last_error
    stuck = await bi.get_batch(batch)
    assert stuck.step_failures == 3
    assert stuck.last_error is not None
    assert stuck.last_error.permanent
    assert stuck.status is BatchStatus.PENDING  # nothing was sent: still to be submitted
    assert calls(emulator, "POST", "/v1/files") == 0


async def test_a_wait_driving_the_batch_gives_up_after_its_steps_fail_in_a_row(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await bi.submit_batch(
        await bi.create_batch(
            provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(2)
        )
    )
    pbid = batch.provider_batch_id or ""
    emulator.fail_http("GET", f"/batches/{pbid}", 503, times=None)
    with pytest.raises(BatchStalledError, match="its last 2 steps failed"):
        await asyncio.wait_for(bi.wait(batch, max_step_failures=2), 30)
    # Fixed, it goes on; the step that went through ends the run of failures.
    emulator.clear_faults()
    await emulator.finish(pbid)
    done = await asyncio.wait_for(bi.wait(batch, max_step_failures=2), 30)
    assert done.step_failures == 0
    assert done.last_error is None
    assert {c.status async for c in bi.completions(done)} == {CompletionStatus.COMPLETED}


async def test_max_step_failures_none_rides_through(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await bi.submit_batch(
        await bi.create_batch(
            provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(1)
        )
    )
    pbid = batch.provider_batch_id or ""
    emulator.fail_http("GET", f"/batches/{pbid}", 503, times=4)
    await emulator.finish(pbid)
    done = await asyncio.wait_for(bi.wait(batch, max_step_failures=None), 30)
    assert done.results_applied_at is not None
    with pytest.raises(ValueError, match="at least 1"):
        await bi.wait(batch, max_step_failures=0)


async def test_wait_gives_up_on_a_promised_file_after_the_grace(
    engine: AsyncEngine, schema: str, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(
        engine, providers=[provider], schema=schema, poll_interval=0, results_grace_seconds=0.5
    ) as bi:
        await bi.migrate()
        batch = await bi.submit_batch(
            await bi.create_batch(
                provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(2)
            )
        )
        pbid = batch.provider_batch_id or ""
        emulator.delay_output_file(pbid, polls=10**6)
        await emulator.finish(pbid)
        with caplog.at_level(logging.INFO, logger="batchinfer"):
            done = await asyncio.wait_for(bi.wait(batch, poll_interval=0.1), 30)
        swept = [c async for c in bi.completions(done)]
    events = [getattr(r, "batchinfer.event", None) for r in caplog.records]
    assert "results_not_ready" in events  # said, not silent, while it waited
    assert "results_forced" in events
    assert done.results_applied_at is not None
    assert [c.status for c in swept] == [CompletionStatus.FAILED] * 2
    assert all("not present in the output or error file" in (c.failure_reason or "") for c in swept)
    with pytest.raises(ValueError, match="must not be negative"):
        BatchInfer(engine, providers=[provider], schema=schema, results_grace_seconds=-1)
