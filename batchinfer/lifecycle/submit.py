"""Creating a batch, and submitting it: claim, stream the requests to the provider, record.

A submit that crashed or lost its answer is finished by the next one: the uploaded file is
recorded before the batch is created, and a provider batch carrying our id in its metadata is
re-attached instead of paying for a second one.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any

from batchinfer.domain import Batch, BatchStatus
from batchinfer.errors import BatchBusyError, BatchInferError, InvalidBatchError, ProviderError
from batchinfer.lifecycle.claims import holding
from batchinfer.lifecycle.common import Providers, finish_even_if_cancelled, log, read_ahead
from batchinfer.providers.base import Provider
from batchinfer.storage.store import Store
from batchinfer.validation import Requests, check_batch_metadata, validate_requests

_UPLOAD_LINES_PER_CHUNK = 2_000


class Submitter:
    def __init__(self, store: Store, providers: Providers, *, claim_seconds: float = 30.0) -> None:
        self.store = store
        self.providers = providers
        #: How long a claim lasts unless renewed; a dead submitter blocks others this long.
        self.claim_seconds = claim_seconds
        #: How many of the provider's newest batches a retried submit looks through.
        self.reattach_scan = 1_000
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
        validated = validate_requests(
            requests, endpoint=endpoint, model=model, limits=adapter.limits
        )
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
        tag = {"batchinfer_batch_id": str(batch.id)}
        file_id = batch.input_file_id
        filename = f"batchinfer-{batch.id}.jsonl"
        pb = None
        if file_id is None:
            # A submit that died after uploading, before recording it, left the file there.
            file_id = await adapter.find_input_file(filename)
            if file_id is not None:
                await self.store.batches.record_input_file(batch.id, file_id)
                log("input_file_adopted", batch, input_file_id=file_id)
        if file_id is None:
            source_errors: list[Exception] = []

            async def stream() -> AsyncIterator[bytes]:
                try:
                    async for chunk in self._input_stream(batch, adapter):
                        yield chunk
                except Exception as exc:
                    source_errors.append(exc)
                    raise

            try:
                file_id = await adapter.upload_input(stream, filename=filename)
            except ProviderError:
                # The body stopped because reading it failed: that is the error to report.
                if source_errors:
                    raise source_errors[-1] from None
                raise
            await self.store.batches.record_input_file(batch.id, file_id)
            log("input_uploaded", batch, input_file_id=file_id)
        else:
            # An earlier submit got as far as uploading; it may also have created the batch
            # (a timeout, or a crash before recording it). Re-attach rather than pay twice.
            pb = await adapter.find_batch(metadata=tag, max_batches=self.reattach_scan)
            if pb is not None:
                log("batch_reattached", batch, provider_batch_id=pb.id)
        if pb is None:
            pb = await adapter.create_batch(
                input_file_id=file_id, endpoint=batch.endpoint, metadata=tag
            )
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

    async def _input_stream(self, batch: Batch, adapter: Provider) -> AsyncIterator[bytes]:
        pages = self.store.batches.request_pages(batch.id, page_size=_UPLOAD_LINES_PER_CHUNK)
        async for page in read_ahead(pages):
            yield b"".join(adapter.encode_line(cid, batch.endpoint, body) for cid, body in page)


def submittable(batch: Batch) -> Batch:
    if batch.status is not BatchStatus.PENDING or batch.provider_batch_id is not None:
        raise InvalidBatchError(
            f"batch {batch.id} is {batch.status.value} (provider batch "
            f"{batch.provider_batch_id}); only a pending batch can be submitted"
        )
    return batch
