"""Waiting for a batch: woken by a worker through Postgres, or driving the batch itself.

While a worker is alive (in any process) a wait makes no provider call: it listens for the
batch's notifications, re-checking now and then in case one was missed. With no worker
alive it submits, polls and applies the batch itself.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from batchinfer.domain import ApplyReport, Batch
from batchinfer.errors import (
    BatchBusyError,
    BatchStalledError,
    InvalidBatchError,
    ProviderRejectedError,
    ResultsNotReadyError,
    TransientProviderError,
    TransientStorageError,
)
from batchinfer.lifecycle.common import step_error
from batchinfer.lifecycle.results import ResultsPass
from batchinfer.lifecycle.status import StatusKeeper
from batchinfer.lifecycle.submit import Submitter
from batchinfer.storage.listen import Listener
from batchinfer.storage.store import Store

logger = logging.getLogger("batchinfer.lifecycle")

OnPoll = Callable[[Batch], Awaitable[None] | None]


class Waiter:
    def __init__(
        self,
        store: Store,
        listener: Listener,
        *,
        submitter: Submitter,
        status: StatusKeeper,
        results: ResultsPass,
        sleep: Callable[[float], Awaitable[None]],
        on_report: Callable[[ApplyReport], None],
        check_open: Callable[[], None],
    ) -> None:
        self._store = store
        self._listener = listener
        self._submitter = submitter
        self._status = status
        self._results = results
        self._sleep = sleep
        self._on_report = on_report
        self._check_open = check_open

    async def wait(
        self,
        batch_id: uuid.UUID,
        *,
        interval: float,
        on_poll: OnPoll | None,
        max_step_failures: int | None = 10,
    ) -> Batch:
        while True:
            self._check_open()
            try:
                async with self._listener.subscribe(str(batch_id)) as woken:
                    current = await self._store.batches.get(batch_id)
                    if current.is_done:
                        return current
                    _check_will_be_submitted(current)
                    if await self._store.claims.workers_alive():
                        # Its steps run elsewhere; their failures are recorded on the batch.
                        _check_not_stalled(current, max_step_failures)
                        await _call(on_poll, current)
                        # Woken by a notification, or re-check in case one was missed.
                        await _wait_event(woken, max(interval, 1.0))
                        continue
                current = await self._drive(current)
            except ProviderRejectedError as exc:
                # A batch or file created moments ago may not be visible everywhere yet.
                if exc.status != 404 or not _recent(current):
                    raise
                logger.warning(
                    "batchinfer.wait_step_failed batch %s: %s (just created: trying again)",
                    batch_id,
                    exc,
                    extra={
                        "batchinfer.event": "wait_step_failed",
                        "batchinfer.batch_id": str(batch_id),
                        "batchinfer.error": str(exc),
                    },
                )
                await self._sleep(max(interval, 1.0))
                continue
            except (TransientProviderError, TransientStorageError) as exc:
                # A batch runs for hours; one failed step (already retried) is not the end,
                # but steps that keep failing are (max_step_failures).
                logger.warning(
                    "batchinfer.wait_step_failed batch %s: %s",
                    batch_id,
                    exc,
                    extra={
                        "batchinfer.event": "wait_step_failed",
                        "batchinfer.batch_id": str(batch_id),
                        "batchinfer.error": str(exc),
                    },
                )
                if isinstance(exc, TransientProviderError):
                    # The database answers: the failure is recorded for every waiter to see.
                    failed = await self._store.batches.record_step_failure(
                        batch_id, step_error(exc)
                    )
                    if failed is not None:
                        _check_not_stalled(failed, max_step_failures)
                await self._sleep(interval)
                continue
            await _call(on_poll, current)
            if current.is_done:
                return current
            await self._sleep(interval)

    async def _drive(self, batch: Batch) -> Batch:
        """One step of a batch nobody else drives: submit, poll, or apply its results."""
        if batch.provider_batch_id is None:
            try:
                batch = await self._submitter.submit(batch.id)
            except BatchBusyError:
                # Someone else is submitting it right now; look again next time.
                return await self._store.batches.get(batch.id)
        # A terminal batch is polled too: a lagging file id may still arrive.
        batch = await self._status.refresh(batch.id)
        if not batch.is_terminal:
            await self._results.apply_arrived(batch.id)
        if batch.is_terminal:
            try:
                batch, report = await self._results.run(batch.id)
            except ResultsNotReadyError as exc:
                # Waited for until a grace after the end; then what is there is applied.
                logger.info(
                    "batchinfer.results_not_ready batch %s: %s",
                    batch.id,
                    exc,
                    extra={
                        "batchinfer.event": "results_not_ready",
                        "batchinfer.batch_id": str(batch.id),
                    },
                )
                return batch
            if report is not None:
                self._on_report(report)
        return batch


async def _call(callback: OnPoll | None, batch: Batch) -> None:
    if callback is not None:
        result = callback(batch)
        if result is not None:
            await result


def _recent(batch: Batch) -> bool:
    """Submitted or ended within the last few minutes."""
    moments = [t for t in (batch.submitted_at, batch.ended_at) if t is not None]
    return not moments or datetime.now(UTC) - max(moments) < timedelta(minutes=5)


def _check_will_be_submitted(batch: Batch) -> None:
    if batch.provider_batch_id is None and batch.submit_requested_at is None:
        raise InvalidBatchError(
            f"batch {batch.id} is {batch.status.value} and was never submitted: call "
            "submit_batch() first, or create it with submit=True"
        )


#: A permanent error is given this many tries: the first may be a moment's inconsistency
#: (a batch not yet visible everywhere), or a key being rotated.
_PERMANENT_TRIES = 3


def _check_not_stalled(batch: Batch, max_step_failures: int | None) -> None:
    error = batch.last_error
    if max_step_failures is None or error is None:
        return
    limit = min(max_step_failures, _PERMANENT_TRIES) if error.permanent else max_step_failures
    if batch.step_failures >= limit:
        raise BatchStalledError(
            f"batch {batch.id} is stuck: its last {batch.step_failures} steps failed, the last "
            f"with {error}; fix that and wait again (the batch goes on, and a worker keeps "
            "retrying it)",
            last_error=str(error),
        )


async def _wait_event(event: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pass
