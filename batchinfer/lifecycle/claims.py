"""Holding claims while work runs: renewed in the background, and work whose claim is lost is
stopped, since someone else may be doing it now."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from batchinfer.errors import BatchInferError, InvalidBatchError
from batchinfer.storage.claims import Claims

logger = logging.getLogger("batchinfer.lifecycle")


class ClaimLostError(InvalidBatchError):
    """The claim on a batch lapsed while its holder worked (it could not renew it in time)."""


class Leases:
    """The claims one owner holds, each tied to the task doing its work."""

    def __init__(self, claims: Claims, *, owner: str, seconds: float) -> None:
        self.claims = claims
        self.owner = owner
        self.seconds = seconds
        self.work: dict[uuid.UUID, asyncio.Task[Any]] = {}
        self.lost: set[uuid.UUID] = set()
        self._renewed: float | None = None

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.seconds / 3)
            await self.renew_once()

    async def renew_once(self) -> None:
        ids = set(self.work)
        loop = asyncio.get_running_loop()
        if self._renewed is None:
            # The first beat comes a third of a lease after the claims were taken.
            self._renewed = loop.time() - self.seconds / 3
        if not ids:
            self._renewed = loop.time()
            return
        try:
            held = await self.claims.renew(ids, owner=self.owner, seconds=self.seconds)
        except BatchInferError as exc:
            # The database may be back before the claims lapse; try again at the next beat.
            logger.warning(
                "batchinfer.lease_renewal_failed %s",
                exc,
                extra={"batchinfer.event": "lease_renewal_failed", "batchinfer.error": str(exc)},
            )
            if loop.time() - self._renewed < 0.8 * self.seconds:
                return
            # Too long without a renewal: others may take these batches over any moment, so
            # the work on them stops rather than, say, create a provider batch twice.
            held = set()
        self._renewed = loop.time()
        for batch_id in ids - held:
            task = self.work.get(batch_id)
            if task is not None and not task.done():
                self.lost.add(batch_id)
                logger.warning(
                    "batchinfer.lease_lost batch %s: another worker may have taken it; "
                    "stopping the work on it",
                    batch_id,
                    extra={
                        "batchinfer.event": "lease_lost",
                        "batchinfer.batch_id": str(batch_id),
                    },
                )
                task.cancel(f"claim on batch {batch_id} lost")

    async def release(self, ids: set[uuid.UUID]) -> None:
        for batch_id in ids:
            self.work.pop(batch_id, None)
        try:
            await self.claims.release(ids, owner=self.owner)
        except BatchInferError as exc:
            # Unreleased claims lapse on their own within the lease.
            logger.warning(
                "batchinfer.release_failed %s",
                exc,
                extra={"batchinfer.event": "release_failed", "batchinfer.error": str(exc)},
            )


@asynccontextmanager
async def holding(
    claims: Claims, batch_id: uuid.UUID, *, owner: str, seconds: float
) -> AsyncIterator[None]:
    """Keep the claim on ``batch_id`` (already taken) renewed for the block, then release it.

    Should it be lost meanwhile, the block is cancelled and ClaimLostError raised instead.
    """
    task = asyncio.current_task()
    assert task is not None
    leases = Leases(claims, owner=owner, seconds=seconds)
    leases.work[batch_id] = task
    renewer = asyncio.create_task(leases.renew_forever(), name=f"batchinfer-lease-{batch_id}")
    try:
        yield
    except asyncio.CancelledError:
        if batch_id in leases.lost:
            task.uncancel()
            raise ClaimLostError(
                f"batch {batch_id}: the claim to work on it lapsed (the database could not be "
                "reached to renew it); another caller may carry on, so this one stopped"
            ) from None
        raise
    finally:
        renewer.cancel()
        await asyncio.wait([renewer])
        await asyncio.shield(leases.release({batch_id}))
