"""``BatchInfer``: the facade, and the one place concrete parts are wired together."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import orjson
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from batchinfer.domain import (
    ApplyReport,
    Batch,
    BatchStatus,
    Completion,
    CompletionStatus,
)
from batchinfer.errors import (
    InvalidRequestError,
    ResultsNotReadyError,
    TransientProviderError,
)
from batchinfer.lifecycle import Lifecycle
from batchinfer.pricing import Price, Pricing
from batchinfer.providers.base import Provider
from batchinfer.storage.store import Store
from batchinfer.validation import Requests

logger = logging.getLogger(__name__)

BatchRef = Batch | uuid.UUID | str


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
    ) -> None:
        if apply_writers < 1 or apply_chunk_size < 1:
            raise ValueError("apply_writers and apply_chunk_size must be at least 1")
        if isinstance(database, AsyncEngine):
            self._engine, self._owns_engine = database, False
        elif isinstance(database, str):
            try:
                self._engine = create_async_engine(
                    _asyncpg_url(database),
                    json_serializer=lambda v: orjson.dumps(v).decode(),
                    json_deserializer=orjson.loads,
                    pool_size=max(5, apply_writers + 2),
                    pool_pre_ping=True,
                )
            except (SQLAlchemyError, ImportError, ValueError) as exc:
                raise ValueError(
                    f"cannot use {_redacted(database)!r} as a database: {exc}; give a "
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
        self.store = Store(self._engine, schema=schema)
        self._lifecycle = Lifecycle(
            self.store,
            {p.name: p for p in providers},
            Pricing(prices),
            apply_chunk_size=apply_chunk_size,
            apply_writers=apply_writers,
        )
        self.poll_interval = poll_interval
        self._sleep = sleep

    async def __aenter__(self) -> BatchInfer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the providers' own HTTP sessions and the engine, if it was created here."""
        for provider in self._lifecycle.providers.values():
            await provider.aclose()
        if self._owns_engine:
            await self._engine.dispose()

    @property
    def last_apply_report(self) -> ApplyReport | None:
        """Counts from the most recent fetch_batch_results pass that read files."""
        return self._lifecycle.last_report

    async def migrate(self) -> None:
        """Create or upgrade the schema and tables; idempotent and safe to run concurrently."""
        await self.store.migrate()

    async def create_batch(
        self,
        *,
        provider: str,
        endpoint: str,
        model: str,
        requests: Requests,
        metadata: Mapping[str, Any] | None = None,
    ) -> Batch:
        """Validate every request, then store the batch and its completions in one transaction.

        ``requests`` is a list or (async) iterable of ``{"custom_id", "body", "metadata"?}``.
        Raises InvalidRequestError naming the first bad request; nothing is written then.
        """
        return await self._lifecycle.create(
            provider=provider, endpoint=endpoint, model=model, requests=requests, metadata=metadata
        )

    async def submit_batch(self, batch: BatchRef) -> Batch:
        """Upload the requests and start the provider batch. Only a pending batch is accepted."""
        return await self._lifecycle.submit(_batch_id(batch))

    async def fetch_batch_status(self, batch: BatchRef) -> BatchStatus:
        """Ask the provider, record what it says (never undoing a terminal status), return it."""
        return (await self._lifecycle.refresh(_batch_id(batch))).status

    async def cancel_batch(self, batch: BatchRef) -> BatchStatus:
        """Ask the provider to cancel; usually returns ``cancelling``."""
        return (await self._lifecycle.cancel(_batch_id(batch))).status

    async def fetch_batch_results(self, batch: BatchRef, *, force: bool = False) -> Batch:
        """Apply the output and error files, fail what is in neither, and total the costs.

        Idempotent: a second call, or one after a crash half-way, changes nothing applied.
        Raises ResultsNotReadyError while the provider's counts say a file is still to come;
        ``force=True`` applies what is there and fails the rest.
        """
        return await self._lifecycle.fetch_results(_batch_id(batch), force=force)

    async def wait(
        self,
        batch: BatchRef,
        *,
        poll_interval: float | None = None,
        on_poll: Callable[[Batch], Awaitable[None] | None] | None = None,
    ) -> Batch:
        """Poll until the batch is terminal, then fetch its results and return it.

        ``on_poll`` is called with the batch after each poll (for progress reports). A poll that
        fails with a transient provider error is logged and tried again at the next interval.
        To bound the wait, wrap the call in ``asyncio.timeout()``; the batch goes on at the
        provider.
        """
        batch_id = _batch_id(batch)
        interval = self.poll_interval if poll_interval is None else poll_interval
        while True:
            try:
                current = await self._lifecycle.refresh(batch_id)
            except TransientProviderError as exc:
                # A batch runs for hours; one failed poll (already retried) is not the end.
                logger.warning(
                    "batchinfer.poll_failed",
                    extra={"batchinfer.batch_id": str(batch_id), "batchinfer.error": str(exc)},
                )
                await self._sleep(interval)
                continue
            if on_poll is not None:
                result = on_poll(current)
                if result is not None:
                    await result
            if current.is_terminal:
                try:
                    return await self._lifecycle.fetch_results(batch_id)
                except ResultsNotReadyError:
                    pass
            await self._sleep(interval)

    async def get_batch(self, batch: BatchRef) -> Batch:
        return await self.store.get_batch(_batch_id(batch))

    async def list_batches(
        self, *, status: BatchStatus | str | None = None, limit: int = 50
    ) -> list[Batch]:
        """The newest batches first."""
        wanted = BatchStatus(status) if status is not None else None
        return await self.store.list_batches(status=wanted, limit=limit)

    async def completions(
        self, batch: BatchRef, *, status: CompletionStatus | str | None = None
    ) -> AsyncIterator[Completion]:
        """Every completion of a batch in request order, read a page at a time."""
        wanted = CompletionStatus(status) if status is not None else None
        async for page in self.store.completion_pages(_batch_id(batch), status=wanted):
            for completion in page:
                yield completion

    async def summary(self, batch: BatchRef) -> dict[str, Any]:
        """Counts by status and token totals of a batch's completions."""
        return await self.store.summary(_batch_id(batch))

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
        return await self._lifecycle.complete_live(
            provider=provider,
            endpoint=endpoint,
            model=model,
            body=body,
            custom_id=custom_id or f"live-{uuid.uuid4()}",
            metadata=metadata,
        )


def _redacted(url: str) -> str:
    # A URL may carry a password; error messages never do.
    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)


def _asyncpg_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url
