"""Processes: workers and submitters in child processes, killed or stopped with real signals.

The children (``tests/procs/*.py``, run with ``sys.executable``) share this test's Postgres
schema and its emulator, which runs on this process's event loop: every wait here is an async
poll (every 50 ms, up to a deadline) so the emulator keeps answering. Each child logs to a file
of its own, printed when a test fails; every child is killed when its test ends. Figures are
printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import batchinfer
from batchinfer import (
    AnthropicProvider,
    BatchInfer,
    InvalidBatchError,
    OpenAIProvider,
    ProviderRejectedError,
)
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
ROOT = Path(batchinfer.__file__).resolve().parents[1]
PROCS = Path(__file__).resolve().parent / "procs"
TAG = "batchinfer_batch_id"
TX_KEY = "name:tx"
PLAIN_KEY = "fn:__main__.main.<locals>.plain"

T = TypeVar("T")


# -- children -----------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def _append_fd(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


class Children:
    """Starts the child processes of one test; kills and reaps them all on the way out, and
    prints their logs if the test failed."""

    def __init__(self, tmp_path: Path, database_url: str, schema: str, emulator: Emulator) -> None:
        self.dir = tmp_path
        self.common = [
            "--database", database_url, "--schema", schema,
            "--base-url", emulator.base_url, "--api-key", emulator.api_key,
        ]  # fmt: skip
        self.children: list[Child] = []

    async def start(self, script: str, *args: str) -> Child:
        name = f"{Path(script).stem}-{len(self.children) + 1}"
        log = self.dir / f"{name}.log"
        fd = _append_fd(log)  # tracebacks and anything else on stdout/stderr
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(PROCS / script),
                *self.common,
                "--log",
                str(log),
                *args,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
            )
        finally:
            os.close(fd)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    async def worker(self, *args: str, lease: float = 2.0, concurrency: int = 2) -> Child:
        return await self.start(
            "worker_proc.py", "--lease", str(lease), "--concurrency", str(concurrency), *args
        )

    async def kill(self, child: Child) -> None:
        if child.proc.returncode is None:
            child.proc.kill()
        await asyncio.wait_for(child.proc.wait(), 10)

    def check_alive(self, *children: Child) -> None:
        for child in children or tuple(self.children):
            if child.proc.returncode is not None:
                raise AssertionError(f"{child.name} exited with {child.proc.returncode}")

    async def __aenter__(self) -> Children:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for child in self.children:
            if child.proc.returncode is None:
                child.proc.kill()
        for child in self.children:
            await child.proc.wait()
        if exc is not None:
            for child in self.children:
                text = child.log.read_text() if child.log.exists() else "(no log)"
                print(f"\n----- {child.name} (pid {child.pid}) -----\n{text[-6000:]}")


async def until(
    check: Callable[[], Awaitable[T]],
    what: str,
    seconds: float,
    *,
    guard: Callable[[], None] | None = None,
) -> T:
    """Poll ``check`` every 50 ms until it returns something truthy (returned), at most
    ``seconds``; ``guard`` (say, children still alive) is checked on every round."""
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value:
            return value
        if guard is not None:
            guard()
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds} s: {what}")
        await asyncio.sleep(0.05)


def sync(check: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    """A plain check, for :func:`until`."""

    async def checked() -> T:
        return check()

    return checked


def pid_of(worker_id: str) -> int:
    """Worker ids are ``host:pid:xxxxxxxx``."""
    return int(worker_id.rsplit(":", 2)[1])


# -- the database and the emulator ----------------------------------------------------------


class Db:
    """Plain SQL on the test's schema, outside of batchinfer."""

    def __init__(self, engine: AsyncEngine, schema: str) -> None:
        self.engine = engine
        self.schema = schema

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.engine.connect() as conn:
            result = await conn.execute(sa.text(sql.format(s=f'"{self.schema}"')), params)
            return list(result.all())

    async def value(self, sql: str, **params: Any) -> Any:
        rows = await self.rows(sql, **params)
        return rows[0][0] if rows else None

    async def batch(self, batch_id: uuid.UUID) -> Any:
        (row,) = await self.rows("SELECT * FROM {s}.batches WHERE id = :id", id=batch_id)
        return row

    async def handler_runs(self) -> list[tuple[uuid.UUID, int]]:
        rows = await self.rows("SELECT batch_id, pid FROM {s}.handler_runs ORDER BY at")
        return [(r.batch_id, r.pid) for r in rows]

    async def has_worker(self, pid: int) -> bool:
        return bool(await self.value("SELECT count(*) FROM {s}.workers WHERE pid = :p", p=pid))


@asynccontextmanager
async def client(engine: AsyncEngine, schema: str, emulator: Emulator) -> AsyncIterator[BatchInfer]:
    """This process's BatchInfer, on a migrated schema with a handler_runs table for the
    children's transactional handler."""
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema, claim_seconds=2) as bi:
        await bi.migrate()
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    f'CREATE TABLE "{schema}".handler_runs (batch_id uuid NOT NULL, '
                    "pid integer NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
                )
            )
        yield bi


def tag_of(pb: dict[str, object]) -> object:
    """The batchinfer batch id a provider batch is tagged with."""
    metadata = pb.get("metadata")
    return metadata.get(TAG) if isinstance(metadata, dict) else None


def provider_batches_for(emulator: Emulator, batch_id: uuid.UUID) -> list[dict[str, object]]:
    return [pb for pb in emulator.batches.values() if tag_of(pb) == str(batch_id)]


def posts(emulator: Emulator, path: str) -> int:
    return sum(1 for method, p in emulator.requests if method == "POST" and p == path)


def input_uploads(emulator: Emulator) -> Counter[str]:
    """Input files uploaded, by the prefix of their custom_ids (``b3-`` for batch 3)."""
    uploads: Counter[str] = Counter()
    for content in emulator.files.values():
        first = orjson.loads(content.split(b"\n", 1)[0]) if content.strip() else None
        if isinstance(first, dict) and "body" in first and "method" in first:
            uploads[str(first["custom_id"]).split("-", 1)[0]] += 1
    return uploads


# -- several workers, one killed ----------------------------------------------------------------


async def test_three_workers_one_killed_part_way_run_every_batch_once(
    tmp_path: Path, database_url: str, engine: AsyncEngine, schema: str
) -> None:
    plain = tmp_path / "plain.txt"
    plain.touch()
    db = Db(engine, schema)
    async with (
        Emulator(step_seconds=0.05) as emulator,
        client(engine, schema, emulator) as bi,
        Children(tmp_path, database_url, schema, emulator) as kids,
    ):
        ids = [
            (
                await bi.create_batch(
                    provider="openai",
                    endpoint=CHAT,
                    model=MODEL,
                    requests=chat_requests(5, prefix=f"b{i}-"),
                    metadata={"n": i},
                    submit=True,
                    handler="tx",
                )
            ).id
            for i in range(12)
        ]
        index = {batch_id: i for i, batch_id in enumerate(ids)}
        workers = [
            await kids.worker("--plain-file", str(plain), lease=2, concurrency=2) for _ in range(3)
        ]
        by_pid = {w.pid: w for w in workers}
        started = time.monotonic()

        async def frozen_holder() -> tuple[Child, list[uuid.UUID]] | None:
            # Once a few batches are submitted, a worker of ours holding a live claim, stopped
            # (SIGSTOP) so that what it holds cannot change before it is killed.
            submitted = await db.value(
                "SELECT count(*) FROM {s}.batches WHERE provider_batch_id IS NOT NULL"
            )
            if submitted < 3:
                return None
            claims = await db.rows(
                "SELECT DISTINCT claimed_by FROM {s}.batches "
                "WHERE claimed_by IS NOT NULL AND claimed_until > now()"
            )
            for (owner,) in claims:
                child = by_pid.get(pid_of(owner))
                if child is None:
                    continue
                child.proc.send_signal(signal.SIGSTOP)
                held = await db.rows(
                    "SELECT id FROM {s}.batches WHERE claimed_by = :w AND claimed_until > now()",
                    w=owner,
                )
                if held:
                    return child, [r.id for r in held]
                child.proc.send_signal(signal.SIGCONT)
            return None

        found = await until(frozen_holder, "a worker holding a claim", 20, guard=kids.check_alive)
        assert found is not None
        victim, held = found
        await kids.kill(victim)
        killed_at = time.monotonic()
        state = await db.rows(
            "SELECT count(*) FILTER (WHERE provider_batch_id IS NOT NULL) AS submitted, "
            "count(*) FILTER (WHERE handler_dispatched_at IS NOT NULL) AS dispatched "
            "FROM {s}.batches"
        )
        print(
            f"\nkilled {victim.name} {killed_at - started:.2f}s after the workers started, "
            f"holding {len(held)} claim(s) ({', '.join(f'b{index[b]}' for b in held)}); "
            f"{state[0].submitted} submitted, {state[0].dispatched} dispatched then"
        )
        survivors = [w for w in workers if w is not victim]

        async def all_dispatched() -> bool:
            left = await db.value(
                "SELECT count(*) FROM {s}.batches WHERE handler_dispatched_at IS NULL"
            )
            return int(left) == 0

        await until(
            all_dispatched,
            "every batch dispatched",
            30,
            guard=lambda: kids.check_alive(*survivors),
        )
        print(f"all 12 batches dispatched {time.monotonic() - killed_at:.2f}s after the kill")

        rows = await db.rows("SELECT * FROM {s}.batches")
        assert {r.status for r in rows} == {"completed"}
        assert all(r.results_applied_at is not None for r in rows)

        # One provider batch per batch: a submit cut short was re-attached, not paid twice.
        tags = Counter(tag_of(pb) for pb in emulator.batches.values())
        assert tags == Counter({str(batch_id): 1 for batch_id in ids})
        # A create the killed worker had sent is found and re-attached, not sent again (one more
        # is possible only if it died sending it).
        assert 12 <= posts(emulator, "/v1/batches") <= 12 + len(held)
        for r in rows:
            (pb,) = provider_batches_for(emulator, r.id)
            assert r.provider_batch_id == pb["id"]
            assert r.input_file_id == pb["input_file_id"]
        # An input file is uploaded again only if a worker died uploading it (and the files
        # are gone from the provider: deleted once the results were applied).
        again = {"all": posts(emulator, "/v1/files") - 12}
        assert 0 <= again["all"] <= len(held), again
        assert input_uploads(emulator) == Counter()

        # Every completion ended; each batch's costs are the sums of its completions'.
        costs = await db.rows(
            "SELECT b.id, b.input_cost, b.output_cost, b.total_cost, count(c.id) AS n, "
            "count(*) FILTER (WHERE c.status NOT IN ('completed', 'failed')) AS open, "
            "sum(c.input_cost) AS c_in, sum(c.output_cost) AS c_out, "
            "sum(c.total_cost) AS c_total "
            "FROM {s}.batches b JOIN {s}.completions c ON c.batch_id = b.id GROUP BY b.id"
        )
        assert len(costs) == 12
        for c in costs:
            assert (c.n, c.open) == (5, 0)
            assert c.total_cost is not None
            assert c.total_cost > Decimal(0)
            assert (c.input_cost, c.output_cost, c.total_cost) == (c.c_in, c.c_out, c.c_total)

        # The transactional handler ran exactly once per batch, whoever died.
        runs = await db.handler_runs()
        assert Counter(b for b, _ in runs) == Counter(set(ids))
        assert all(r.handlers_done == [TX_KEY, PLAIN_KEY] for r in rows)
        # The plain one ran at least once per batch (twice only if a worker died after it).
        lines = Counter(line.split()[0] for line in plain.read_text().splitlines())
        assert set(lines) == {str(b) for b in ids}
        twice = sum(n - 1 for n in lines.values())
        print(
            f"held batches finished by pids {[p for b, p in runs if b in held]}; "
            f"handler runs by pid: {dict(Counter(p for _, p in runs))}; plain handler repeats: "
            f"{twice}; uploads repeated: {sum(again.values())}; "
            f"POST /v1/files {posts(emulator, '/v1/files')}, "
            f"POST /v1/batches {posts(emulator, '/v1/batches')}"
        )


# -- a transactional handler killed mid-way ----------------------------------------------------


async def ended_batch(bi: BatchInfer, emulator: Emulator, *, handler: str | None) -> uuid.UUID:
    """A batch whose results are applied here, so a worker's next step is its handlers."""
    batch = await bi.create_batch(
        provider="openai",
        endpoint=CHAT,
        model=MODEL,
        requests=chat_requests(3),
        handler=handler,
    )
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    await bi.fetch_batch_status(batch)
    batch = await bi.fetch_batch_results(batch)
    assert batch.results_applied_at is not None
    assert batch.handler_dispatched_at is None
    return batch.id


async def test_a_worker_killed_inside_a_transactional_handler_leaves_no_trace_and_it_runs_once(
    tmp_path: Path, database_url: str, engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    db = Db(engine, schema)
    inside = tmp_path / "inside"
    async with (
        client(engine, schema, emulator) as bi,
        Children(tmp_path, database_url, schema, emulator) as kids,
    ):
        batch_id = await ended_batch(bi, emulator, handler="tx")
        first = await kids.worker("--tx-sleep", "60", "--inside-file", str(inside), lease=1)
        await until(sync(inside.exists), "the handler to be inside", 15, guard=kids.check_alive)

        # Inside: its row is written but not committed.
        assert await db.handler_runs() == []
        await kids.kill(first)
        killed_at = time.monotonic()
        lease_left = await db.value(
            "SELECT extract(epoch FROM claimed_until - now()) FROM {s}.batches WHERE id = :id",
            id=batch_id,
        )
        row = await db.batch(batch_id)
        assert await db.handler_runs() == []  # rolled back with the process
        assert row.handlers_done == []
        assert row.handler_dispatched_at is None
        assert row.handler_attempts == 0
        assert pid_of(row.claimed_by) == first.pid

        second = await kids.worker(lease=1)
        await until(
            lambda: db.has_worker(second.pid),
            "the second worker to start",
            15,
            guard=lambda: kids.check_alive(second),
        )
        ready = time.monotonic() - killed_at

        async def dispatched() -> bool:
            return (await db.batch(batch_id)).handler_dispatched_at is not None

        await until(
            dispatched, "the batch to be dispatched", 15, guard=lambda: kids.check_alive(second)
        )
        took = time.monotonic() - killed_at
        row = await db.batch(batch_id)
        assert await db.handler_runs() == [(batch_id, second.pid)]
        assert row.handlers_done == [TX_KEY]
        assert row.handler_attempts == 0
        assert row.handler_error is None
        left = float(lease_left or 0)
        print(
            f"\nthe claim had {left:.2f}s left at the kill (lease 1s); the second worker was "
            f"working {ready:.2f}s after the kill and took over, ran the handler and recorded "
            f"it {took:.2f}s after the kill ({took - ready:.2f}s after it started)"
        )
        assert took - ready < max(left, 0) + 2


# -- a submit killed part-way ------------------------------------------------------------------


@pytest.mark.parametrize("created", [False, True], ids=["before-create", "after-create"])
async def test_a_killed_submit_blocks_a_retry_only_for_its_claim_and_pays_once(
    created: bool,
    tmp_path: Path,
    database_url: str,
    engine: AsyncEngine,
    schema: str,
    emulator: Emulator,
) -> None:
    """The child uploads and records the input file, then is held: creating the batch gets a
    429 with Retry-After. ``before-create``: it is killed while it waits. ``after-create``: this
    test locks the batch row, so the child creates the provider batch once Retry-After has
    passed but cannot record it, and is killed then; the retry must re-attach to it."""
    db = Db(engine, schema)
    claim_seconds = 2.0
    async with (
        client(engine, schema, emulator) as bi,
        Children(tmp_path, database_url, schema, emulator) as kids,
    ):
        batch = await bi.create_batch(
            provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(4)
        )
        wait = "1" if created else "60"
        emulator.fail_http("POST", "/batches", 429, headers={"Retry-After": wait})
        child = await kids.start(
            "submit_proc.py", "--batch", str(batch.id), "--claim-seconds", str(claim_seconds)
        )

        async def held_at_create() -> bool:
            row = await db.batch(batch.id)
            return row.input_file_id is not None and posts(emulator, "/v1/batches") == 1

        await until(held_at_create, "the input file recorded", 15, guard=kids.check_alive)
        row = await db.batch(batch.id)
        assert row.claimed_by is not None
        assert row.claimed_by.startswith("submit:")
        async with engine.connect() as locker:
            if created:
                await locker.execute(
                    sa.text(f'SELECT 1 FROM "{schema}".batches WHERE id = :id FOR UPDATE'),
                    {"id": batch.id},
                )
                await until(
                    sync(lambda: provider_batches_for(emulator, batch.id)),
                    "the child to create the provider batch",
                    10,
                    guard=kids.check_alive,
                )
            await kids.kill(child)
            killed_at = time.monotonic()
            await locker.rollback()
        row = await db.batch(batch.id)
        assert row.provider_batch_id is None
        assert row.status == "pending"
        left = await db.value(
            "SELECT extract(epoch FROM claimed_until - now()) FROM {s}.batches WHERE id = :id",
            id=batch.id,
        )

        refused = 0

        async def submitted() -> bool:
            nonlocal refused
            try:
                await bi.submit_batch(batch.id)
            except InvalidBatchError as exc:
                if "being submitted by another caller" not in str(exc):
                    raise
                refused += 1
                return False
            return True

        await until(submitted, "a retried submit to succeed", claim_seconds + 2)
        took = time.monotonic() - killed_at
        print(
            f"\n[{'after' if created else 'before'} create] claim left at the kill "
            f"{float(left or 0):.2f}s; the retry succeeded {took:.2f}s after the kill "
            f"({refused} refusals)"
        )
        row = await db.batch(batch.id)
        (pb,) = provider_batches_for(emulator, batch.id)
        assert row.provider_batch_id == pb["id"]
        assert row.input_file_id == pb["input_file_id"]
        assert row.status != "pending"
        assert row.claimed_by is None
        assert posts(emulator, "/v1/files") == 1  # the recorded upload was reused
        # The 429, then the child's create (after-create) or the retry's (before-create).
        assert posts(emulator, "/v1/batches") == 2
        assert took <= claim_seconds + 2


async def test_an_anthropic_submit_killed_after_creating_is_reattached_not_paid_twice(
    tmp_path: Path,
    database_url: str,
    engine: AsyncEngine,
    schema: str,
    emulator: Emulator,
) -> None:
    """Anthropic batches carry no tag: the child notes the time, its create gets a 429, and
    while it waits this test locks the batch row; the child creates the batch once Retry-After
    has passed, cannot record it, and is SIGKILLed. The retry finds the batch by the noted time
    and its request count and re-attaches: one batch at Anthropic."""
    db = Db(engine, schema)
    create = "/v1/messages/batches"
    anthropic = AnthropicProvider(api_key=emulator.api_key, base_url=emulator.anthropic_base_url)
    async with (
        BatchInfer(engine, providers=[anthropic], schema=schema, claim_seconds=2) as bi,
        Children(tmp_path, database_url, schema, emulator) as kids,
    ):
        await bi.migrate()
        requests = [
            {
                "custom_id": f"m{i}",
                "body": {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
            }
            for i in range(5)
        ]
        batch = await bi.create_batch(
            provider="anthropic",
            endpoint="/v1/messages",
            model="claude-haiku-4-5",
            requests=requests,
        )
        emulator.fail_http("POST", create, 429, headers={"Retry-After": "1"})
        child = await kids.start(
            "submit_proc.py", "--batch", str(batch.id), "--provider", "anthropic",
            "--base-url", emulator.anthropic_base_url,
        )  # fmt: skip

        async def noted_and_refused() -> bool:
            row = await db.batch(batch.id)
            return "create_started_at" in (row.submit_state or {}) and posts(emulator, create) == 1

        await until(
            noted_and_refused, "the create to be noted and refused", 15, guard=kids.check_alive
        )
        async with engine.connect() as locker:
            await locker.execute(
                sa.text(f'SELECT 1 FROM "{schema}".batches WHERE id = :id FOR UPDATE'),
                {"id": batch.id},
            )
            await until(
                sync(lambda: len(emulator._anthropic.batches) == 1),
                "the child to create the batch",
                10,
                guard=kids.check_alive,
            )
            await kids.kill(child)
            await locker.rollback()
        assert (await db.batch(batch.id)).provider_batch_id is None

        async def submitted() -> bool:
            try:
                await bi.submit_batch(batch.id)
            except InvalidBatchError as exc:
                if "being submitted by another caller" not in str(exc):
                    raise
                return False
            return True

        await until(submitted, "a retried submit to succeed", 6)
        (made,) = emulator._anthropic.batches
        row = await db.batch(batch.id)
        assert row.provider_batch_id == made
        assert posts(emulator, create) == 2  # the 429, then the killed child's create


# -- SIGTERM -------------------------------------------------------------------------------------


async def test_sigterm_stops_a_worker_gracefully_releasing_its_claims(
    tmp_path: Path, database_url: str, engine: AsyncEngine, schema: str
) -> None:
    db = Db(engine, schema)
    plain = tmp_path / "plain.txt"
    inside = tmp_path / "inside"
    async with (
        Emulator(step_seconds=0.05) as emulator,
        client(engine, schema, emulator) as bi,
        Children(tmp_path, database_url, schema, emulator) as kids,
    ):
        for i in range(4):
            await bi.create_batch(
                provider="openai",
                endpoint=CHAT,
                model=MODEL,
                requests=chat_requests(5, prefix=f"b{i}-"),
                submit=True,
            )
        # The plain handler sleeps: the worker is surely holding a claim when it is stopped.
        worker = await kids.worker(
            "--plain-file", str(plain), "--plain-sleep", "60", "--inside-file", str(inside)
        )
        await until(sync(inside.exists), "a handler to be running", 15, guard=kids.check_alive)
        in_handler = uuid.UUID(inside.read_text().split()[0])
        claims = await db.rows(
            "SELECT id, claimed_by FROM {s}.batches WHERE claimed_by IS NOT NULL"
        )
        assert claims
        assert {pid_of(c.claimed_by) for c in claims} == {worker.pid}
        assert await db.has_worker(worker.pid)

        worker.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = await asyncio.wait_for(worker.proc.wait(), 10)
        took = time.monotonic() - sent
        print(f"\nSIGTERM with {len(claims)} claim(s) held: exited {code} after {took:.2f}s")
        assert code == 0
        assert took < 5
        assert await db.rows("SELECT id FROM {s}.batches WHERE claimed_by IS NOT NULL") == []
        assert not await db.has_worker(worker.pid)
        # The handler stopped mid-way neither counts as done nor as failed: it runs again.
        row = await db.batch(in_handler)
        assert row.handlers_done == []
        assert row.handler_dispatched_at is None
        assert row.handler_attempts == 0
        assert "worker_stopped" in worker.log.read_text()


# -- a long transactional handler and the worker's other claims ---------------------------------


async def handler_due(bi: BatchInfer, emulator: Emulator, *, handler: str) -> uuid.UUID:
    """A batch driven by a worker of this process, which lacks its handler, until its results
    are applied: its next step is the handler, in a process that has it."""
    batch = await bi.create_batch(
        provider="openai",
        endpoint=CHAT,
        model=MODEL,
        requests=chat_requests(3),
        submit=True,
        handler=handler,
    )
    worker = bi.worker(poll_schedule=(0.05,), lease_seconds=1)

    async def applied() -> bool:
        await worker.run_once()
        row = await bi.get_batch(batch)
        if row.provider_batch_id is not None:
            await emulator.finish(row.provider_batch_id)
        return row.results_applied_at is not None

    await until(applied, "results applied", 10)
    return batch.id


async def test_a_long_transactional_handler_does_not_let_its_workers_other_claims_lapse(
    tmp_path: Path, database_url: str, engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    """A worker holds two batches (lease 1 s): A in its transactional handler for 6 s, and B,
    whose input file an earlier submit uploaded, in its submit, waiting 4 s on a 429 before
    creating the provider batch. B's claim must stay renewed meanwhile: if it lapses, a second
    worker takes B over and both create a provider batch for it, paid twice."""
    db = Db(engine, schema)
    inside = tmp_path / "inside"
    async with (
        client(engine, schema, emulator) as bi,
        Children(tmp_path, database_url, schema, emulator) as kids,
    ):
        a = await handler_due(bi, emulator, handler="tx")
        b = (
            await bi.create_batch(
                provider="openai",
                endpoint=CHAT,
                model=MODEL,
                requests=chat_requests(3, prefix="b-"),
                submit=True,
            )
        ).id
        emulator.fail_http("POST", "/batches", 400)
        with pytest.raises(ProviderRejectedError):
            await bi.submit_batch(b)
        assert (await db.batch(b)).input_file_id is not None

        emulator.fail_http("POST", "/batches", 429, headers={"Retry-After": "4"})
        creates = posts(emulator, "/v1/batches")
        first = await kids.worker(
            "--tx-sleep", "6", "--inside-file", str(inside), lease=1, concurrency=2
        )

        async def both_held() -> bool:
            return inside.exists() and posts(emulator, "/v1/batches") == creates + 1

        await until(both_held, "A in its handler, B waiting to create", 15, guard=kids.check_alive)
        held_at = time.monotonic()
        await kids.worker(lease=1, concurrency=2)

        async def a_dispatched() -> bool:
            return (await db.batch(a)).handler_dispatched_at is not None

        await until(a_dispatched, "A's handler to return", 20, guard=kids.check_alive)
        await until(sync(lambda: provider_batches_for(emulator, b)), "a provider batch for B", 10)
        took = time.monotonic() - held_at
        pbs = provider_batches_for(emulator, b)
        recorded_by = [
            c.name
            for c in kids.children
            if f"batchinfer.batch_submitted batch {b}" in c.log.read_text()
        ]
        print(
            f"\nA's handler held {first.name} for {took:.2f}s; provider batches for B: "
            f"{len(pbs)}; B's submission recorded by {recorded_by}"
        )
        assert len(pbs) == 1, "B was created twice at the provider: paid twice"
