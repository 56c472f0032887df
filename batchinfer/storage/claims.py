"""The one claim on a batch, shared by ``submit_batch`` and every worker, and worker liveness.

Whoever holds a batch's claim (``claimed_by`` until ``claimed_until``) is the only one driving
it. Claims are taken with ``FOR UPDATE SKIP LOCKED`` so workers never queue behind each other,
renewed while their holder works, and lapse on their own when it dies: leases are measured in
the database's time, so the clocks of many machines need not agree.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from batchinfer.domain import Batch
from batchinfer.storage.batches import UNSUBMITTED, at
from batchinfer.storage.database import Database
from batchinfer.storage.rows import batch_from_row
from batchinfer.storage.tables import batches, workers

_FREE = sa.or_(batches.c.claimed_until.is_(None), batches.c.claimed_until < sa.func.now())


def lease(seconds: float) -> sa.ColumnElement[datetime]:
    return sa.func.now() + timedelta(seconds=seconds)


class Claims:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def claim_unsubmitted(
        self, batch_id: uuid.UUID, *, owner: str, seconds: float
    ) -> datetime | None:
        """Take the claim on a batch not yet submitted.

        Returns None when taken, else when the current holder's claim lapses.
        """
        async with self.db.tx(f"claiming batch {batch_id} for submission") as conn:
            claimed = (
                await conn.execute(
                    batches.update()
                    .where(
                        batches.c.id == batch_id,
                        UNSUBMITTED,
                        sa.or_(_FREE, batches.c.claimed_by == owner),
                    )
                    .values(claimed_by=owner, claimed_until=lease(seconds))
                    .returning(batches.c.id)
                )
            ).first()
            if claimed is not None:
                return None
            held: datetime | None = (
                await conn.execute(
                    sa.select(batches.c.claimed_until).where(batches.c.id == batch_id)
                )
            ).scalar_one_or_none()
            return held or datetime.now().astimezone()

    async def claim_due(
        self,
        *,
        owner: str,
        seconds: float,
        limit: int,
        handlers: Collection[str],
        providers: Collection[str] | None = None,
        now: datetime | None = None,
        exclude: Collection[uuid.UUID] = (),
    ) -> list[Batch]:
        """Claim up to ``limit`` batches that need a worker now, soonest due first.

        Due: a batch created with ``submit=True`` and not yet submitted, an open batch whose
        next poll time has come, a batch whose results are applied but whose completion
        handlers have not all returned (only when this worker knows its named handler), and
        one whose files at the provider are still to be deleted. With ``providers``, only
        batches of those providers are claimed for work at a provider (handlers need none):
        a worker leaves the others to workers that can talk to their provider.
        """
        b = batches.c
        at_provider = sa.true() if providers is None else b.provider.in_(list(providers))
        open_due = sa.and_(
            at_provider,
            b.results_applied_at.is_(None),
            sa.or_(b.provider_batch_id.is_not(None), b.submit_requested_at.is_not(None)),
            sa.or_(b.next_poll_at.is_(None), b.next_poll_at <= at(now)),
        )
        handlers_due = sa.and_(
            b.results_applied_at.is_not(None),
            b.handler_dispatched_at.is_(None),
            b.handler_gave_up_at.is_(None),
            sa.or_(b.handler_next_at.is_(None), b.handler_next_at <= at(now)),
            sa.or_(b.handler.is_(None), b.handler.in_(list(handlers))),
        )
        # A deletion of the provider's files that failed is tried again (its due time is
        # next_poll_at, pushed back after each failure).
        files_due = sa.and_(
            at_provider,
            b.results_applied_at.is_not(None),
            b.files_deleted_at.is_(None),
            sa.or_(b.next_poll_at.is_(None), b.next_poll_at <= at(now)),
        )
        due = (
            sa.select(b.id)
            .where(_FREE, sa.or_(open_due, handlers_due, files_due))
            .order_by(sa.func.coalesce(b.next_poll_at, b.handler_next_at, b.created_at))
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if exclude:
            due = due.where(b.id.not_in(list(exclude)))
        cte = due.cte("due")
        async with self.db.tx("claiming due batches") as conn:
            rows = (
                await conn.execute(
                    batches.update()
                    .where(b.id == cte.c.id)
                    .values(claimed_by=owner, claimed_until=lease(seconds))
                    .returning(batches)
                )
            ).all()
        return [batch_from_row(r) for r in rows]

    async def renew(
        self, ids: Collection[uuid.UUID], *, owner: str, seconds: float
    ) -> set[uuid.UUID]:
        """Extend the claims ``owner`` still holds among ``ids``; returns those it holds.

        A row locked meanwhile (by the owner's own handler transaction, which can run for
        long) is skipped rather than waited for: nobody else can claim a locked row, and the
        lock holder extends the claim when it commits. Waiting would stall every renewal of
        the owner and let its other claims lapse while it still works on them.
        """
        if not ids:
            return set()
        b = batches.c
        mine = sa.and_(b.id.in_(list(ids)), b.claimed_by == owner)
        free = sa.select(b.id).where(mine).with_for_update(skip_locked=True).cte("free")
        async with self.db.tx("renewing claims") as conn:
            await conn.execute(
                batches.update().where(b.id == free.c.id).values(claimed_until=lease(seconds))
            )
            # Committed state, read without waiting on locks: still ours unless taken over.
            return set((await conn.execute(sa.select(b.id).where(mine))).scalars())

    async def release(self, ids: Collection[uuid.UUID], *, owner: str) -> None:
        if not ids:
            return
        async with self.db.tx("releasing claims") as conn:
            await conn.execute(
                batches.update()
                .where(batches.c.id.in_(list(ids)), batches.c.claimed_by == owner)
                .values(claimed_by=None, claimed_until=None)
            )

    async def release_all(self, *, owner: str) -> None:
        """Every claim ``owner`` still holds (a stopping worker's, whatever it was doing)."""
        async with self.db.tx("releasing claims") as conn:
            await conn.execute(
                batches.update()
                .where(batches.c.claimed_by == owner)
                .values(claimed_by=None, claimed_until=None)
            )

    async def unknown_handlers(self, handlers: Collection[str], *, limit: int = 100) -> list[Batch]:
        """Batches waiting for a named handler that ``handlers`` does not include."""
        b = batches.c
        query = (
            sa.select(batches)
            .where(
                b.results_applied_at.is_not(None),
                b.handler_dispatched_at.is_(None),
                b.handler_gave_up_at.is_(None),
                b.handler.is_not(None),
                b.handler.not_in(list(handlers)),
            )
            .limit(limit)
        )
        async with self.db.connect("looking for batches with unknown handlers") as conn:
            return [batch_from_row(r) for r in await conn.execute(query)]

    # -- workers ------------------------------------------------------------------------------

    async def heartbeat(self, worker_id: str, *, hostname: str, pid: int, seconds: float) -> None:
        """Say this worker is alive for ``seconds`` more."""
        stmt = insert(workers).values(
            id=worker_id, hostname=hostname, pid=pid, alive_until=lease(seconds)
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[workers.c.id], set_={"alive_until": stmt.excluded.alive_until}
        )
        async with self.db.tx("recording a worker heartbeat") as conn:
            await conn.execute(stmt)
            # Rows of workers long dead are noise in the table; drop them on the way.
            await conn.execute(
                workers.delete().where(workers.c.alive_until < sa.func.now() - timedelta(days=1))
            )

    async def retire(self, worker_id: str) -> None:
        async with self.db.tx("retiring a worker") as conn:
            await conn.execute(workers.delete().where(workers.c.id == worker_id))

    async def workers_alive(self) -> int:
        async with self.db.connect("counting live workers") as conn:
            return int(
                (
                    await conn.execute(
                        sa.select(sa.func.count()).where(workers.c.alive_until > sa.func.now())
                    )
                ).scalar_one()
            )
