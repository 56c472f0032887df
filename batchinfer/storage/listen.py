"""LISTEN on one connection, shared by every waiter in the process.

Waiters subscribe to a key (a batch id, or an event name such as ``due``) and are woken when a
committed transaction sends a matching notification. Should the connection fail, waiters
still wake on their own timeouts, and the next subscription connects again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from batchinfer.errors import BatchInferError
from batchinfer.storage.database import Database, wrap_db_errors

logger = logging.getLogger(__name__)


class Listener:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: AsyncConnection | None = None
        self._driver: Any = None
        self._lock = asyncio.Lock()
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._driver is not None and not self._driver.is_closed()

    async def _connect(self) -> None:
        async with self._lock:
            if self.connected or self._closed:
                return
            await self._drop()
            with wrap_db_errors("listening for batch events"):
                conn = await self.db.engine.connect()
                try:
                    driver: Any = (await conn.get_raw_connection()).driver_connection
                    await driver.add_listener(self.db.channel, self._on_notify)
                except BaseException:
                    await conn.invalidate()
                    raise
            self._conn, self._driver = conn, driver

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        event, _, key = payload.partition(" ")
        for name in (event, key):
            for waiter in self._waiters.get(name, ()):
                waiter.set()

    async def ensure(self) -> None:
        """Connect again if the listening connection was lost (a database restart)."""
        if self.connected or self._closed or not self._waiters:
            return
        try:
            await self._connect()
        except BatchInferError as exc:
            logger.warning(
                "batchinfer.listen_failed %s: waiting on timeouts only",
                exc,
                extra={"batchinfer.event": "listen_failed", "batchinfer.error": str(exc)},
            )

    @asynccontextmanager
    async def subscribe(self, key: str) -> AsyncIterator[asyncio.Event]:
        """An event set by the next notification about ``key``; subscribe before reading the
        state it concerns, so a change in between is not missed."""
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            await self.ensure()
            yield event
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[key]

    async def _drop(self) -> None:
        conn, self._conn, self._driver = self._conn, None, None
        if conn is not None:
            # Never back to the pool: the session still LISTENs.
            try:
                await conn.invalidate()
            except Exception:
                logger.debug("closing the listening connection failed", exc_info=True)

    async def aclose(self) -> None:
        self._closed = True
        async with self._lock:
            await self._drop()
