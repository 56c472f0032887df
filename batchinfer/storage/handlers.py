"""What the completion handlers of a batch have done: which returned, the last error, retries.

A handler's record is written in a transaction of its own on the caller's engine (not mapped
to our schema, so the app's tables keep their names); a handler that takes the connection
writes inside that same transaction, so its effects and its record commit together or not at all.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batchinfer.domain import Batch
from batchinfer.errors import BatchNotFoundError
from batchinfer.storage.batches import after, at
from batchinfer.storage.claims import lease
from batchinfer.storage.database import Database, wrap_db_errors
from batchinfer.storage.rows import batch_from_row
from batchinfer.storage.tables import batches


class HandlerStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def dispatch(
        self,
        batch_id: uuid.UUID,
        key: str,
        *,
        claimed_by: str | None = None,
        claim_seconds: float = 30.0,
    ) -> AsyncIterator[AsyncConnection | None]:
        """A transaction in which handler ``key`` runs; it is recorded as done when the block
        ends without an error. Yields None, running nothing, if it is already done.

        The row stays locked meanwhile, so its holder's claim cannot be renewed; the record
        renews it (for ``claim_seconds``) when ``claimed_by`` still holds it."""
        with wrap_db_errors(f"recording handler {key!r} of batch {batch_id}"):
            async with self.db.raw_engine.begin() as conn:
                done = (
                    await conn.execute(
                        sa.select(batches.c.handlers_done)
                        .where(batches.c.id == batch_id)
                        .with_for_update(),
                        execution_options=self.db.translate,
                    )
                ).scalar_one_or_none()
                if done is None:
                    raise BatchNotFoundError(f"no batch {batch_id} in schema {self.db.schema!r}")
                if key in done:
                    yield None
                    return
                yield conn
                await conn.execute(
                    batches.update()
                    .where(batches.c.id == batch_id)
                    .values(
                        handlers_done=sa.func.array_append(batches.c.handlers_done, key),
                        updated_at=sa.func.now(),
                        claimed_until=sa.case(
                            (batches.c.claimed_by == claimed_by, lease(claim_seconds)),
                            else_=batches.c.claimed_until,
                        ),
                    ),
                    execution_options=self.db.translate,
                )

    async def record_failure(
        self,
        batch_id: uuid.UUID,
        *,
        error: str,
        retry_in: float | None,
        now: datetime | None = None,
    ) -> Batch:
        """Count a failed attempt; retry after ``retry_in`` seconds, or give up when None."""
        values: dict[str, object] = {
            "handler_attempts": batches.c.handler_attempts + 1,
            "handler_error": error,
            "updated_at": sa.func.now(),
        }
        if retry_in is None:
            values.update(handler_gave_up_at=at(now), handler_next_at=None)
        else:
            values["handler_next_at"] = after(now, retry_in)
        async with self.db.tx(f"recording a handler failure of batch {batch_id}") as conn:
            row = (
                await conn.execute(
                    batches.update()
                    .where(batches.c.id == batch_id)
                    .values(**values)
                    .returning(batches)
                )
            ).one()
            if retry_in is None:
                await self.db.notify(conn, f"handlers {batch_id}")
        return batch_from_row(row)

    async def record_dispatched(self, batch_id: uuid.UUID) -> Batch:
        """Every handler has returned."""
        async with self.db.tx(f"recording the handlers of batch {batch_id} as done") as conn:
            row = (
                await conn.execute(
                    batches.update()
                    .where(batches.c.id == batch_id)
                    .values(
                        handler_dispatched_at=sa.func.coalesce(
                            batches.c.handler_dispatched_at, sa.func.now()
                        ),
                        handler_next_at=None,
                        updated_at=sa.func.now(),
                    )
                    .returning(batches)
                )
            ).one()
            await self.db.notify(conn, f"handlers {batch_id}")
        return batch_from_row(row)
