"""Workers: batches that drive themselves, in one process or fifty, with Postgres the only
coordinator.

A worker claims due batches (``FOR UPDATE SKIP LOCKED``, with a lease it renews while it works),
and for each does the next step: submit it, poll it on the backoff schedule, expire it past its
maximum age, apply its results once it has ended, and run its completion handlers. Each step is
the same code the verbs run, and each records its outcome before the claim is released, so a
worker killed anywhere leaves work that another picks up once the lease lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from batchinfer.domain import Batch, BatchStatus
from batchinfer.errors import (
    BatchInferError,
    ClosedError,
    ProviderRejectedError,
    ResultsNotReadyError,
    SchemaNotReadyError,
)
from batchinfer.lifecycle import Leases, Providers, ResultsPass, StatusKeeper, Submitter
from batchinfer.lifecycle.common import log, step_error
from batchinfer.lifecycle.handlers import Dispatcher, Handlers
from batchinfer.storage.listen import Listener
from batchinfer.storage.store import Store

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]

#: The reference design's schedule: 1, 2, 5, 10 and 30 minutes, then every 30 minutes.
DEFAULT_POLL_SCHEDULE = (60.0, 120.0, 300.0, 600.0, 1800.0)
_UNKNOWN_HANDLER_CHECK = 60.0
#: How long a batch past its maximum age may stay ``cancelling`` before it is ended here, and
#: how long an ended batch's promised files may lag before what is there is applied.
_CANCEL_GRACE = 3600.0


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    poll_schedule: tuple[float, ...] = DEFAULT_POLL_SCHEDULE
    lease_seconds: float = 30.0
    max_age_seconds: float = 26 * 3600
    handler_attempts: int = 5
    concurrency: int = 4
    idle_seconds: float = 5.0
    shutdown_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not self.poll_schedule or any(d <= 0 for d in self.poll_schedule):
            raise ValueError("poll_schedule must be one or more positive delays in seconds")
        if self.lease_seconds < 1:
            raise ValueError("lease_seconds must be at least 1")
        if self.max_age_seconds <= 0:
            raise ValueError("max_age_seconds must be positive")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.idle_seconds <= 0 or self.shutdown_seconds <= 0:
            raise ValueError("idle_seconds and shutdown_seconds must be positive")


class Worker:
    """Drives due batches until cancelled (:meth:`run`), or for one cycle (:meth:`run_once`)."""

    def __init__(
        self,
        *,
        store: Store,
        providers: Providers,
        submitter: Submitter,
        status: StatusKeeper,
        results: ResultsPass,
        handlers: Handlers,
        listener: Listener,
        options: WorkerOptions,
        clock: Clock | None = None,
        is_closed: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.providers = providers
        self.submitter = submitter
        self.status = status
        self.results = results
        self.handlers = handlers
        self.listener = listener
        self.options = options
        self.clock = clock
        self._is_closed = is_closed
        #: Unique among every worker sharing the database; claims carry it.
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.dispatcher = Dispatcher(
            store,
            handlers,
            attempts=options.handler_attempts,
            claimed_by=self.id,
            claim_seconds=options.lease_seconds,
        )
        self._leases = Leases(store.claims, owner=self.id, seconds=options.lease_seconds)
        self._unknown_logged: set[uuid.UUID] = set()

    def _now(self) -> datetime | None:
        return self.clock() if self.clock is not None else None

    # -- running ------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim what is due now (up to ``concurrency``), drive each one step, and return how
        many batches were worked on. Deterministic: for tests and cron-style use."""
        self._check_open()
        await self._log_unknown_handlers()
        claimed = await self._claim(self.options.concurrency)
        if not claimed:
            return 0
        renewer = asyncio.create_task(self._renew_forever(), name=f"batchinfer-renew-{self.id}")
        try:
            async with asyncio.TaskGroup() as tg:
                for batch in claimed:
                    self._start(tg, batch)
        finally:
            renewer.cancel()
            await asyncio.wait([renewer])
            if self._leases.work:  # cancelled before some drives began
                await asyncio.shield(self._leases.release(set(self._leases.work)))
        return len(claimed)

    async def run(self) -> None:
        """Drive batches until cancelled; then stop taking work, let writes in flight finish,
        release every claim, and return within ``shutdown_seconds`` or so."""
        self._check_open()
        log_event("worker_started", self.id, concurrency=self.options.concurrency)
        running: dict[uuid.UUID, asyncio.Task[None]] = {}
        renewer = asyncio.create_task(
            self._renew_forever(heartbeat=True), name=f"batchinfer-renew-{self.id}"
        )
        last_unknown_check = -_UNKNOWN_HANDLER_CHECK
        loop = asyncio.get_running_loop()
        try:
            async with self.listener.subscribe("due") as woken:
                while True:
                    woken.clear()
                    free = self.options.concurrency - len(running)
                    if free > 0:
                        try:
                            await self.listener.ensure()
                            await self._heartbeat()
                            if loop.time() - last_unknown_check >= _UNKNOWN_HANDLER_CHECK:
                                last_unknown_check = loop.time()
                                await self._log_unknown_handlers()
                            for batch in await self._claim(free, exclude=set(running)):
                                running[batch.id] = self._spawn(batch, running)
                        except SchemaNotReadyError:
                            raise  # no table will appear by waiting: say so
                        except BatchInferError as exc:
                            # The database may be restarting: back off, keep going.
                            log_event(
                                "worker_cycle_failed",
                                self.id,
                                level=logging.WARNING,
                                error=str(exc),
                            )
                    waiting: set[asyncio.Future[Any]] = {
                        asyncio.ensure_future(woken.wait()),
                        *running.values(),
                    }
                    await asyncio.wait(
                        waiting,
                        # A poll delay shorter than the idle time is not waited out longer.
                        timeout=min(self.options.idle_seconds, *self.options.poll_schedule),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    for future in waiting:
                        if future not in running.values() and not future.done():
                            future.cancel()
        finally:
            renewer.cancel()
            for task in running.values():
                task.cancel()
            try:
                if running:
                    # Writes in flight finish (they are shielded); the rest stops at once.
                    await asyncio.wait(running.values(), timeout=self.options.shutdown_seconds)
                await asyncio.wait([renewer])
            finally:
                # Even when cancelled again meanwhile: a lingering row would tell wait() in
                # other processes that someone is still driving batches.
                await asyncio.shield(self._retire_quietly())
                log_event("worker_stopped", self.id)

    def _spawn(
        self, batch: Batch, running: dict[uuid.UUID, asyncio.Task[None]]
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(self._drive_claimed(batch), name=f"batchinfer-drive-{batch.id}")
        self._leases.work[batch.id] = task
        task.add_done_callback(lambda _: running.pop(batch.id, None))
        return task

    def _start(self, tg: asyncio.TaskGroup, batch: Batch) -> None:
        task = tg.create_task(self._drive_claimed(batch), name=f"batchinfer-drive-{batch.id}")
        self._leases.work[batch.id] = task

    async def _claim(self, limit: int, exclude: set[uuid.UUID] | None = None) -> list[Batch]:
        taking = asyncio.ensure_future(
            self.store.claims.claim_due(
                owner=self.id,
                seconds=self.options.lease_seconds,
                limit=limit,
                handlers=list(self.handlers.named),
                providers=list(self.providers.by_name),
                now=self._now(),
                exclude=exclude or (),
            )
        )
        try:
            claimed = await asyncio.shield(taking)
        except asyncio.CancelledError:
            # Stopped while the claims were being taken: once they are, give them back, or
            # they would hold the batches from every other worker for a whole lease.
            while not taking.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([taking])
            if not taking.cancelled() and taking.exception() is None:
                await asyncio.shield(self._leases.release({b.id for b in taking.result()}))
            raise
        for batch in claimed:
            log("batch_claimed", batch, worker=self.id, status=batch.status.value)
        return claimed

    async def _renew_forever(self, *, heartbeat: bool = False) -> None:
        while True:
            await asyncio.sleep(self.options.lease_seconds / 3)
            await self._leases.renew_once()
            if heartbeat:
                try:
                    await self._heartbeat()
                except BatchInferError as exc:
                    log_event(
                        "worker_heartbeat_failed", self.id, level=logging.WARNING, error=str(exc)
                    )

    async def _heartbeat(self) -> None:
        await self.store.claims.heartbeat(
            self.id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            seconds=self.options.lease_seconds * 2,
        )

    async def _retire_quietly(self) -> None:
        try:
            # A drive task cancelled before it first ran never reached its own release.
            await self.store.claims.release_all(owner=self.id)
            self._leases.work.clear()
            await self.store.claims.retire(self.id)
        except BatchInferError as exc:
            log_event("worker_retire_failed", self.id, level=logging.WARNING, error=str(exc))

    async def _log_unknown_handlers(self) -> None:
        try:
            waiting = await self.store.claims.unknown_handlers(list(self.handlers.named))
        except SchemaNotReadyError:
            raise
        except BatchInferError as exc:
            log_event("worker_cycle_failed", self.id, level=logging.WARNING, error=str(exc))
            return
        for batch in waiting:
            if batch.id not in self._unknown_logged:
                self._unknown_logged.add(batch.id)
                log(
                    "handler_unknown",
                    batch,
                    level=logging.WARNING,
                    handler=batch.handler,
                    known=",".join(sorted(self.handlers.named)) or "none",
                )

    def _check_open(self) -> None:
        if self._is_closed():
            raise ClosedError("this worker's BatchInfer was closed; make a new one")

    # -- one batch ----------------------------------------------------------------------------

    async def _drive_claimed(self, batch: Batch) -> None:
        try:
            await self._drive(batch)
        except asyncio.CancelledError:
            raise
        except BatchInferError as exc:
            await self._failed(batch, exc)
        except Exception as exc:
            # A bug or an odd provider answer must not stop the worker or its other batches.
            logger.exception("batchinfer.worker_unexpected_error batch %s", batch.id)
            await self._failed(batch, exc)
        finally:
            await asyncio.shield(self._leases.release({batch.id}))

    async def _drive(self, batch: Batch) -> Batch:
        """The next steps of one claimed batch, as far as they go now."""
        now = self._now()
        if batch.results_applied_at is None:
            if batch.provider_batch_id is None:
                if batch.status is not BatchStatus.PENDING or batch.submit_requested_at is None:
                    return batch
                adapter = self.providers.get(batch.provider)
                batch = await self.submitter.submit_claimed(
                    batch, adapter, now=now, first_poll_in=self.options.poll_schedule[0]
                )
                if not batch.is_terminal:
                    return batch
            else:
                # The provider is asked first: a batch that ended meanwhile keeps its results,
                # however old. A terminal one whose results could not be applied yet is polled
                # too: a lagging file id may still arrive.
                batch = await self.status.refresh(
                    batch.id, poll_delays=self.options.poll_schedule, now=now
                )
                if not batch.is_terminal:
                    await self.results.apply_arrived(batch.id)
                if not batch.is_terminal and self._too_old(batch, now):
                    # A cancel the provider accepted gets a grace period to end, so what it
                    # finished can be collected; past it, the batch ends here regardless.
                    grace = self._too_old(batch, now, grace=_CANCEL_GRACE)
                    if batch.status is not BatchStatus.CANCELLING or grace:
                        batch = await self.status.expire(
                            batch.id,
                            reason=f"expired by batchinfer: still {batch.status.value} "
                            f"{self.options.max_age_seconds / 3600:g} h after submission",
                            wait_for_cancel=not grace,
                        )
                    if not batch.is_terminal:
                        await self.store.batches.reschedule(
                            batch.id, seconds=self.options.poll_schedule[0], now=now
                        )
                        return batch
                    batch, _ = await self.results.run(batch.id, force=True)
            if batch.is_terminal and batch.results_applied_at is None:
                try:
                    # Past a grace after the end, what never came is swept (see run()).
                    batch, _ = await self.results.run(batch.id, now=now)
                except ResultsNotReadyError as exc:
                    log("results_not_ready", batch, reason=str(exc))
                    await self.store.batches.reschedule(
                        batch.id, seconds=self.options.poll_schedule[0], now=now
                    )
                    return batch
        if batch.results_applied_at is not None:
            batch = await self.results.delete_files(batch)
        if (
            batch.results_applied_at is not None
            and batch.handler_dispatched_at is None
            and batch.handler_gave_up_at is None
            and (batch.handler_next_at is None or now is None or batch.handler_next_at <= now)
        ):
            batch = await self.dispatcher.dispatch(batch, now=now)
        return batch

    def _too_old(self, batch: Batch, now: datetime | None, *, grace: float = 0) -> bool:
        if batch.submitted_at is None:
            return False
        current = now or datetime.now(batch.submitted_at.tzinfo)
        age = timedelta(seconds=self.options.max_age_seconds + grace)
        return current - batch.submitted_at > age

    async def _failed(self, batch: Batch, exc: BaseException) -> None:
        """Log it and look again later; one bad batch does not hold up the others. A submit
        the provider refuses as sent (a 4xx other than auth) ends the batch ``failed``: the
        same request would be refused again, and its waiters and handlers should know."""
        if batch.provider_batch_id is None and isinstance(exc, ProviderRejectedError):
            try:
                ended = await self.store.batches.end_unsubmitted(
                    batch.id,
                    status=BatchStatus.FAILED,
                    reason=f"the provider refused the submission: {exc}",
                    owner=self.id,
                )
                if ended is not None:
                    log("batch_refused", ended, level=logging.ERROR, error=str(exc))
                    await self.results.run(batch.id, force=True)
                    return
            except BatchInferError as again:
                log("worker_step_failed", batch, level=logging.WARNING, error=str(again))
        error = step_error(exc)
        level = logging.ERROR if error.permanent else logging.WARNING
        delay = self.options.poll_schedule[0]
        log("worker_step_failed", batch, level=level, error=str(exc), retry_in=delay)
        if batch.results_applied_at is not None:
            return  # a handler failure is recorded by the dispatcher; this was the database
        try:
            # Recorded on the batch, so a wait() in any process sees a batch that is stuck.
            await self.store.batches.record_step_failure(
                batch.id, error, retry_in=delay, now=self._now()
            )
        except BatchInferError as again:
            log("worker_step_failed", batch, level=logging.WARNING, error=str(again))


def log_event(event: str, worker_id: str, *, level: int = logging.INFO, **fields: object) -> None:
    figures = " ".join(f"{k}={v}" for k, v in fields.items())
    logger.log(
        level,
        "batchinfer.%s worker %s %s",
        event,
        worker_id,
        figures,
        extra={
            "batchinfer.event": event,
            "batchinfer.worker": worker_id,
            **{f"batchinfer.{k}": v for k, v in fields.items()},
        },
    )
