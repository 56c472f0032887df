"""Polling, cancelling and expiring: what the provider says is recorded, and a status never
goes backwards."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

from batchinfer.domain import Batch, BatchStatus
from batchinfer.errors import BatchInferError, InvalidBatchError, ProviderRejectedError
from batchinfer.lifecycle.common import Providers, log
from batchinfer.storage.store import Store


class StatusKeeper:
    def __init__(self, store: Store, providers: Providers) -> None:
        self.store = store
        self.providers = providers

    async def refresh(
        self,
        batch_id: uuid.UUID,
        *,
        poll_delays: Sequence[float] = (),
        now: datetime | None = None,
    ) -> Batch:
        """Ask the provider and record its answer (scheduling the next poll, if ``poll_delays``)."""
        batch = await self.store.batches.get(batch_id)
        if batch.provider_batch_id is None:
            raise InvalidBatchError(f"batch {batch.id} has not been submitted; nothing to poll")
        if batch.results_applied_at is not None:
            return batch
        pb = await self.providers.get(batch.provider).retrieve_batch(batch.provider_batch_id)
        updated = await self.store.batches.record_status(
            batch.id, pb, poll_delays=poll_delays, now=now
        )
        counts = updated.request_counts
        if updated.status is not batch.status:
            log(
                "batch_status_changed",
                updated,
                previous=batch.status.value,
                status=updated.status.value,
                completed=counts.completed,
                failed=counts.failed,
            )
        else:
            log(
                "batch_polled",
                updated,
                level=logging.DEBUG,
                status=updated.status.value,
                completed=counts.completed,
                failed=counts.failed,
            )
        return updated

    async def cancel(self, batch_id: uuid.UUID) -> Batch:
        batch = await self.store.batches.get(batch_id)
        if batch.provider_batch_id is None:
            raise InvalidBatchError(
                f"batch {batch.id} was never submitted, so there is nothing to cancel at the "
                "provider"
            )
        if batch.is_terminal:
            raise InvalidBatchError(f"batch {batch.id} is already {batch.status.value}")
        adapter = self.providers.get(batch.provider)
        try:
            pb = await adapter.cancel_batch(batch.provider_batch_id)
        except ProviderRejectedError as exc:
            if exc.status != 409:
                raise
            # The provider finished it first; record what it says so nothing is lost.
            pb = await adapter.retrieve_batch(batch.provider_batch_id)
            batch = await self.store.batches.record_status(batch.id, pb)
            raise InvalidBatchError(
                f"batch {batch.id} can no longer be cancelled: the provider reports it "
                f"{pb.raw_status}; its status is recorded, fetch its results"
            ) from exc
        batch = await self.store.batches.record_status(batch.id, pb)
        log("batch_cancel_requested", batch, status=batch.status.value)
        return batch

    async def expire(
        self, batch_id: uuid.UUID, *, reason: str, wait_for_cancel: bool = True
    ) -> Batch:
        """End a batch that outlived its maximum age: a best-effort cancel at the provider and
        a last look at what it holds, then a local ``expired`` unless the provider ended it.

        With ``wait_for_cancel``, a cancel the provider accepted (``cancelling``) is left to
        finish, so the results it completed meanwhile, already paid for, can still be read.
        """
        batch = await self.store.batches.get(batch_id)
        if batch.is_terminal:
            return batch
        if batch.provider_batch_id is not None and batch.status is not BatchStatus.CANCELLING:
            adapter = self.providers.get(batch.provider)
            provider_batch_id = batch.provider_batch_id
            try:
                pb = await adapter.cancel_batch(provider_batch_id)
                batch = await self.store.batches.record_status(batch.id, pb)
            except BatchInferError as exc:
                # Best effort (it may have ended first: a 409); what it says now decides.
                log("expire_cancel_failed", batch, level=logging.WARNING, error=str(exc))
            try:
                pb = await adapter.retrieve_batch(provider_batch_id)
                batch = await self.store.batches.record_status(batch.id, pb)
            except BatchInferError as exc:
                log("expire_retrieve_failed", batch, level=logging.WARNING, error=str(exc))
                if wait_for_cancel:
                    # Not knowing whether it ended (with paid results), end nothing yet.
                    return batch
            if wait_for_cancel and batch.status is BatchStatus.CANCELLING:
                log("batch_expiring", batch, status=batch.status.value, reason=reason)
                return batch
        if not batch.is_terminal:
            batch = await self.store.batches.expire(batch.id, reason=reason)
        log("batch_expired", batch, status=batch.status.value, reason=reason)
        return batch
