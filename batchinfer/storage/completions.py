"""Reading completions, the realtime path's rows, and per-batch summaries."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batchinfer.domain import Completion, CompletionStatus
from batchinfer.errors import BatchNotFoundError
from batchinfer.storage.database import Database
from batchinfer.storage.rows import completion_from_row
from batchinfer.storage.tables import batches, completions

# A completion's row stays "pending" when its batch is submitted: rewriting 50,000 rows to say
# "submitted" took half of a submit (and as much WAL as the batch). Its batch says it instead.
_OF_BATCH = completions.outerjoin(batches, batches.c.id == completions.c.batch_id)
_STATUS: sa.ColumnElement[str] = sa.case(
    (
        sa.and_(
            completions.c.status == CompletionStatus.PENDING.value,
            batches.c.submitted_at.is_not(None),
        ),
        CompletionStatus.SUBMITTED.value,
    ),
    else_=completions.c.status,
)
_COLUMNS = [
    _STATUS.label("status")
    if c.name == "status"
    else sa.func.coalesce(c, batches.c.submitted_at).label("started_at")
    if c.name == "started_at"
    else c
    for c in completions.c
]


def _select() -> sa.Select[Any]:
    return sa.select(*_COLUMNS).select_from(_OF_BATCH)


class CompletionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def pages(
        self,
        batch_id: uuid.UUID,
        *,
        status: CompletionStatus | None = None,
        page_size: int = 1_000,
    ) -> AsyncIterator[list[Completion]]:
        # A batch's line numbers are 1..request_total, so each page is a window of them: an
        # index range the planner cannot get wrong. (An open-ended ``line_no > after ... LIMIT``
        # on a table without statistics yet was planned as a sort of the rest of the batch
        # for every page.)
        async with self.db.connect(f"reading the completions of batch {batch_id}") as conn:
            total = await self._request_total(conn, batch_id)
        for after in range(0, total, page_size):
            query = (
                _select()
                .where(
                    completions.c.batch_id == batch_id,
                    completions.c.line_no > after,
                    completions.c.line_no <= after + page_size,
                )
                .order_by(completions.c.line_no)
            )
            if status is not None:
                query = query.where(_STATUS.op("=")(status.value))
            async with self.db.connect(f"reading the completions of batch {batch_id}") as conn:
                rows = (await conn.execute(query)).all()
            if rows:
                yield [completion_from_row(r) for r in rows]

    async def _request_total(self, conn: AsyncConnection, batch_id: uuid.UUID) -> int:
        query = sa.select(batches.c.request_total).where(batches.c.id == batch_id)
        total = (await conn.execute(query)).scalar()
        if total is None:
            raise BatchNotFoundError(f"no batch {batch_id} in schema {self.db.schema!r}")
        return int(total)

    async def get(self, completion_id: int) -> Completion:
        async with self.db.connect(f"reading completion {completion_id}") as conn:
            row = (await conn.execute(_select().where(completions.c.id == completion_id))).one()
        return completion_from_row(row)

    async def create_live(
        self, *, custom_id: str, body: dict[str, Any], metadata: dict[str, Any]
    ) -> int:
        """A completion outside any batch, for the realtime path."""
        async with self.db.tx("recording a live request") as conn:
            return int(
                (
                    await conn.execute(
                        completions.insert()
                        .values(
                            batch_id=None,
                            custom_id=custom_id,
                            line_no=1,
                            status=CompletionStatus.SUBMITTED.value,
                            request_body=body,
                            metadata=metadata,
                            started_at=sa.func.now(),
                        )
                        .returning(completions.c.id)
                    )
                ).scalar_one()
            )

    async def summary(self, batch_id: uuid.UUID) -> dict[str, Any]:
        """Counts by status and token sums, for reports; BatchNotFoundError for an unknown id."""
        c = completions.c
        query = (
            sa.select(
                _STATUS,
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(c.prompt_tokens), 0),
                sa.func.coalesce(sa.func.sum(c.completion_tokens), 0),
                sa.func.coalesce(sa.func.sum(c.cached_tokens), 0),
                sa.func.coalesce(sa.func.sum(c.reasoning_tokens), 0),
                sa.func.coalesce(sa.func.sum(c.cache_write_tokens), 0),
            )
            .select_from(_OF_BATCH)
            .where(c.batch_id == batch_id)
            .group_by(_STATUS)
        )
        async with self.db.connect(f"summarising batch {batch_id}") as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                await self._request_total(conn, batch_id)  # raises for an unknown batch
        by_status = {r[0]: int(r[1]) for r in rows}
        return {
            "by_status": by_status,
            "prompt_tokens": sum(int(r[2]) for r in rows),
            "completion_tokens": sum(int(r[3]) for r in rows),
            "cached_tokens": sum(int(r[4]) for r in rows),
            "reasoning_tokens": sum(int(r[5]) for r in rows),
            "cache_write_tokens": sum(int(r[6]) for r in rows),
        }
