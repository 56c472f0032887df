"""Creating a batch, and submitting it: claim, stream the requests to the provider, record.

A submit that crashed or lost its answer is finished by the next one: the uploaded file is
recorded before the batch is created, and a provider batch carrying our id in its metadata is
re-attached instead of paying for a second one.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Any

from batchinfer.domain import Batch, BatchStatus, SubmitKey
from batchinfer.errors import BatchBusyError, BatchInferError, InvalidBatchError, ProviderError
from batchinfer.lifecycle.claims import holding
from batchinfer.lifecycle.common import Providers, finish_even_if_cancelled, log, read_ahead
from batchinfer.providers.base import Provider
from batchinfer.storage.store import Store
from batchinfer.validation import Requests, check_batch_metadata, validate_requests

#: Requests read from the database at a time while submitting.
_UPLOAD_PAGE = 2_000


class Submitter:
    def __init__(self, store: Store, providers: Providers, *, claim_seconds: float = 30.0) -> None:
        self.store = store
        self.providers = providers
        #: How long a claim lasts unless renewed; a dead submitter blocks others this long.
        self.claim_seconds = claim_seconds
        #: Seconds from submission to the first poll by a worker.
        self.first_poll_in = 60.0

    async def create(
        self,
        *,
        provider: str,
        endpoint: str,
        model: str,
        requests: Requests,
        metadata: Mapping[str, Any] | None,
        submit: bool = False,
        handler: str | None = None,
    ) -> Batch:
        adapter = self.providers.get(provider)
        checked_metadata = check_batch_metadata(metadata)
        validated = validate_requests(requests, endpoint=endpoint, model=model, rules=adapter.rules)
        batch = await self.store.batches.create(
            provider=provider,
            endpoint=endpoint,
            model=model,
            metadata=checked_metadata,
            requests=validated,
            submit=submit,
            handler=handler,
        )
        log("batch_created", batch, requests=batch.request_total, bytes=batch.input_bytes)
        return batch

    async def submit(self, batch_id: uuid.UUID) -> Batch:
        """Submit now, holding the batch's claim for as long as it takes."""
        batch = submittable(await self.store.batches.get(batch_id))
        adapter = self.providers.get(batch.provider)
        owner = f"submit:{uuid.uuid4()}"
        held_until = await self.store.claims.claim_unsubmitted(
            batch.id, owner=owner, seconds=self.claim_seconds
        )
        if held_until is not None:
            submittable(await self.store.batches.get(batch_id))  # submitted meanwhile?
            raise BatchBusyError(
                f"batch {batch.id} is being submitted by another caller (its claim lasts until "
                f"{held_until:%Y-%m-%d %H:%M:%S %Z} unless renewed); if that caller died, its "
                f"claim lapses within {self.claim_seconds:g} s: submit again then"
            )
        async with holding(self.store.claims, batch.id, owner=owner, seconds=self.claim_seconds):
            return await self.submit_claimed(batch, adapter)

    async def withdraw(self, batch_id: uuid.UUID) -> Batch:
        """Cancel a batch queued for a worker (``submit=True``) before anyone submits it."""
        batch = submittable(await self.store.batches.get(batch_id))
        owner = f"cancel:{uuid.uuid4()}"
        if await self.store.claims.claim_unsubmitted(
            batch.id, owner=owner, seconds=self.claim_seconds
        ):
            submittable(await self.store.batches.get(batch_id))  # submitted meanwhile?
            raise BatchBusyError(
                f"batch {batch.id} is being submitted right now; cancel it again once it is "
                "(the provider then cancels it)"
            )
        try:
            ended = await self.store.batches.end_unsubmitted(
                batch.id,
                status=BatchStatus.CANCELLED,
                reason="cancelled before it was submitted",
                owner=owner,
            )
        finally:
            await self.store.claims.release({batch.id}, owner=owner)
        if ended is None:
            raise BatchBusyError(f"batch {batch.id} was submitted meanwhile; cancel it again")
        log("batch_withdrawn", ended, status=ended.status.value)
        return ended

    async def submit_claimed(
        self,
        batch: Batch,
        adapter: Provider,
        *,
        now: datetime | None = None,
        first_poll_in: float | None = None,
    ) -> Batch:
        """Submit a batch whose claim the caller holds; ``now`` is the clock polls are
        scheduled by."""
        key = SubmitKey(
            batch_id=batch.id,
            endpoint=batch.endpoint,
            model=batch.model,
            request_total=batch.request_total,
            input_bytes=batch.input_bytes,
            created_at=batch.created_at,
        )
        source_errors: list[Exception] = []

        async def pages() -> AsyncIterator[Sequence[tuple[str, bytes]]]:
            stored = self.store.batches.request_pages(batch.id, page_size=_UPLOAD_PAGE)
            try:
                async for page in read_ahead(stored):
                    yield page
            except Exception as exc:
                source_errors.append(exc)
                raise

        try:
            pb = await adapter.submit(pages, key=key, checkpoint=_Checkpoint(self.store, batch))
        except ProviderError:
            # The body stopped because reading it failed: that is the error to report.
            if source_errors:
                raise source_errors[-1] from None
            raise
        # Recording is what makes the money spent visible: finish it even if cancelled now.
        try:
            batch = await finish_even_if_cancelled(
                self.store.batches.record_submission(
                    batch.id,
                    pb,
                    first_poll_in=self.first_poll_in if first_poll_in is None else first_poll_in,
                    now=now,
                )
            )
        except InvalidBatchError:
            # Someone else's submission was recorded first (our claim had lapsed): this
            # provider batch is a second one, paid for unless cancelled now.
            try:
                await adapter.cancel_batch(pb.id)
                log("duplicate_cancelled", batch, level=logging.WARNING, provider_batch_id=pb.id)
            except BatchInferError as exc:
                log(
                    "duplicate_not_cancelled",
                    batch,
                    level=logging.ERROR,
                    provider_batch_id=pb.id,
                    error=str(exc),
                )
            raise
        log("batch_submitted", batch, status=batch.status.value, requests=batch.request_total)
        return batch


class _Checkpoint:
    """A submit's progress, in the batch's row: each record is committed before the provider
    goes on, so a retry after a crash picks up where this one stopped."""

    def __init__(self, store: Store, batch: Batch) -> None:
        self._store = store
        self._batch = batch
        self._input_ref = batch.input_file_id
        self._notes = dict(batch.submit_state)

    @property
    def input_ref(self) -> str | None:
        return self._input_ref

    @property
    def notes(self) -> Mapping[str, str]:
        return MappingProxyType(self._notes)

    async def record_input(self, ref: str) -> None:
        await self._store.batches.record_input_file(self._batch.id, ref)
        self._input_ref = ref

    async def note(self, **values: str) -> None:
        await self._store.batches.record_submit_notes(self._batch.id, values)
        self._notes.update(values)


def submittable(batch: Batch) -> Batch:
    if batch.status is not BatchStatus.PENDING or batch.provider_batch_id is not None:
        raise InvalidBatchError(
            f"batch {batch.id} is {batch.status.value} (provider batch "
            f"{batch.provider_batch_id}); only a pending batch can be submitted"
        )
    return batch
