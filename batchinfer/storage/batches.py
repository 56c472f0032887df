"""Batch rows: creating a batch with its completions, reading batches, and recording what the
provider says about them, each write conditional on the row's current state."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from batchinfer.domain import (
    Batch,
    BatchStatus,
    CompletionStatus,
    NewRequest,
    ProviderBatch,
    StepFailure,
)
from batchinfer.errors import BatchNotFoundError, InvalidBatchError
from batchinfer.storage.database import Database
from batchinfer.storage.rows import as_jsonb, batch_from_row, dumps, provider_values
from batchinfer.storage.tables import Timestamp, batches

_COPY_CHUNK = 5_000
_COMPLETION_COLUMNS = ("batch_id", "custom_id", "line_no", "status", "request_body", "metadata")
UNSUBMITTED = sa.and_(
    batches.c.status == BatchStatus.PENDING.value, batches.c.provider_batch_id.is_(None)
)


def at(now: datetime | None) -> sa.ColumnElement[datetime]:
    """The time schedules are measured in: the caller's clock when given, else the database's."""
    return sa.func.now() if now is None else sa.literal(now, Timestamp)


def after(now: datetime | None, seconds: float) -> sa.ColumnElement[datetime]:
    return at(now) + timedelta(seconds=seconds)


class _SourceError(Exception):
    """An error raised by the caller's request iterator, carried past the DB error mapping."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


async def _guarded(requests: AsyncIterator[NewRequest]) -> AsyncIterator[NewRequest]:
    while True:
        try:
            item = await anext(requests)
        except StopAsyncIteration:
            return
        except Exception as exc:
            raise _SourceError(exc) from exc
        yield item


class BatchStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self,
        *,
        provider: str,
        endpoint: str,
        model: str,
        metadata: dict[str, Any],
        requests: AsyncIterator[NewRequest],
        submit: bool = False,
        handler: str | None = None,
    ) -> Batch:
        """The batch row and every completion row (COPY, in chunks), in one transaction."""
        batch_id = uuid.uuid4()
        try:
            async with self.db.tx("creating the batch") as conn:
                await conn.execute(
                    batches.insert().values(
                        id=batch_id,
                        provider=provider,
                        endpoint=endpoint,
                        model=model,
                        status=BatchStatus.PENDING.value,
                        request_total=0,
                        input_bytes=0,
                        metadata=metadata,
                        handler=handler,
                        submit_requested_at=sa.func.now() if submit else None,
                    )
                )
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                count, size = 0, 0
                records: list[tuple[Any, ...]] = []

                async def flush() -> None:
                    await driver.copy_records_to_table(
                        "completions",
                        schema_name=self.db.schema,
                        columns=_COMPLETION_COLUMNS,
                        records=records,
                    )
                    records.clear()

                async for req in _guarded(requests):
                    count += 1
                    size += req.line_bytes
                    records.append(
                        (
                            batch_id,
                            req.custom_id,
                            req.line_no,
                            CompletionStatus.PENDING.value,
                            req.body_json.decode(),
                            dumps(req.metadata),
                        )
                    )
                    if len(records) >= _COPY_CHUNK:
                        await flush()
                if records:
                    await flush()
                row = (
                    await conn.execute(
                        batches.update()
                        .where(batches.c.id == batch_id)
                        .values(request_total=count, input_bytes=size)
                        .returning(batches)
                    )
                ).one()
                if submit:
                    await self.db.notify(conn, f"due {batch_id}")
        except _SourceError as exc:
            # Rolled back; the caller sees its own iterator's error, not a database one.
            raise exc.original from exc.original.__cause__
        return batch_from_row(row)

    async def get(self, batch_id: uuid.UUID) -> Batch:
        async with self.db.connect(f"reading batch {batch_id}") as conn:
            row = (
                await conn.execute(sa.select(batches).where(batches.c.id == batch_id))
            ).one_or_none()
        if row is None:
            raise BatchNotFoundError(f"no batch {batch_id} in schema {self.db.schema!r}")
        return batch_from_row(row)

    async def find(
        self,
        *,
        status: BatchStatus | None = None,
        metadata: dict[str, Any] | None = None,
        limit: int = 50,
    ) -> list[Batch]:
        query = sa.select(batches).order_by(batches.c.created_at.desc()).limit(limit)
        if status is not None:
            query = query.where(batches.c.status == status.value)
        if metadata:
            query = query.where(batches.c.metadata.contains(metadata))
        async with self.db.connect("listing batches") as conn:
            return [batch_from_row(r) for r in await conn.execute(query)]

    async def request_pages(
        self, batch_id: uuid.UUID, *, page_size: int = 2_000
    ) -> AsyncIterator[list[tuple[str, bytes]]]:
        """(custom_id, body JSON as stored) in line order, a page per short query."""
        # Line numbers are 1..request_total: each page is a window of them, an index range
        # the planner cannot get wrong. (``line_no > :after ... LIMIT`` on a table with no
        # statistics yet was planned as a sort of the rest of the batch for every page: a
        # fresh table's first submit ran at half the speed.)
        query = sa.text(
            f"SELECT custom_id, request_body::text FROM {self.db.q}.completions "
            "WHERE batch_id = :b AND line_no > :after AND line_no <= :after + :n ORDER BY line_no"
        )
        after = 0
        while True:
            async with self.db.connect(f"reading the requests of batch {batch_id}") as conn:
                rows = (
                    await conn.execute(query, {"b": batch_id, "after": after, "n": page_size})
                ).all()
            if not rows:
                return
            # Stored as json text, exactly as validated and encoded at create time.
            yield [(r[0], r[1].encode()) for r in rows]
            after += page_size

    async def record_input_file(self, batch_id: uuid.UUID, file_id: str) -> None:
        """Remember the uploaded file before creating the batch, so a retry need not re-upload."""
        async with self.db.tx(f"recording the input file of batch {batch_id}") as conn:
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.status == BatchStatus.PENDING.value)
                .values(input_file_id=file_id, updated_at=sa.func.now())
            )

    async def record_submit_notes(self, batch_id: uuid.UUID, notes: Mapping[str, str]) -> None:
        """Add to what a submit noted for its own retry (kept until it is submitted)."""
        async with self.db.tx(f"recording the submit notes of batch {batch_id}") as conn:
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.status == BatchStatus.PENDING.value)
                .values(
                    submit_state=batches.c.submit_state.op("||")(as_jsonb(dict(notes))),
                    updated_at=sa.func.now(),
                )
            )

    async def record_submission(
        self,
        batch_id: uuid.UUID,
        pb: ProviderBatch,
        *,
        first_poll_in: float,
        now: datetime | None = None,
    ) -> Batch:
        """Provider ids, status, timestamps and counts. Its completions read as ``submitted``
        from now on (derived from the batch: their rows are not rewritten)."""
        async with self.db.tx(f"recording the submission of batch {batch_id}") as conn:
            row = (
                await conn.execute(
                    batches.update()
                    .where(batches.c.id == batch_id, UNSUBMITTED)
                    .values(
                        provider_batch_id=pb.id,
                        submitted_at=sa.func.now(),
                        **provider_values(pb),
                        status=pb.status.value,
                        ended_at=sa.func.now() if pb.status.is_terminal else None,
                        input_file_id=pb.input_file_id or batches.c.input_file_id,
                        next_poll_at=after(now, first_poll_in),
                        poll_count=0,
                    )
                    .returning(batches)
                )
            ).one_or_none()
            if row is None:
                raise InvalidBatchError(
                    f"batch {batch_id} was submitted by another caller meanwhile; provider "
                    f"batch {pb.id} is not recorded and should be cancelled"
                )
            await self.db.notify(conn, f"submitted {batch_id}")
        return batch_from_row(row)

    async def record_status(
        self,
        batch_id: uuid.UUID,
        pb: ProviderBatch,
        *,
        poll_delays: Sequence[float] = (),
        now: datetime | None = None,
    ) -> Batch:
        """Store what the provider reports, under a row lock; a status never goes backwards.

        A poll answered before a cancel but recorded after it cannot turn ``cancelling`` back
        into ``in_progress``, and nothing undoes a terminal status. For a terminal batch only
        file ids still missing are filled in: a lagging output file id can still arrive.
        With ``poll_delays`` the next poll is scheduled in the same transaction: after the
        submission the first delay, then each next one, the last repeating.
        """
        async with self.db.tx(f"recording the status of batch {batch_id}") as conn:
            current = (
                await conn.execute(
                    sa.select(batches.c.status, batches.c.poll_count, batches.c.result_sources)
                    .where(batches.c.id == batch_id)
                    .with_for_update()
                )
            ).one_or_none()
            if current is None:
                raise BatchNotFoundError(f"no batch {batch_id} in schema {self.db.schema!r}")
            update = batches.update().where(batches.c.id == batch_id).returning(batches)
            stored = BatchStatus(current.status)
            if stored.is_terminal:
                # Only the results' whereabouts can still change (a lagging file id), and
                # never from all there back to some still to come.
                was = current.result_sources
                if was is None or was.get("waiting_for") is not None or pb.results.ready:
                    update = update.values(result_sources=provider_values(pb)["result_sources"])
                update = update.values(
                    output_file_id=sa.func.coalesce(batches.c.output_file_id, pb.output_file_id),
                    error_file_id=sa.func.coalesce(batches.c.error_file_id, pb.error_file_id),
                    updated_at=sa.func.now(),
                )
            elif pb.status.rank < stored.rank:
                update = update.values(updated_at=sa.func.now())  # a stale answer: keep ours
            else:
                update = update.values(
                    status=pb.status.value,
                    ended_at=sa.func.now() if pb.status.is_terminal else None,
                    **provider_values(pb),
                )
            if poll_delays:
                # The first delay was waited before this poll (from the submission). An ended
                # batch is due at once: its results are to be applied, by whoever is free.
                delay = poll_delays[min(current.poll_count + 1, len(poll_delays) - 1)]
                ended = stored.is_terminal or pb.status.is_terminal
                update = update.values(
                    next_poll_at=at(now) if ended else after(now, delay),
                    poll_count=batches.c.poll_count + 1,
                )
            row = (await conn.execute(update)).one()
            batch = batch_from_row(row)
            if batch.status is not stored:
                await self.db.notify(conn, f"status {batch_id}")
        return batch

    async def record_step_failure(
        self,
        batch_id: uuid.UUID,
        error: StepFailure,
        *,
        retry_in: float | None = None,
        now: datetime | None = None,
    ) -> Batch | None:
        """One more step that failed in a row, and why; waiters are told. With ``retry_in``
        the batch is looked at again then. None when the batch is gone."""
        values: dict[str, Any] = {
            "step_failures": batches.c.step_failures + 1,
            "last_error": as_jsonb(
                {"kind": error.kind, "message": error.message[:2000], "permanent": error.permanent}
            ),
            "updated_at": sa.func.now(),
        }
        if retry_in is not None:
            values["next_poll_at"] = after(now, retry_in)
        async with self.db.tx(f"recording a failed step of batch {batch_id}") as conn:
            row = (
                await conn.execute(
                    batches.update()
                    .where(batches.c.id == batch_id)
                    .values(**values)
                    .returning(batches)
                )
            ).one_or_none()
            if row is None:
                return None
            await self.db.notify(conn, f"error {batch_id}")
        return batch_from_row(row)

    async def reschedule(
        self, batch_id: uuid.UUID, *, seconds: float, now: datetime | None = None
    ) -> None:
        """Look at the batch again in ``seconds`` (after an error, or results not yet there)."""
        async with self.db.tx(f"rescheduling batch {batch_id}") as conn:
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id)
                .values(next_poll_at=after(now, seconds), updated_at=sa.func.now())
            )

    async def expire(self, batch_id: uuid.UUID, *, reason: str) -> Batch:
        """End a batch locally as ``expired`` (past its maximum age); a terminal one is kept."""
        async with self.db.tx(f"expiring batch {batch_id}") as conn:
            row = (
                await conn.execute(
                    batches.update()
                    .where(
                        batches.c.id == batch_id,
                        batches.c.status.not_in([s.value for s in BatchStatus if s.is_terminal]),
                    )
                    .values(
                        status=BatchStatus.EXPIRED.value,
                        ended_at=sa.func.now(),
                        failure_reason=reason,
                        updated_at=sa.func.now(),
                    )
                    .returning(batches)
                )
            ).one_or_none()
            if row is not None:
                await self.db.notify(conn, f"status {batch_id}")
        return batch_from_row(row) if row is not None else await self.get(batch_id)

    async def end_unsubmitted(
        self, batch_id: uuid.UUID, *, status: BatchStatus, reason: str, owner: str
    ) -> Batch | None:
        """End a batch that was never submitted (withdrawn, or refused by the provider), if
        ``owner`` holds its claim; None if it was submitted or claimed by someone else."""
        async with self.db.tx(f"ending batch {batch_id} before submission") as conn:
            row = (
                await conn.execute(
                    batches.update()
                    .where(batches.c.id == batch_id, UNSUBMITTED, batches.c.claimed_by == owner)
                    .values(
                        status=status.value,
                        ended_at=sa.func.now(),
                        failure_reason=reason,
                        submit_requested_at=None,
                        updated_at=sa.func.now(),
                    )
                    .returning(batches)
                )
            ).one_or_none()
            if row is not None:
                await self.db.notify(conn, f"status {batch_id}")
        return batch_from_row(row) if row is not None else None

    async def record_files_deleted(self, batch_id: uuid.UUID) -> Batch:
        async with self.db.tx(f"recording the files of batch {batch_id} as deleted") as conn:
            row = (
                await conn.execute(
                    batches.update()
                    .where(batches.c.id == batch_id)
                    .values(files_deleted_at=sa.func.now(), updated_at=sa.func.now())
                    .returning(batches)
                )
            ).one()
        return batch_from_row(row)

    async def stats(self) -> tuple[dict[str, int], float | None]:
        """Batches by status, and the age in seconds of the oldest one still in flight."""
        async with self.db.connect("reading batch statistics") as conn:
            rows = (
                await conn.execute(
                    sa.select(batches.c.status, sa.func.count()).group_by(batches.c.status)
                )
            ).all()
            oldest = (
                await conn.execute(
                    sa.select(
                        sa.func.extract(
                            "epoch", sa.func.now() - sa.func.min(batches.c.submitted_at)
                        )
                    ).where(
                        batches.c.submitted_at.is_not(None),
                        batches.c.results_applied_at.is_(None),
                    )
                )
            ).scalar_one_or_none()
        return {r[0]: int(r[1]) for r in rows}, float(oldest) if oldest is not None else None
