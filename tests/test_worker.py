"""Workers in one process, on real Postgres and the emulator, with a fake clock for schedules."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchinfer import (
    Batch,
    BatchInfer,
    BatchStatus,
    ClosedError,
    CompletionStatus,
    InvalidBatchError,
    OpenAIProvider,
    SchemaNotReadyError,
)
from batchinfer.testing import Emulator, FakeClock
from tests.helpers import chat_requests, eventually

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


def calls(emulator: Emulator, method: str, path: str) -> int:
    return sum(1 for m, p in emulator.requests if m == method and p.startswith(path))


async def create(bi: BatchInfer, n: int = 3, **kwargs: object) -> Batch:
    return await bi.create_batch(
        provider="openai",
        endpoint=CHAT,
        model=MODEL,
        requests=chat_requests(n),
        submit=True,
        **kwargs,  # type: ignore[arg-type]
    )


async def claims_held(engine: AsyncEngine, schema: str) -> int:
    async with engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    sa.text(f'SELECT count(*) FROM "{schema}".batches WHERE claimed_by IS NOT NULL')
                )
            ).scalar_one()
        )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def second_bi(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> AsyncIterator[BatchInfer]:
    """Another process's BatchInfer on the same database, as far as claims go."""
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema, poll_interval=0) as other:
        yield other


async def test_submit_true_makes_no_provider_call_and_a_worker_submits(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock
) -> None:
    batch = await create(bi)
    assert batch.status is BatchStatus.PENDING
    assert batch.submit_requested_at is not None
    assert emulator.requests == []

    worker = bi.worker(clock=clock)
    assert await worker.run_once() == 1
    batch = await bi.get_batch(batch)
    assert batch.provider_batch_id is not None
    assert batch.status is BatchStatus.VALIDATING
    assert batch.next_poll_at == clock() + timedelta(seconds=60)
    assert calls(emulator, "POST", "/v1/batches") == 1
    # Not due again until the first poll time.
    assert await worker.run_once() == 0


async def test_polls_follow_the_backoff_schedule_then_results_and_handlers(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock
) -> None:
    ended: list[Batch] = []

    @bi.on_batch_end
    async def record(batch: Batch) -> None:
        ended.append(batch)

    batch = await create(bi)
    worker = bi.worker(poll_schedule=(10, 20, 40), clock=clock)
    await worker.run_once()
    batch = await bi.get_batch(batch)
    pbid = batch.provider_batch_id or ""
    waits = []
    for _ in range(4):
        due = await bi.get_batch(batch)
        assert due.next_poll_at is not None
        waits.append((due.next_poll_at - clock()).total_seconds())
        clock.advance(waits[-1] - 1)
        assert await worker.run_once() == 0  # a second early: nothing to do
        clock.advance(1)
        assert await worker.run_once() == 1
    assert waits == [10, 20, 40, 40]
    assert calls(emulator, "GET", f"/v1/batches/{pbid}") == 4
    assert ended == []

    await emulator.finish(pbid)
    clock.advance(40)
    assert await worker.run_once() == 1
    done = await bi.get_batch(batch)
    assert done.status is BatchStatus.COMPLETED
    assert done.results_applied_at is not None
    assert done.handler_dispatched_at is not None
    assert [b.id for b in ended] == [batch.id]
    assert ended[0].results_applied_at is not None  # handlers run after results, never before
    assert {c.status async for c in bi.completions(done)} == {CompletionStatus.COMPLETED}

    clock.advance(3600)
    assert await worker.run_once() == 0  # nothing runs twice
    assert len(ended) == 1


async def test_a_failing_handler_is_retried_with_backoff_and_its_writes_roll_back(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock, engine: AsyncEngine, schema: str
) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'CREATE TABLE "{schema}".app_log (batch_id uuid, n int)'))
    attempts = 0
    order: list[str] = []

    @bi.on_batch_end(name="summaries")
    async def summaries(batch: Batch, conn: AsyncConnection) -> None:
        nonlocal attempts
        attempts += 1
        order.append("summaries")
        await conn.execute(
            sa.text(f'INSERT INTO "{schema}".app_log VALUES (:b, :n)'),
            {"b": batch.id, "n": attempts},
        )
        if attempts < 3:
            raise RuntimeError(f"flaky #{attempts}")

    @bi.on_batch_end
    async def every_batch(batch: Batch) -> None:
        order.append("every")

    batch = await create(bi, handler="summaries")
    worker = bi.worker(clock=clock)
    await worker.run_once()
    await emulator.finish((await bi.get_batch(batch)).provider_batch_id or "")
    clock.advance(60)
    await worker.run_once()
    failed = await bi.get_batch(batch)
    assert failed.results_applied_at is not None
    assert failed.handler_dispatched_at is None
    assert failed.handler_attempts == 1
    assert "RuntimeError: flaky #1" in (failed.handler_error or "")
    assert failed.handler_next_at == clock() + timedelta(seconds=1)

    assert await worker.run_once() == 0  # backing off
    clock.advance(1)
    await worker.run_once()
    second = await bi.get_batch(batch)
    assert second.handler_attempts == 2
    assert second.handler_next_at == clock() + timedelta(seconds=2)
    clock.advance(2)
    await worker.run_once()
    done = await bi.get_batch(batch)
    assert done.handler_dispatched_at is not None
    assert done.handler_attempts == 2
    assert done.handlers_done == ("name:summaries", f"fn:{__name__}.{every_batch.__qualname__}")
    assert order == ["summaries", "summaries", "summaries", "every"]
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.text(f'SELECT n FROM "{schema}".app_log'))).scalars().all()
    assert rows == [3]  # the failed attempts' writes rolled back with them


async def test_a_handler_that_keeps_failing_is_given_up(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    runs = 0

    @bi.on_batch_end
    async def broken(batch: Batch) -> None:
        nonlocal runs
        runs += 1
        raise ValueError("no")

    batch = await create(bi)
    worker = bi.worker(clock=clock, handler_attempts=3)
    await worker.run_once()
    await emulator.finish((await bi.get_batch(batch)).provider_batch_id or "")
    clock.advance(60)
    caplog.set_level(logging.INFO, logger="batchinfer")
    for _ in range(6):
        await worker.run_once()
        clock.advance(120)
    gave_up = await bi.get_batch(batch)
    assert runs == 3
    assert gave_up.handler_attempts == 3
    assert gave_up.handler_gave_up_at is not None
    assert gave_up.handler_dispatched_at is None
    assert "ValueError: no" in (gave_up.handler_error or "")
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("batchinfer.handler_failed") for m in messages) == 2
    assert sum(m.startswith("batchinfer.handler_gave_up") for m in messages) == 1
    assert any(str(batch.id) in m and "attempt=3" in m for m in messages)


async def test_a_batch_naming_an_unknown_handler_waits_for_a_worker_that_knows_it(
    bi: BatchInfer,
    second_bi: BatchInfer,
    emulator: Emulator,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    batch = await create(bi, handler="reports")
    worker = bi.worker(clock=clock)
    await worker.run_once()
    await emulator.finish((await bi.get_batch(batch)).provider_batch_id or "")
    clock.advance(60)
    caplog.set_level(logging.WARNING, logger="batchinfer")
    await worker.run_once()
    for _ in range(3):
        clock.advance(60)
        assert await worker.run_once() == 0
    waiting = await bi.get_batch(batch)
    assert waiting.results_applied_at is not None
    assert waiting.handler_dispatched_at is None
    unknown = [r for r in caplog.records if r.getMessage().startswith("batchinfer.handler_unknown")]
    assert len(unknown) == 1  # logged once, not every cycle
    assert "reports" in unknown[0].getMessage()

    ran: list[Batch] = []

    @second_bi.on_batch_end(name="reports")
    async def reports(batch: Batch) -> None:
        ran.append(batch)

    assert await second_bi.worker(clock=clock).run_once() == 1
    assert [b.id for b in ran] == [batch.id]
    assert (await bi.get_batch(batch)).handler_dispatched_at is not None


async def test_a_stuck_batch_is_expired_after_its_maximum_age(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock
) -> None:
    handled: list[Batch] = []
    bi.on_batch_end(recorder(handled))
    batch = await create(bi, 4)
    worker = bi.worker(clock=clock, max_age_seconds=3600, poll_schedule=(600,))
    await worker.run_once()
    pbid = (await bi.get_batch(batch)).provider_batch_id or ""
    await emulator.advance(pbid)  # in_progress
    await emulator.process(pbid, 2)  # two results exist, two never will
    emulator.fail_http("POST", f"/batches/{pbid}/cancel", 500, times=10)
    clock.advance(3601)
    assert await worker.run_once() == 1
    expired = await bi.get_batch(batch)
    assert expired.status is BatchStatus.EXPIRED
    assert "expired by batchinfer" in (expired.failure_reason or "")
    assert expired.results_applied_at is not None
    assert expired.handler_dispatched_at is not None
    assert [b.id for b in handled] == [batch.id]
    completions = [c async for c in bi.completions(expired)]
    assert {c.status for c in completions} == {CompletionStatus.FAILED}
    assert all("expired by batchinfer" in (c.failure_reason or "") for c in completions)
    assert calls(emulator, "POST", f"/v1/batches/{pbid}/cancel") >= 1


async def test_an_expired_batch_keeps_what_the_provider_finished(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock
) -> None:
    batch = await create(bi, 4)
    worker = bi.worker(clock=clock, max_age_seconds=3600, poll_schedule=(600,))
    await worker.run_once()
    pbid = (await bi.get_batch(batch)).provider_batch_id or ""
    await emulator.advance(pbid)
    await emulator.process(pbid, 2)
    clock.advance(3601)
    await worker.run_once()  # cancel accepted: the provider says cancelling
    for _ in range(3):
        await emulator.advance(pbid)
        clock.advance(600)
        await worker.run_once()
    done = await bi.get_batch(batch)
    assert done.results_applied_at is not None
    statuses = [c.status async for c in bi.completions(done)]
    assert statuses.count(CompletionStatus.COMPLETED) == 2  # paid for, so kept
    assert statuses.count(CompletionStatus.FAILED) == 2


async def test_one_bad_batch_does_not_hold_up_the_others(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock
) -> None:
    good, bad = await create(bi), await create(bi)
    worker = bi.worker(clock=clock, poll_schedule=(30,))
    assert await worker.run_once() == 2
    bad_pbid = (await bi.get_batch(bad)).provider_batch_id or ""
    for b in (good, bad):
        await emulator.finish((await bi.get_batch(b)).provider_batch_id or "")
    emulator.fail_http("GET", f"/batches/{bad_pbid}", 400, times=100)
    clock.advance(30)
    assert await worker.run_once() == 2
    assert (await bi.get_batch(good)).results_applied_at is not None
    stuck = await bi.get_batch(bad)
    assert stuck.results_applied_at is None
    assert stuck.next_poll_at == clock() + timedelta(seconds=30)  # looked at again later
    assert await claims_held(bi._store.db.raw_engine, bi.schema) == 0


async def test_cancelling_a_worker_mid_apply_leaves_nothing_half_done(
    engine: AsyncEngine, schema: str, emulator: Emulator, clock: FakeClock
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema, apply_chunk_size=25) as bi:
        await bi.migrate()
        batch = await create(bi, 2_000)
        worker = bi.worker(clock=clock, idle_seconds=0.05, shutdown_seconds=2)
        await worker.run_once()
        await emulator.finish((await bi.get_batch(batch)).provider_batch_id or "")
        clock.advance(60)
        run = asyncio.create_task(worker.run())
        async with asyncio.timeout(20):
            while True:
                summary = await bi.summary(batch)
                if summary["by_status"].get("completed", 0) > 0:
                    break
                await asyncio.sleep(0.005)
        run.cancel()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert loop.time() - started < 3
        assert await claims_held(engine, schema) == 0
        partial = await bi.get_batch(batch)
        by_status = (await bi.summary(batch))["by_status"]
        if partial.results_applied_at is None:
            # Whole chunks only: every write that started, finished.
            assert by_status.get("completed", 0) % 25 == 0

        assert await bi.worker(clock=clock).run_once() == 1
        done = await bi.get_batch(batch)
        assert done.results_applied_at is not None
        assert (await bi.summary(done))["by_status"] == {"completed": 2_000}
        costs = [c.total_cost async for c in bi.completions(done)]
        assert done.total_cost == sum(c for c in costs if c is not None)


async def test_wait_is_woken_by_a_worker_and_makes_no_provider_calls(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with (
        Emulator() as elsewhere,
        BatchInfer(engine, providers=[provider], schema=schema) as driver,
    ):
        await driver.migrate()
        # The waiting app's provider points at another server: any call would show there.
        waiting_provider = OpenAIProvider(api_key=elsewhere.api_key, base_url=elsewhere.base_url)
        async with BatchInfer(
            engine, providers=[waiting_provider], schema=schema, poll_interval=30
        ) as app:
            batch = await create(app, 5)
            worker = driver.worker(poll_schedule=(0.05,), idle_seconds=0.05)
            run = asyncio.create_task(worker.run())
            try:

                async def alive() -> int:
                    return (await app.stats()).workers_alive

                await eventually(alive)
                waits = [asyncio.create_task(app.wait(batch)) for _ in range(20)]
                async with asyncio.timeout(10):
                    while True:
                        current = await app.get_batch(batch)
                        if current.provider_batch_id:
                            await emulator.finish(current.provider_batch_id)
                            break
                        await asyncio.sleep(0.01)
                    async with engine.connect() as conn:
                        listening = (
                            await conn.execute(
                                sa.text(
                                    "SELECT count(*) FROM pg_stat_activity "
                                    "WHERE query LIKE :q AND pid <> pg_backend_pid()"
                                ),
                                {"q": f'LISTEN "batchinfer_{schema}"%'},
                            )
                        ).scalar_one()
                    done = await asyncio.gather(*waits)
            finally:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
    assert {d.results_applied_at is not None for d in done} == {True}
    assert elsewhere.requests == []  # woken by Postgres, not by polling a provider
    assert listening == 2  # one per BatchInfer (the app's 20 waits share one), not 20


async def test_wait_with_no_worker_alive_submits_and_drives_the_batch_itself(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await create(bi)

    async def advance(current: Batch) -> None:
        if current.provider_batch_id:
            await emulator.advance(current.provider_batch_id)

    done = await bi.wait(batch, on_poll=advance)
    assert done.status is BatchStatus.COMPLETED
    assert done.results_applied_at is not None
    assert calls(emulator, "POST", "/v1/batches") == 1


async def test_wait_refuses_a_batch_nobody_will_submit(bi: BatchInfer) -> None:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(1)
    )
    with pytest.raises(InvalidBatchError, match="submit_batch"):
        await bi.wait(batch)


async def test_a_submit_claim_left_by_a_dead_caller_lapses_within_seconds(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str
) -> None:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(2)
    )
    async with engine.begin() as conn:  # as a submitter killed mid-upload leaves it
        await conn.execute(
            sa.text(
                f'UPDATE "{schema}".batches SET claimed_by = :o, '
                "claimed_until = now() + interval '30 seconds' WHERE id = :b"
            ),
            {"o": "submit:dead", "b": batch.id},
        )
    with pytest.raises(InvalidBatchError, match="lapses within 30 s"):
        await bi.submit_batch(batch)
    async with engine.begin() as conn:  # ... its 30 seconds pass
        await conn.execute(
            sa.text(
                f"UPDATE \"{schema}\".batches SET claimed_until = now() - interval '1 second' "
                "WHERE id = :b"
            ),
            {"b": batch.id},
        )
    submitted = await bi.submit_batch(batch)
    assert submitted.provider_batch_id is not None
    assert await claims_held(engine, schema) == 0


async def test_workers_never_claim_the_same_batch(
    bi: BatchInfer, second_bi: BatchInfer, emulator: Emulator, clock: FakeClock
) -> None:
    batches = [await create(bi, 1) for _ in range(6)]
    one = bi.worker(clock=clock, concurrency=3)
    two = second_bi.worker(clock=clock, concurrency=3)
    counts = await asyncio.gather(one.run_once(), two.run_once())
    assert sum(counts) == 6
    assert calls(emulator, "POST", "/v1/batches") == 6
    for b in batches:
        assert (await bi.get_batch(b)).provider_batch_id is not None


async def test_stats_for_metrics(bi: BatchInfer, clock: FakeClock) -> None:
    await create(bi)
    stats = await bi.stats()
    assert stats.batches_by_status == {"pending": 1}
    assert stats.oldest_in_flight_seconds is None
    assert stats.workers_alive == 0
    await bi.worker(clock=clock).run_once()
    stats = await bi.stats()
    assert stats.batches_by_status == {"validating": 1}
    assert stats.oldest_in_flight_seconds is not None
    assert 0 <= stats.oldest_in_flight_seconds < 60


async def test_nothing_works_after_close(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    bi = BatchInfer(engine, providers=[provider], schema=schema)
    await bi.migrate()
    worker = bi.worker()
    await bi.aclose()
    await bi.aclose()  # idempotent
    with pytest.raises(ClosedError, match="closed"):
        await bi.list_batches()
    with pytest.raises(ClosedError):
        await worker.run_once()
    with pytest.raises(ClosedError):
        bi.worker()
    with pytest.raises(ClosedError, match="provider was closed"):
        await provider.retrieve_batch("batch_1")
    async with engine.connect() as conn:  # a borrowed engine stays usable
        assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1


def test_handlers_must_take_a_batch_and_maybe_a_connection(bi: BatchInfer) -> None:
    async def none() -> None: ...

    async def three(a: Batch, b: AsyncConnection, c: int) -> None: ...

    with pytest.raises(TypeError, match="must take"):
        bi.on_batch_end(none)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must take"):
        bi.on_batch_end(three)  # type: ignore[arg-type]

    async def one(batch: Batch) -> None: ...

    async def other(batch: Batch) -> None: ...

    bi.on_batch_end(one, name="x")
    with pytest.raises(ValueError, match="already registered"):
        bi.on_batch_end(other, name="x")


def test_worker_options_are_checked(bi: BatchInfer) -> None:
    for bad in (
        {"poll_schedule": ()},
        {"poll_schedule": (0,)},
        {"lease_seconds": 0},
        {"concurrency": 0},
        {"handler_attempts": 0},
        {"max_age_seconds": -1},
    ):
        with pytest.raises(ValueError, match="must"):
            bi.worker(**bad)  # type: ignore[arg-type]


def recorder(into: list[Batch]) -> Callable[[Batch], Awaitable[None]]:
    async def record(batch: Batch) -> None:
        into.append(batch)

    return record


# The killed connections' sockets are reported when collected, at no moment a test controls.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_worker_rides_through_its_connections_being_killed(
    database_url: str, engine: AsyncEngine, schema: str
) -> None:
    async with Emulator(step_seconds=0.05) as emulator:
        provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
        async with BatchInfer(database_url, providers=[provider], schema=schema) as bi:
            await bi.migrate()
            handled: list[Batch] = []
            bi.on_batch_end(recorder(handled))
            batch = await create(bi, 5)
            run = asyncio.create_task(
                bi.worker(poll_schedule=(0.05,), idle_seconds=0.05, lease_seconds=2).run()
            )
            try:

                async def submitted() -> bool:
                    return (await bi.get_batch(batch)).provider_batch_id is not None

                await eventually(submitted)
                async with engine.connect() as conn:  # as a database restart does
                    killed = (
                        await conn.execute(
                            sa.text(
                                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                                "AND query LIKE :mine"
                            ),
                            {"mine": f"%{schema}%"},
                        )
                    ).scalar_one()
                assert killed >= 1

                async def dispatched() -> bool:
                    return (await bi.get_batch(batch)).handler_dispatched_at is not None

                await eventually(dispatched, seconds=20)
                assert not run.done()
            finally:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
    assert [b.id for b in handled] == [batch.id]


async def test_a_worker_on_a_database_without_the_tables_says_to_migrate(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema) as bi:
        with pytest.raises(SchemaNotReadyError, match=r"migrate\(\)"):
            await bi.worker(idle_seconds=0.05).run()
        with pytest.raises(SchemaNotReadyError, match=r"migrate\(\)"):
            await bi.worker().run_once()


async def test_wait_rides_through_the_provider_not_yet_seeing_a_new_batch(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.early_not_found(0.3)
    batch = await create(bi)

    async def advance(current: Batch) -> None:
        if current.provider_batch_id:
            await emulator.advance(current.provider_batch_id)

    async with asyncio.timeout(20):
        done = await bi.wait(batch, on_poll=advance)
    assert done.results_applied_at is not None


async def test_a_batch_that_ended_while_nobody_looked_keeps_its_results_however_old(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock
) -> None:
    batch = await create(bi, 4)
    worker = bi.worker(clock=clock, max_age_seconds=3600)
    await worker.run_once()
    await emulator.finish((await bi.get_batch(batch)).provider_batch_id or "")
    clock.advance(27 * 3600)  # no worker ran for a day
    await worker.run_once()
    done = await bi.get_batch(batch)
    assert done.status is BatchStatus.COMPLETED
    assert {c.status async for c in bi.completions(done)} == {CompletionStatus.COMPLETED}


async def test_files_that_never_come_are_given_up_on_an_hour_after_the_end(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock
) -> None:
    batch = await create(bi, 3)
    worker = bi.worker(clock=clock, poll_schedule=(60,))
    await worker.run_once()
    pbid = (await bi.get_batch(batch)).provider_batch_id or ""
    emulator.delay_output_file(pbid, polls=10**6)
    await emulator.finish(pbid)
    clock.advance(60)
    await worker.run_once()
    waiting = await bi.get_batch(batch)
    assert waiting.status is BatchStatus.COMPLETED
    assert waiting.results_applied_at is None  # the counts promise a file: wait for it
    assert waiting.ended_at is not None
    clock.advance((waiting.ended_at - clock()).total_seconds() + 3601)
    await worker.run_once()
    done = await bi.get_batch(batch)
    assert done.results_applied_at is not None
    assert {c.status async for c in bi.completions(done)} == {CompletionStatus.FAILED}


def test_unnamed_handlers_need_a_stable_name_of_their_own(bi: BatchInfer) -> None:
    with pytest.raises(TypeError, match="no stable name"):
        bi.on_batch_end(lambda batch: recorder([])(batch))
    bi.on_batch_end(recorder([]))
    with pytest.raises(ValueError, match="already registered"):
        bi.on_batch_end(recorder([]))  # another function from the same factory


async def test_wait_reports_what_it_cannot_fix_instead_of_looping(
    engine: AsyncEngine, schema: str, emulator: Emulator, bi: BatchInfer
) -> None:
    batch = await create(bi)  # on "openai"
    other = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url, name="other")
    async with BatchInfer(engine, providers=[other], schema=schema) as elsewhere:
        with pytest.raises(InvalidBatchError, match="no provider named 'openai'"):
            await asyncio.wait_for(elsewhere.wait(batch), 10)


async def test_a_queued_batch_is_cancelled_before_anyone_pays_for_it(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock
) -> None:
    batch = await create(bi, 3)
    assert await bi.cancel_batch(batch) is BatchStatus.CANCELLED
    assert await bi.worker(clock=clock).run_once() == 1  # its handlers, not a submit
    done = await bi.wait(batch)
    assert done.results_applied_at is not None
    assert done.handler_dispatched_at is not None
    assert emulator.requests == []
    failed = [c async for c in bi.completions(done)]
    assert {c.status for c in failed} == {CompletionStatus.FAILED}
    assert all("cancelled before it was submitted" in (c.failure_reason or "") for c in failed)


async def test_a_submit_the_provider_refuses_ends_the_batch_failed(
    bi: BatchInfer, emulator: Emulator, clock: FakeClock
) -> None:
    handled: list[Batch] = []
    bi.on_batch_end(recorder(handled))
    emulator.fail_http(
        "POST",
        "/batches",
        400,
        times=None,
        body={"error": {"message": "Model not available for batch.", "code": "invalid_model"}},
    )
    batch = await create(bi, 2)
    worker = bi.worker(clock=clock)
    await worker.run_once()
    failed = await bi.get_batch(batch)
    assert failed.status is BatchStatus.FAILED
    assert "Model not available for batch." in (failed.failure_reason or "")
    assert failed.results_applied_at is not None
    await worker.run_once()
    assert [b.id for b in handled] == [batch.id]
    assert calls(emulator, "POST", "/v1/batches") == 1  # not tried again and again


async def test_work_stops_when_its_claims_could_not_be_renewed_for_most_of_a_lease() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from batchinfer.lifecycle import Leases
    from batchinfer.storage.claims import Claims
    from batchinfer.storage.database import Database

    unreachable = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    leases = Leases(Claims(Database(unreachable)), owner="w", seconds=1.0)
    work = asyncio.create_task(asyncio.sleep(30))
    batch_id = uuid.uuid4()
    leases.work[batch_id] = work
    try:
        await leases.renew_once()  # a third of the lease gone: keep going
        assert not work.done()
        await asyncio.sleep(0.6)
        await leases.renew_once()  # most of it gone: others may take it over now
        await asyncio.wait([work], timeout=5)
        assert work.cancelled()
        assert leases.lost == {batch_id}
    finally:
        work.cancel()
        await unreachable.dispose()
