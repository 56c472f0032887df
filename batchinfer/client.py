"""``BatchInfer``: the facade, and the one place concrete parts are wired together."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, overload

import orjson
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from batchinfer.domain import (
    ApplyReport,
    Batch,
    BatchStatus,
    Completion,
    CompletionStatus,
    Stats,
)
from batchinfer.errors import (
    ClosedError,
    InvalidRequestError,
)
from batchinfer.lifecycle import LiveCaller, Providers, ResultsPass, StatusKeeper, Submitter
from batchinfer.lifecycle.handlers import BatchHandler, Handlers
from batchinfer.lifecycle.waiting import Waiter
from batchinfer.pricing import Price, Pricing
from batchinfer.providers.base import Provider
from batchinfer.storage.listen import Listener
from batchinfer.storage.store import Store
from batchinfer.validation import Requests
from batchinfer.worker import DEFAULT_POLL_SCHEDULE, Clock, Worker, WorkerOptions

BatchRef = Batch | uuid.UUID | str
H = TypeVar("H", bound=BatchHandler)


def _batch_id(batch: BatchRef) -> uuid.UUID:
    if isinstance(batch, Batch):
        return batch.id
    if isinstance(batch, uuid.UUID):
        return batch
    try:
        return uuid.UUID(str(batch))
    except ValueError:
        raise InvalidRequestError(f"{batch!r} is not a batch id (a UUID)") from None


class BatchInfer:
    """Batches and their completions, kept in Postgres, sent to provider batch APIs.

    ``database`` is a ``postgresql+asyncpg://`` URL (the engine is created and closed here) or an
    ``AsyncEngine`` (borrowed, never disposed). Use as ``async with BatchInfer(...) as bi:``.
    ``results_grace_seconds``: how long after a batch's end results its provider promised
    (a file its counts announce) are waited for; then what is there is applied and the rest
    failed as missing.
    """

    def __init__(
        self,
        database: str | AsyncEngine,
        *,
        providers: Sequence[Provider],
        schema: str = "batchinfer",
        prices: Mapping[str, Price] | None = None,
        poll_interval: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        apply_chunk_size: int = 1_000,
        apply_writers: int = 2,
        claim_seconds: float = 30.0,
        delete_input_files: bool = True,
        delete_result_files: bool = False,
        max_result_line_bytes: int = 64 * 1024 * 1024,
        max_concurrent_results: int = 2,
        results_grace_seconds: float = 3600.0,
    ) -> None:
        if apply_writers < 1 or apply_chunk_size < 1:
            raise ValueError("apply_writers and apply_chunk_size must be at least 1")
        if max_result_line_bytes < 1024:
            raise ValueError("max_result_line_bytes must be at least 1024")
        if max_concurrent_results < 1:
            raise ValueError("max_concurrent_results must be at least 1")
        if results_grace_seconds < 0:
            raise ValueError("results_grace_seconds must not be negative")
        if claim_seconds < 1:
            raise ValueError("claim_seconds must be at least 1")
        if isinstance(database, AsyncEngine):
            self._engine, self._owns_engine = database, False
        elif isinstance(database, str):
            try:
                self._engine = create_async_engine(
                    _asyncpg_url(database),
                    json_serializer=lambda v: orjson.dumps(v).decode(),
                    json_deserializer=orjson.loads,
                    # Writers of a results pass, a listening connection, a worker's claims.
                    pool_size=max(5, apply_writers + 4),
                    pool_pre_ping=True,
                )
            except (SQLAlchemyError, ImportError, ValueError) as exc:
                raise ValueError(
                    f"cannot use {redacted_url(database)!r} as a database: {exc}; give a "
                    "postgresql+asyncpg://user@host/db URL"
                ) from exc
            self._owns_engine = True
        else:
            raise TypeError("database must be a postgresql+asyncpg:// URL or an AsyncEngine")
        if self._engine.dialect.driver != "asyncpg":
            raise ValueError(
                f"batchinfer needs the asyncpg driver (bulk COPY); this engine uses "
                f"{self._engine.dialect.driver!r}: use a postgresql+asyncpg:// URL"
            )
        names = [p.name for p in providers]
        if len(set(names)) != len(names):
            raise ValueError(f"two providers share a name: {names}")
        self._store = Store(self._engine, schema=schema)
        self._providers = Providers({p.name: p for p in providers})
        pricing = Pricing(prices)
        self._submitter = Submitter(self._store, self._providers, claim_seconds=claim_seconds)
        self._status = StatusKeeper(self._store, self._providers)
        self._results = ResultsPass(
            self._store,
            self._providers,
            pricing,
            chunk_size=apply_chunk_size,
            writers=apply_writers,
            delete_input_files=delete_input_files,
            delete_result_files=delete_result_files,
            max_line_bytes=max_result_line_bytes,
            max_concurrent=max_concurrent_results,
            not_ready_grace=results_grace_seconds,
        )
        self._live = LiveCaller(self._store, self._providers, pricing)
        self._handlers = Handlers()
        self._listener = Listener(self._store.db)
        self._waiter = Waiter(
            self._store,
            self._listener,
            submitter=self._submitter,
            status=self._status,
            results=self._results,
            sleep=sleep,
            on_report=self._remember_report,
            check_open=self._check_open,
        )
        self.poll_interval = poll_interval
        self._closed = False
        self._last_report: ApplyReport | None = None

    @property
    def schema(self) -> str:
        return self._store.schema

    async def __aenter__(self) -> BatchInfer:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close what this BatchInfer opened: its listening connection, the HTTP sessions its
        providers opened themselves, and the engine if it was created from a URL. A borrowed
        engine or session is left open. Any later call raises ClosedError."""
        if self._closed:
            return
        self._closed = True
        await self._listener.aclose()
        for provider in self._providers.by_name.values():
            await provider.aclose()
        if self._owns_engine:
            await self._engine.dispose()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(
                "this BatchInfer was closed (aclose() or the end of its `async with`); "
                "make a new one"
            )

    def _remember_report(self, report: ApplyReport) -> None:
        self._last_report = report

    @property
    def last_apply_report(self) -> ApplyReport | None:
        """Counts from the latest results pass run by this object's fetch_batch_results or
        wait (a worker's passes are logged as ``batchinfer.results_applied``)."""
        return self._last_report

    async def migrate(self) -> None:
        """Create or upgrade the schema and tables; idempotent and safe to run concurrently."""
        self._check_open()
        await self._store.migrate()

    async def create_batch(
        self,
        *,
        provider: str,
        endpoint: str,
        model: str,
        requests: Requests,
        metadata: Mapping[str, Any] | None = None,
        submit: bool = False,
        handler: str | None = None,
    ) -> Batch:
        """Validate every request, then store the batch and its completions in one transaction.

        ``requests`` is a list or (async) iterable of ``{"custom_id", "body", "metadata"?}``.
        Raises InvalidRequestError naming the first bad request; nothing is written then.
        With ``submit=True`` no provider call is made here: the batch is due for a worker (or
        for ``wait()``), which submits it. ``handler`` names the completion handler (see
        ``on_batch_end``) its worker runs once its results are applied.
        """
        self._check_open()
        if handler is not None and (not isinstance(handler, str) or not handler):
            raise InvalidRequestError("handler must be the non-empty name of a handler")
        return await self._submitter.create(
            provider=provider,
            endpoint=endpoint,
            model=model,
            requests=requests,
            metadata=metadata,
            submit=submit,
            handler=handler,
        )

    async def submit_batch(self, batch: BatchRef) -> Batch:
        """Upload the requests and start the provider batch. Only a pending batch is accepted."""
        self._check_open()
        return await self._submitter.submit(_batch_id(batch))

    async def fetch_batch_status(self, batch: BatchRef) -> BatchStatus:
        """Ask the provider, record what it says (never undoing a terminal status), return it."""
        self._check_open()
        return (await self._status.refresh(_batch_id(batch))).status

    async def cancel_batch(self, batch: BatchRef) -> BatchStatus:
        """Ask the provider to cancel; usually returns ``cancelling``. A batch created with
        ``submit=True`` that no worker has submitted yet is cancelled here, at no cost."""
        self._check_open()
        batch_id = _batch_id(batch)
        current = await self._store.batches.get(batch_id)
        if current.provider_batch_id is None and current.submit_requested_at is not None:
            await self._submitter.withdraw(batch_id)
            done, _ = await self._results.run(batch_id, force=True)
            return done.status
        return (await self._status.cancel(batch_id)).status

    async def fetch_batch_results(self, batch: BatchRef, *, force: bool = False) -> Batch:
        """Apply the output and error files, fail what is in neither, and total the costs.

        Idempotent: a second call, or one after a crash half-way, changes nothing applied.
        Raises ResultsNotReadyError while the provider's counts say a file is still to come;
        ``force=True`` applies what is there and fails the rest.
        """
        self._check_open()
        done, report = await self._results.run(_batch_id(batch), force=force)
        if report is not None:
            self._last_report = report
        return done

    # -- workers and handlers -----------------------------------------------------------------

    @overload
    def on_batch_end(self, handler: H, *, name: str | None = None) -> H: ...

    @overload
    def on_batch_end(
        self, handler: None = None, *, name: str | None = None
    ) -> Callable[[H], H]: ...

    def on_batch_end(
        self, handler: H | None = None, *, name: str | None = None
    ) -> H | Callable[[H], H]:
        """Register an async handler run by workers once a batch has ended and its results are
        applied: ``async def handler(batch)`` or ``async def handler(batch, conn)``.

        A named handler runs only for batches created with ``handler=name``; an unnamed one for
        every batch. One that takes ``conn`` (an ``AsyncConnection``) runs inside the
        transaction that records it as done, so its writes happen exactly once. Register the
        same handlers in every process that runs workers. Usable as a bare decorator.
        """

        def register(fn: H) -> H:
            self._handlers.register(fn, name=name)
            return fn

        return register(handler) if handler is not None else register

    def worker(
        self,
        *,
        poll_schedule: Sequence[float] = DEFAULT_POLL_SCHEDULE,
        lease_seconds: float = 30.0,
        max_age_seconds: float = 26 * 3600,
        handler_attempts: int = 5,
        concurrency: int = 4,
        idle_seconds: float = 5.0,
        shutdown_seconds: float = 5.0,
        clock: Clock | None = None,
    ) -> Worker:
        """A worker over this BatchInfer's database, providers and handlers.

        ``await worker.run()`` drives batches until cancelled; ``await worker.run_once()`` does
        one cycle. ``poll_schedule`` is the wait in seconds before each poll of a batch, the
        last repeating; ``lease_seconds`` how long a claim lasts unless renewed (a dead
        worker's batches are taken over after it); ``max_age_seconds`` when a batch still
        running (counted from submission) is cancelled and ended as expired;
        ``handler_attempts`` how often a failing handler is tried; ``concurrency`` how many
        batches one worker drives at once; ``idle_seconds`` how often an idle worker looks
        for due work when no notification wakes it. ``clock`` (returning an aware datetime)
        replaces the database's time for schedules, for tests.
        """
        self._check_open()
        options = WorkerOptions(
            poll_schedule=tuple(float(d) for d in poll_schedule),
            lease_seconds=lease_seconds,
            max_age_seconds=max_age_seconds,
            handler_attempts=handler_attempts,
            concurrency=concurrency,
            idle_seconds=idle_seconds,
            shutdown_seconds=shutdown_seconds,
        )
        return Worker(
            store=self._store,
            providers=self._providers,
            submitter=self._submitter,
            status=self._status,
            results=self._results,
            handlers=self._handlers,
            listener=self._listener,
            options=options,
            clock=clock,
            is_closed=lambda: self._closed,
        )

    async def stats(self) -> Stats:
        """Batches by status, the age of the oldest in-flight batch, and live workers: for an
        app's metrics."""
        self._check_open()
        by_status, oldest = await self._store.batches.stats()
        alive = await self._store.claims.workers_alive()
        return Stats(
            batches_by_status=by_status, oldest_in_flight_seconds=oldest, workers_alive=alive
        )

    async def wait(
        self,
        batch: BatchRef,
        *,
        poll_interval: float | None = None,
        on_poll: Callable[[Batch], Awaitable[None] | None] | None = None,
        max_step_failures: int | None = 10,
    ) -> Batch:
        """Return the batch once it has ended and its results are applied.

        While a worker is alive (in any process) this makes no provider call: it is woken by
        Postgres notifications, re-checking every ``poll_interval`` in case one is missed.
        With no worker alive it drives the batch itself: submits it if it was created with
        ``submit=True``, polls every ``poll_interval`` seconds, then applies the results.
        ``on_poll`` is called with the batch each time it is looked at (for progress). Errors
        worth retrying (provider or database) are logged and retried. Steps that keep failing,
        whoever drives the batch, end the wait with ``BatchStalledError`` naming the last
        error: after ``max_step_failures`` in a row, or 3 of an error that retrying cannot fix
        (a revoked key, a provider not configured); ``None`` waits through them all. To bound
        the wait, wrap the call in ``asyncio.timeout()``; the batch goes on.
        """
        self._check_open()
        interval = self.poll_interval if poll_interval is None else poll_interval
        if max_step_failures is not None and max_step_failures < 1:
            raise ValueError("max_step_failures must be at least 1 (or None)")
        return await self._waiter.wait(
            _batch_id(batch),
            interval=interval,
            on_poll=on_poll,
            max_step_failures=max_step_failures,
        )

    # -- reading ------------------------------------------------------------------------------

    async def get_batch(self, batch: BatchRef) -> Batch:
        self._check_open()
        return await self._store.batches.get(_batch_id(batch))

    async def list_batches(
        self,
        *,
        status: BatchStatus | str | None = None,
        metadata: Mapping[str, Any] | None = None,
        limit: int = 50,
    ) -> list[Batch]:
        """The newest batches first; ``metadata`` keeps those whose metadata contains it."""
        self._check_open()
        try:
            wanted = BatchStatus(status) if status is not None else None
        except ValueError:
            known = ", ".join(s.value for s in BatchStatus)
            raise InvalidRequestError(f"unknown batch status {status!r}; one of {known}") from None
        return await self._store.batches.find(
            status=wanted, metadata=dict(metadata) if metadata else None, limit=limit
        )

    async def completions(
        self, batch: BatchRef, *, status: CompletionStatus | str | None = None
    ) -> AsyncIterator[Completion]:
        """Every completion of a batch in request order, read a page at a time; an unknown
        batch id raises BatchNotFoundError (at the first iteration)."""
        self._check_open()
        try:
            wanted = CompletionStatus(status) if status is not None else None
        except ValueError:
            known = ", ".join(s.value for s in CompletionStatus)
            raise InvalidRequestError(
                f"unknown completion status {status!r}; one of {known}"
            ) from None
        async for page in self._store.completions.pages(_batch_id(batch), status=wanted):
            for completion in page:
                yield completion

    async def summary(self, batch: BatchRef) -> dict[str, Any]:
        """Counts by status and token totals of a batch's completions; an unknown batch id
        raises BatchNotFoundError."""
        self._check_open()
        return await self._store.completions.summary(_batch_id(batch))

    async def complete(
        self,
        *,
        provider: str,
        endpoint: str,
        model: str,
        body: Mapping[str, Any],
        custom_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Completion:
        """Send one request to the live endpoint now, store and return it as a Completion.

        The body is checked as a batch request would be and the response goes through the same
        parser and the same write as batch results; it is priced at the live rate.
        """
        self._check_open()
        return await self._live.complete(
            provider=provider,
            endpoint=endpoint,
            model=model,
            body=body,
            custom_id=custom_id or f"live-{uuid.uuid4()}",
            metadata=metadata,
        )


def redacted_url(url: str) -> str:
    """``url`` with any password masked: a URL may carry one; nothing printed does."""
    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)


def _asyncpg_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url
