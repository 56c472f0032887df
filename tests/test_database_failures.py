"""The database fails too: connections killed mid-apply, statement timeouts, and workers and
waits whose connections are cut from under them.

Restarting the Postgres server is not possible safely here: other tests (and other people's test
runs) share it. Killing backends with ``pg_terminate_backend`` is what a restart does to each
client connection (the server closes it with ``57P01 admin_shutdown``), so it stands in for a
restart. Only backends whose last statement names this test's own schema are ever killed, and
never those of the observer engine the tests use to look and to kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from batchinfer import (
    Batch,
    BatchInfer,
    BatchStatus,
    Completion,
    CompletionStatus,
    OpenAIProvider,
    StorageError,
    TransientStorageError,
)
from batchinfer.client import _asyncpg_url
from batchinfer.storage.results import ResultStore
from batchinfer.testing import Emulator
from tests.helpers import chat_requests, eventually

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
#: The observer's connections carry this name, so no kill ever takes them.

# Connections are killed under the driver on purpose; the sockets it then drops are reported
# when collected, at a moment no test controls. Those reports are not what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

OBSERVER = "batchinfer_test_observer"


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
async def observer(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine of our own to look at rows and kill backends with (never killed itself)."""
    eng = create_async_engine(
        _asyncpg_url(database_url),
        poolclass=NullPool,
        connect_args={"server_settings": {"application_name": OBSERVER}},
    )
    yield eng
    await eng.dispose()


def make_bi(database: str | AsyncEngine, schema: str, emulator: Emulator, **kw: Any) -> BatchInfer:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    return BatchInfer(database, providers=[provider], schema=schema, **kw)


async def finished(bi: BatchInfer, emulator: Emulator, n: int) -> Batch:
    """A submitted batch of ``n`` chat requests that the emulator has completed."""
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(n)
    )
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    return await bi.get_batch(batch)


def file_records(emulator: Emulator, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(x) for x in emulator.file_content(file_id).splitlines() if x.strip()]


async def completions(bi: BatchInfer, batch: Batch) -> dict[str, Completion]:
    return {c.custom_id: c async for c in bi.completions(batch)}


#: A result chunk's statement, by its head (the server keeps only its first 1 KB).
_APPLYING = "%completions AS c SET status = v.status%"
_MINE = """
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND application_name <> :observer AND query LIKE :mine
"""


async def kill(
    observer: AsyncEngine, schema: str, *, applying: bool = False, busy: bool = False
) -> int:
    """Terminate this schema's backends (``applying``: those whose statement is a result chunk;
    ``busy``: only those in a statement or a transaction, not idle in the pool)."""
    where = _MINE
    if applying:
        where += f" AND query LIKE '{_APPLYING}'"
    if busy:
        where += " AND state <> 'idle'"
    async with observer.connect() as conn:
        return int(
            (
                await conn.execute(
                    sa.text(f"SELECT count(pg_terminate_backend(pid)) {where}"),
                    {"observer": OBSERVER, "mine": f"%{schema}%"},
                )
            ).scalar_one()
        )


async def blocked_appliers(observer: AsyncEngine, schema: str) -> int:
    """How many of this schema's result chunks wait on a row lock."""
    async with observer.connect() as conn:
        return int(
            (
                await conn.execute(
                    sa.text(
                        f"SELECT count(*) {_MINE} AND query LIKE '{_APPLYING}' "
                        "AND state = 'active' AND wait_event_type = 'Lock'"
                    ),
                    {"observer": OBSERVER, "mine": f"%{schema}%"},
                )
            ).scalar_one()
        )


async def lock_rows(
    conn: AsyncConnection, schema: str, batch: Batch, custom_ids: list[str]
) -> None:
    """Hold these completions' row locks in ``conn``'s open transaction."""
    locked = (
        await conn.execute(
            sa.text(
                f"SELECT custom_id FROM {schema}.completions "
                "WHERE batch_id = :b AND custom_id = ANY(:ids) FOR UPDATE"
            ),
            {"b": batch.id, "ids": custom_ids},
        )
    ).all()
    assert len(locked) == len(custom_ids)


async def kill_until_done(
    task: asyncio.Task[Any], killer: Callable[[], Awaitable[int]], *, every: float
) -> int:
    """Run ``killer`` every ``every`` seconds while ``task`` runs; how many it killed."""
    killed = 0
    while not task.done():
        killed += await killer()
        await asyncio.sleep(every)
    return killed


def assert_whole(c: Completion, expected: dict[str, dict[str, Any]]) -> None:
    """A completion is untouched or fully written: never half of each."""
    result_fields = (
        c.response_body,
        c.output_text,
        c.tool_calls,
        c.finish_reason,
        c.status_code,
        c.provider_request_id,
        c.prompt_tokens,
        c.completion_tokens,
        c.total_tokens,
        c.cached_tokens,
        c.reasoning_tokens,
        c.input_cost,
        c.output_cost,
        c.total_cost,
        c.failure_error,
        c.failure_reason,
        c.completed_at,
    )
    if c.status is CompletionStatus.SUBMITTED:
        assert result_fields == (None,) * len(result_fields), c.custom_id
        return
    line = expected[c.custom_id]
    response = line["response"]
    assert c.completed_at is not None, c.custom_id
    assert c.provider_request_id == response["request_id"], c.custom_id
    if response["status_code"] == 200:
        body = response["body"]
        usage = body["usage"]
        assert c.status is CompletionStatus.COMPLETED, c.custom_id
        assert c.response_body == body, c.custom_id
        assert c.output_text == body["choices"][0]["message"]["content"], c.custom_id
        assert c.status_code == 200
        assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
            usage["total_tokens"],
        ), c.custom_id
        assert c.input_cost is not None, c.custom_id
        assert c.output_cost is not None, c.custom_id
        assert c.total_cost == c.input_cost + c.output_cost, c.custom_id
        assert c.total_cost > 0, c.custom_id
        assert (c.failure_error, c.failure_reason) == (None, None), c.custom_id
    else:
        assert c.status is CompletionStatus.FAILED, c.custom_id
        assert c.status_code == response["status_code"], c.custom_id
        assert c.failure_reason == response["body"]["error"]["message"], c.custom_id
        assert c.response_body is None, c.custom_id
        assert c.total_cost is None, c.custom_id


async def assert_finished_exactly(
    bi: BatchInfer, emulator: Emulator, batch: Batch, *, dropped: set[str]
) -> None:
    """Every completion terminal and matching its line, counts as in the files, costs summed."""
    done = await bi.get_batch(batch)
    assert done.results_applied_at is not None
    output = {r["custom_id"]: r for r in file_records(emulator, done.output_file_id)}
    errors = {r["custom_id"]: r for r in file_records(emulator, done.error_file_id)}
    comps = await completions(bi, done)
    assert len(comps) == done.request_total
    by_status = dict.fromkeys(CompletionStatus, 0)
    for cid, c in comps.items():
        by_status[c.status] += 1
        if cid in dropped:
            assert c.status is CompletionStatus.FAILED, cid
            assert "not present in the output or error file" in (c.failure_reason or ""), cid
        else:
            assert c.status.is_terminal, cid
            assert_whole(c, output | errors)
    assert by_status[CompletionStatus.COMPLETED] == len(output)
    assert by_status[CompletionStatus.FAILED] == len(errors) + len(dropped)
    assert by_status[CompletionStatus.SUBMITTED] == by_status[CompletionStatus.PENDING] == 0
    costs = [c.total_cost for c in comps.values() if c.total_cost is not None]
    assert done.total_cost == sum(costs, Decimal(0))
    assert done.input_cost == sum((c.input_cost or Decimal(0) for c in comps.values()), Decimal(0))
    assert done.output_cost == sum(
        (c.output_cost or Decimal(0) for c in comps.values()), Decimal(0)
    )


async def assert_nothing_half_written(
    bi: BatchInfer, emulator: Emulator, batch: Batch
) -> tuple[int, int]:
    """After a failed pass: each row untouched or whole, the batch not finished; returns how
    many rows were (applied, untouched)."""
    half = await bi.get_batch(batch)
    assert half.results_applied_at is None
    assert (half.input_cost, half.output_cost, half.total_cost) == (None, None, None)
    lines = {
        r["custom_id"]: r
        for file_id in (half.output_file_id, half.error_file_id)
        for r in file_records(emulator, file_id)
    }
    comps = await completions(bi, batch)
    for c in comps.values():
        assert_whole(c, lines)
    untouched = sum(c.status is CompletionStatus.SUBMITTED for c in comps.values())
    return len(comps) - untouched, untouched


def script_failures(emulator: Emulator, n: int) -> set[str]:
    """Some requests fail, some are dropped; returns the dropped custom_ids."""
    for i in range(3, n, 97):
        emulator.fail_request(f"q{i}", status=400, message=f"bad request {i}")
    dropped = {f"q{i}" for i in range(11, n, 401)}
    for cid in dropped:
        emulator.drop_request(cid)
    return dropped


# -- a connection killed in the middle of applying results ------------------------------------


async def test_killed_while_chunks_wait_on_locks_fails_whole_then_reruns(
    database_url: str, schema: str, emulator: Emulator, observer: AsyncEngine
) -> None:
    """Both writers are stopped mid-file (each waits on a row lock, deterministically) and their
    backends are killed together, as a server restart does."""
    n = 3_000
    dropped = script_failures(emulator, n)
    async with make_bi(database_url, schema, emulator, apply_chunk_size=25, apply_writers=2) as bi:
        await bi.migrate()
        batch = await finished(bi, emulator, n)
        order = [r["custom_id"] for r in file_records(emulator, batch.output_file_id)]
        # One row a third of the way in, one two thirds in: each writer ends up blocked.
        hostages = [order[len(order) // 3], order[2 * len(order) // 3]]
        async with observer.connect() as locker:
            await locker.begin()
            await lock_rows(locker, schema, batch, hostages)
            fetch = asyncio.create_task(bi.fetch_batch_results(batch))

            async def both_blocked() -> bool:
                return await blocked_appliers(observer, schema) == 2

            await eventually(both_blocked, seconds=20)
            killed = 0

            async def all_killed() -> bool:
                # Again until none is left waiting: a loaded machine may report late.
                nonlocal killed
                killed += await kill(observer, schema, applying=True, busy=True)
                return await blocked_appliers(observer, schema) == 0

            await eventually(all_killed, seconds=20)
            await locker.rollback()
        assert killed >= 2

        with pytest.raises(StorageError) as info:
            await fetch
        assert isinstance(info.value, TransientStorageError), repr(info.value)

        applied, untouched = await assert_nothing_half_written(bi, emulator, batch)
        assert applied > 0
        assert untouched >= 2  # at least the two hostages' chunks

        again = await bi.fetch_batch_results(batch)
        assert again.results_applied_at is not None
        report = bi.last_apply_report
        assert report is not None
        assert report.applied + report.already_applied == n - len(dropped)
        assert report.already_applied == applied
        assert report.swept == len(dropped)
        await assert_finished_exactly(bi, emulator, batch, dropped=dropped)


@pytest.mark.parametrize("writers", [1, 3])
async def test_killed_at_random_while_applying_fails_whole_then_reruns(
    database_url: str, schema: str, emulator: Emulator, observer: AsyncEngine, writers: int
) -> None:
    """No locks: a killer looks every few milliseconds for backends in the middle of a result
    chunk and terminates them, wherever the pass has got to."""
    n = 3_000
    dropped = script_failures(emulator, n)
    async with make_bi(
        database_url, schema, emulator, apply_chunk_size=10, apply_writers=writers
    ) as bi:
        await bi.migrate()
        batch = await finished(bi, emulator, n)
        fetch = asyncio.create_task(bi.fetch_batch_results(batch))
        killed = await kill_until_done(
            fetch, lambda: kill(observer, schema, applying=True, busy=True), every=0.005
        )
        assert killed >= 1, "the pass ended before any of its statements could be killed"

        with pytest.raises(StorageError) as info:
            await fetch
        assert isinstance(info.value, TransientStorageError), repr(info.value)
        applied, untouched = await assert_nothing_half_written(bi, emulator, batch)
        assert untouched > 0

        await bi.fetch_batch_results(batch)
        report = bi.last_apply_report
        assert report is not None
        assert report.applied + report.already_applied == n - len(dropped)
        # A write that committed just before its backend died is counted in the second pass.
        assert report.already_applied >= applied
        assert report.swept == len(dropped)
        await assert_finished_exactly(bi, emulator, batch, dropped=dropped)


async def test_two_writers_killed_at_the_same_instant_raise_one_storage_error(
    database_url: str,
    schema: str,
    emulator: Emulator,
    observer: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The test above, with its timing luck taken out: both writers' backends are killed
    (for real) and their two StorageErrors reach the writer tasks in the same loop iteration,
    as they do now and then when a restart cuts every connection at once. The pass must still
    raise one StorageError, not an ExceptionGroup of two."""
    n = 600
    real_apply = ResultStore.apply_rows
    failed: list[BaseException] = []
    both_failed = asyncio.Event()

    async def aligned(self: ResultStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return await real_apply(self, *args, **kwargs)
        except StorageError as exc:
            failed.append(exc)
            if len(failed) == 2:
                both_failed.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(both_failed.wait(), 5)
            raise

    async with make_bi(database_url, schema, emulator, apply_chunk_size=25, apply_writers=2) as bi:
        await bi.migrate()
        batch = await finished(bi, emulator, n)
        order = [r["custom_id"] for r in file_records(emulator, batch.output_file_id)]
        monkeypatch.setattr(ResultStore, "apply_rows", aligned)
        async with observer.connect() as locker:
            await locker.begin()
            await lock_rows(locker, schema, batch, [order[n // 3], order[2 * n // 3]])
            fetch = asyncio.create_task(bi.fetch_batch_results(batch))

            async def both_blocked() -> bool:
                return await blocked_appliers(observer, schema) == 2

            await eventually(both_blocked, seconds=20)
            assert await kill(observer, schema, applying=True, busy=True) == 2
            await locker.rollback()
        outcome = await asyncio.gather(fetch, return_exceptions=True)
        assert len(failed) == 2
        assert isinstance(outcome[0], TransientStorageError), repr(outcome[0])

        monkeypatch.undo()
        await assert_nothing_half_written(bi, emulator, batch)
        await bi.fetch_batch_results(batch)
        await assert_finished_exactly(bi, emulator, batch, dropped=set())


async def test_wait_rides_through_two_writers_failing_at_once(
    database_url: str,
    schema: str,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the ExceptionGroup above does to wait(): its first results pass loses both writers'
    connections at the same instant (simulated: the database is fine, the failures are what a
    restart raises); wait() retries transient database errors, so it must return."""
    real_apply = ResultStore.apply_rows
    calls = 0
    both_failed = asyncio.Event()

    async def restart_hits_both(self: ResultStore, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 2:
            return await real_apply(self, *args, **kwargs)
        if calls == 2:
            both_failed.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(both_failed.wait(), 5)
        raise TransientStorageError(
            "applying results: AdminShutdownError: terminating connection due to "
            "administrator command"
        )

    async with make_bi(
        database_url,
        schema,
        emulator,
        poll_interval=0.01,
        apply_chunk_size=5,
        apply_writers=2,
    ) as bi:
        await bi.migrate()
        batch = await finished(bi, emulator, 40)
        monkeypatch.setattr(ResultStore, "apply_rows", restart_hits_both)
        async with asyncio.timeout(30):
            done = await bi.wait(batch)
        assert calls > 2
        assert done.results_applied_at is not None
        await assert_finished_exactly(bi, emulator, batch, dropped=set())


# -- a statement timeout ----------------------------------------------------------------------


async def test_statement_timeout_fails_whole_then_a_normal_engine_finishes(
    database_url: str, schema: str, emulator: Emulator, observer: AsyncEngine
) -> None:
    n = 2_000
    dropped = script_failures(emulator, n)
    async with make_bi(database_url, schema, emulator) as setup:
        await setup.migrate()
        batch = await finished(setup, emulator, n)
    order = [r["custom_id"] for r in file_records(emulator, batch.output_file_id)]

    # Timeouts set per session, on engines of their own (a role or database setting would
    # reach other sessions sharing the server).
    def timing_out_after(ms: int) -> AsyncEngine:
        return create_async_engine(
            _asyncpg_url(database_url),
            connect_args={"server_settings": {"statement_timeout": str(ms)}},
        )

    # Chunks of 50 take a few ms; the one half-way in waits on a row lock past 300 ms.
    impatient = timing_out_after(300)
    try:
        async with make_bi(impatient, schema, emulator, apply_chunk_size=50, apply_writers=1) as bi:
            async with observer.connect() as locker:
                await locker.begin()
                await lock_rows(locker, schema, batch, [order[len(order) // 2]])
                with pytest.raises(StorageError) as info:
                    await bi.fetch_batch_results(batch)
                await locker.rollback()
            assert "statement timeout" in str(info.value), str(info.value)
            assert isinstance(info.value, TransientStorageError), repr(info.value)
    finally:
        await impatient.dispose()
    async with make_bi(database_url, schema, emulator) as look:
        applied, untouched = await assert_nothing_half_written(look, emulator, batch)
    assert applied > 0
    assert untouched > 0

    # The whole file in one statement, with no lock in its way: far longer than 5 ms.
    hasty = timing_out_after(5)
    try:
        async with make_bi(hasty, schema, emulator, apply_chunk_size=n, apply_writers=1) as bi:
            with pytest.raises(StorageError, match="statement timeout"):
                await bi.fetch_batch_results(batch)
    finally:
        await hasty.dispose()
    async with make_bi(database_url, schema, emulator) as look:
        assert await assert_nothing_half_written(look, emulator, batch) == (applied, untouched)

    async with make_bi(database_url, schema, emulator) as bi:
        await bi.fetch_batch_results(batch)
        report = bi.last_apply_report
        assert report is not None
        assert report.already_applied == applied
        assert report.applied == untouched - len(dropped)
        await assert_finished_exactly(bi, emulator, batch, dropped=dropped)


# -- a worker and wait() ride through ---------------------------------------------------------


async def test_worker_rides_through_connections_killed_repeatedly(
    database_url: str, schema: str, observer: AsyncEngine
) -> None:
    async with Emulator(step_seconds=0.05) as emulator:
        dropped = script_failures(emulator, 300)
        async with make_bi(
            database_url, schema, emulator, apply_chunk_size=20, apply_writers=2
        ) as bi:
            await bi.migrate()
            handled: list[uuid.UUID] = []

            @bi.on_batch_end
            async def done(batch: Batch) -> None:
                handled.append(batch.id)

            batches = [
                await bi.create_batch(
                    provider="openai",
                    endpoint=CHAT,
                    model=MODEL,
                    requests=chat_requests(300),
                    submit=True,
                )
                for _ in range(3)
            ]
            run = asyncio.create_task(
                bi.worker(poll_schedule=(0.05,), idle_seconds=0.05, lease_seconds=2).run()
            )
            try:
                # Every ~100 ms for a second: each kill is what a restart does to a client.
                killed = 0
                for _ in range(10):
                    await asyncio.sleep(0.1)
                    killed += await kill(observer, schema)
                assert killed >= 5

                async def all_done() -> bool:
                    now = [await bi.get_batch(b) for b in batches]
                    return all(
                        b.results_applied_at is not None and b.handler_dispatched_at is not None
                        for b in now
                    )

                await eventually(all_done, seconds=30)
                assert not run.done(), run
            finally:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)

            creates = [p for m, p in emulator.requests if m == "POST" and p == "/v1/batches"]
            assert len(creates) == len(batches), emulator.requests
            pbids = {(await bi.get_batch(b)).provider_batch_id for b in batches}
            assert len(pbids) == len(batches)
            assert set(handled) == {b.id for b in batches}
            for b in batches:
                await assert_finished_exactly(bi, emulator, b, dropped=dropped)


async def test_wait_rides_through_connection_resets_while_it_drives_the_batch(
    database_url: str, schema: str, observer: AsyncEngine
) -> None:
    async with Emulator(step_seconds=0.15) as emulator:
        dropped = script_failures(emulator, 500)
        async with make_bi(
            database_url, schema, emulator, poll_interval=0.02, apply_chunk_size=10
        ) as bi:
            await bi.migrate()
            batch = await bi.create_batch(
                provider="openai",
                endpoint=CHAT,
                model=MODEL,
                requests=chat_requests(500),
                submit=True,
            )
            polls: list[BatchStatus] = []
            waiting = asyncio.create_task(bi.wait(batch, on_poll=lambda b: polls.append(b.status)))
            # Resets every 50 ms for 1.5 s (submission, polls and the apply all fall in it),
            # then the database is left alone: the wait must get there without raising.
            killed = 0
            for _ in range(30):
                if waiting.done():
                    break
                killed += await kill(observer, schema)
                await asyncio.sleep(0.05)
            async with asyncio.timeout(30):
                done = await waiting  # never raises
            assert killed >= 3
            assert done.results_applied_at is not None
            assert done.status is BatchStatus.COMPLETED
            assert polls  # it drove the batch itself: no worker was alive
            assert (await bi.stats()).workers_alive == 0
            creates = [p for m, p in emulator.requests if m == "POST" and p == "/v1/batches"]
            assert len(creates) == 1
            await assert_finished_exactly(bi, emulator, batch, dropped=dropped)
