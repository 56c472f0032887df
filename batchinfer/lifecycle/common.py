"""What every flow shares: the configured providers, log events, and the shielded write."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, TypeVar

from batchinfer.domain import Batch, StepFailure
from batchinfer.errors import (
    BatchBusyError,
    BatchInferError,
    InvalidBatchError,
    PermanentProviderError,
    SchemaNotReadyError,
)
from batchinfer.providers.base import Provider

logger = logging.getLogger("batchinfer.lifecycle")

T = TypeVar("T")


class Providers:
    """The providers a BatchInfer was given, by name."""

    def __init__(self, providers: Mapping[str, Provider]) -> None:
        self.by_name = dict(providers)

    def get(self, name: str) -> Provider:
        try:
            return self.by_name[name]
        except KeyError:
            known = ", ".join(sorted(self.by_name)) or "none"
            raise InvalidBatchError(
                f"no provider named {name!r} is configured (configured: {known}); pass it in "
                "BatchInfer(providers=[...])"
            ) from None


async def finish_even_if_cancelled(write: Coroutine[Any, Any, T]) -> T:
    """Run the write that records outcomes to its end even if the caller is cancelled, then
    let the cancellation go on: nothing outlives the call, and nothing is left half-done."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # However many times we are cancelled meanwhile, the write ends first.
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: its error, if any, is not the news here
        raise


async def read_ahead(source: AsyncIterator[T]) -> AsyncIterator[T]:
    """``source``'s items, the next one already being fetched while the caller uses this one:
    the database reads the next page of requests while the provider receives the last."""
    pending: asyncio.Future[T] = asyncio.ensure_future(anext(source))
    try:
        while True:
            try:
                item = await pending
            except StopAsyncIteration:
                return
            pending = asyncio.ensure_future(anext(source))
            yield item
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        elif not pending.cancelled():
            pending.exception()  # retrieved; the caller stopped for its own reason
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()


def step_error(exc: BaseException) -> StepFailure:
    """What a failed step tells those waiting on the batch. Permanent: the same step will
    fail again until someone changes something (a key, the configuration, the code)."""
    if isinstance(exc, BatchBusyError):
        permanent = False
    elif isinstance(exc, PermanentProviderError | InvalidBatchError | SchemaNotReadyError):
        permanent = True
    else:
        # Anything outside the error tree is a bug, and a bug fails the same way again.
        permanent = not isinstance(exc, BatchInferError)
    return StepFailure(kind=type(exc).__name__, message=str(exc), permanent=permanent)


def extra(batch: Batch, **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "batchinfer.batch_id": str(batch.id),
        "batchinfer.provider": batch.provider,
        "batchinfer.provider_batch_id": batch.provider_batch_id,
    }
    values.update({f"batchinfer.{k}": v for k, v in fields.items()})
    return values


def log(event: str, batch: Batch, *, level: int = logging.INFO, **fields: Any) -> None:
    """One event: a stable name, the ids and key figures readable in the message itself, and
    every field in ``extra`` for structured handlers."""
    figures = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    ids = f"batch {batch.id}" + (
        f" ({batch.provider} {batch.provider_batch_id})" if batch.provider_batch_id else ""
    )
    logger.log(
        level,
        "batchinfer.%s %s%s",
        event,
        ids,
        f" {figures}" if figures else "",
        extra=extra(batch, event=event, **fields),
    )
