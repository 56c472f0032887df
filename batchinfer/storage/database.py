"""The engine, the schema it writes in, transactions, and the translation of database errors.

Every storage module goes through one ``Database``: statements name tables without a schema and
the engine maps them to the configured one, so the app's own tables are never touched.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import asyncpg
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchinfer.errors import (
    DataRejectedError,
    SchemaNotReadyError,
    StorageError,
    TransientStorageError,
)

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_UNDEFINED = {"42P01", "3F000", "42703"}  # undefined_table, invalid_schema_name, undefined_column
# Connection lost, admin shutdown, serialization/deadlock, lock or statement timeout: the same
# statement may well succeed when run again.
_TRANSIENT_CLASSES = ("08", "40", "57", "53")
_TRANSIENT_STATES = {"55P03"}


@contextmanager
def wrap_db_errors(what: str) -> Iterator[None]:
    """Translate SQLAlchemy/asyncpg errors into batchinfer's, naming the operation."""
    try:
        yield
    except (SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # The raw driver is used for COPY and LISTEN, so its errors arrive here too, unwrapped.
        orig = getattr(exc, "orig", exc)
        sqlstate = getattr(orig, "sqlstate", None) or ""
        if sqlstate in _UNDEFINED:
            raise SchemaNotReadyError(
                f"{what}: the batchinfer tables do not exist or are older than this version; "
                "call `await bi.migrate()` once (it is idempotent)"
            ) from exc
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, str):
            detail = detail.splitlines()[0]
        error: type[StorageError] = StorageError
        if sqlstate.startswith("22"):
            error = DataRejectedError
        elif (
            sqlstate.startswith(_TRANSIENT_CLASSES)
            or sqlstate in _TRANSIENT_STATES
            or getattr(exc, "connection_invalidated", False)
            or isinstance(orig, asyncpg.InterfaceError | ConnectionError)
        ):
            error = TransientStorageError
        raise error(f"{what}: {type(orig).__name__}: {detail}") from exc
    except OSError as exc:
        raise TransientStorageError(f"{what}: cannot reach the database ({exc})") from exc


class Database:
    """An engine bound to one schema."""

    def __init__(self, engine: AsyncEngine, *, schema: str = "batchinfer") -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(
                f"schema {schema!r} must be a lower-case SQL identifier (letters, digits, _)"
            )
        self.schema = schema
        #: The engine as the caller gave it: a handler's transaction runs on it, so the app's
        #: own tables keep their names.
        self.raw_engine = engine
        self.translate = {"schema_translate_map": {None: schema}}
        self.engine = engine.execution_options(**self.translate)
        #: The quoted schema, for the few statements written as text.
        self.q = engine.dialect.identifier_preparer.quote_schema(schema)
        #: The channel NOTIFY events of this schema go out on (a channel name is an identifier).
        self.channel = f"batchinfer_{schema}"[:63]

    @asynccontextmanager
    async def tx(self, what: str) -> AsyncIterator[AsyncConnection]:
        with wrap_db_errors(what):
            async with self.engine.begin() as conn:
                yield conn

    @asynccontextmanager
    async def connect(self, what: str) -> AsyncIterator[AsyncConnection]:
        with wrap_db_errors(what):
            async with self.engine.connect() as conn:
                yield conn

    async def notify(self, conn: AsyncConnection, payload: str) -> None:
        """Sent when ``conn``'s transaction commits, and only then."""
        await conn.execute(
            sa.text("SELECT pg_notify(:channel, :payload)"),
            {"channel": self.channel, "payload": payload},
        )
