"""Completion handlers: registered by name (or not), run once a batch's results are applied.

A batch runs its named handler, then every unnamed one. Each handler that returns is recorded
and never runs again. One that takes a second parameter gets the connection of the
transaction that records it, so its writes and that record commit together or not at all:
exactly once even if the process dies mid-handler. A plain handler is at-least-once.
A handler that raises is retried with backoff, up to a limit.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from batchinfer.domain import Batch
from batchinfer.lifecycle.common import log
from batchinfer.storage.store import Store

PlainHandler = Callable[[Batch], Awaitable[None]]
TransactionalHandler = Callable[[Batch, AsyncConnection], Awaitable[None]]
BatchHandler = PlainHandler | TransactionalHandler

_ERROR_LENGTH = 2_000


@dataclass(frozen=True, slots=True)
class Registered:
    key: str
    fn: Callable[..., Awaitable[None]]
    transactional: bool


class Handlers:
    """The handlers registered in this process (every process running workers registers the
    same ones, as tasks are in a task queue)."""

    def __init__(self) -> None:
        self.named: dict[str, Registered] = {}
        self.unnamed: dict[str, Registered] = {}

    def register(self, fn: BatchHandler, *, name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"a batch handler must be an async function, not {fn!r}")
        try:
            params = [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"cannot read the parameters of handler {fn!r}: {exc}") from exc
        if not 1 <= len(params) <= 2:
            raise TypeError(
                f"handler {fn!r} must take (batch) or (batch, connection), not {len(params)} "
                "positional parameters"
            )
        if name is not None:
            if not name or len(name) > 200:
                raise ValueError("a handler name must be 1 to 200 characters")
            if name in self.named and self.named[name].fn is not fn:
                raise ValueError(f"a different handler is already registered as {name!r}")
            key = f"name:{name}"
            self.named[name] = Registered(key, fn, len(params) == 2)
        else:
            # Its record must name it the same in every process and after every restart.
            qualname = getattr(fn, "__qualname__", None)
            if not isinstance(qualname, str) or "<lambda>" in qualname:
                raise TypeError(
                    f"handler {fn!r} has no stable name to record it by (a lambda, a partial, "
                    "a callable object): define it with `async def`"
                )
            key = f"fn:{getattr(fn, '__module__', '?')}.{qualname}"
            if key in self.unnamed and self.unnamed[key].fn is not fn:
                raise ValueError(
                    f"another handler is already registered as {key[3:]}; two handlers made by "
                    "one factory share a name: give each its own `async def`"
                )
            self.unnamed[key] = Registered(key, fn, len(params) == 2)

    def plan(self, batch: Batch) -> list[Registered] | None:
        """The handlers ``batch`` runs, in order; None if it names one this process lacks."""
        first: list[Registered] = []
        if batch.handler is not None:
            if batch.handler not in self.named:
                return None
            first.append(self.named[batch.handler])
        return first + list(self.unnamed.values())


def retry_delay(attempt: int) -> float:
    """About a second after the first failure, doubling, at most a minute."""
    return float(min(2 ** (attempt - 1), 60))


class Dispatcher:
    def __init__(
        self,
        store: Store,
        handlers: Handlers,
        *,
        attempts: int = 5,
        claimed_by: str | None = None,
        claim_seconds: float = 30.0,
    ) -> None:
        if attempts < 1:
            raise ValueError("handler_attempts must be at least 1")
        self.store = store
        self.handlers = handlers
        self.attempts = attempts
        self.claimed_by = claimed_by
        self.claim_seconds = claim_seconds

    async def dispatch(self, batch: Batch, *, now: datetime | None = None) -> Batch:
        """Run what has not yet returned; record success, or the error and when to retry."""
        plan = self.handlers.plan(batch)
        if plan is None:
            return batch  # it waits for a process that knows its handler
        for handler in plan:
            if handler.key in batch.handlers_done:
                continue
            try:
                await self._run(batch, handler)
            except Exception as exc:
                return await self._failed(batch, handler, exc, now)
            log("handler_dispatched", batch, handler=handler.key)
        batch = await self.store.handlers.record_dispatched(batch.id)
        log("handlers_done", batch, handlers=len(plan), attempts=batch.handler_attempts + 1)
        return batch

    async def _run(self, batch: Batch, handler: Registered) -> None:
        record = self.store.handlers.dispatch(
            batch.id, handler.key, claimed_by=self.claimed_by, claim_seconds=self.claim_seconds
        )
        if handler.transactional:
            async with record as conn:
                if conn is not None:
                    await handler.fn(batch, conn)
            return
        await handler.fn(batch)
        async with record:
            pass

    async def _failed(
        self, batch: Batch, handler: Registered, exc: Exception, now: datetime | None
    ) -> Batch:
        attempt = batch.handler_attempts + 1
        error = f"{handler.key}: {type(exc).__name__}: {exc}"[:_ERROR_LENGTH]
        retry_in = retry_delay(attempt) if attempt < self.attempts else None
        batch = await self.store.handlers.record_failure(
            batch.id, error=error, retry_in=retry_in, now=now
        )
        fields: dict[str, Any] = {"handler": handler.key, "attempt": attempt, "error": error}
        if retry_in is None:
            log("handler_gave_up", batch, level=logging.ERROR, **fields)
        else:
            log("handler_failed", batch, level=logging.WARNING, retry_in=retry_in, **fields)
        return batch
