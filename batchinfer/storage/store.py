"""The storage layer in one object: the engine and schema, and a store per concern.

Only ``storage`` writes SQL. Each store hands back frozen domain objects, never rows.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer.storage.batches import BatchStore
from batchinfer.storage.claims import Claims
from batchinfer.storage.completions import CompletionStore
from batchinfer.storage.database import Database
from batchinfer.storage.handlers import HandlerStore
from batchinfer.storage.results import ResultStore
from batchinfer.storage.schema import migrate


class Store:
    """Batches, claims, results, completions and handler records in one schema."""

    def __init__(self, engine: AsyncEngine, *, schema: str = "batchinfer") -> None:
        self.db = Database(engine, schema=schema)
        self.schema = schema
        self.batches = BatchStore(self.db)
        self.claims = Claims(self.db)
        self.results = ResultStore(self.db)
        self.completions = CompletionStore(self.db)
        self.handlers = HandlerStore(self.db)

    async def migrate(self) -> None:
        await migrate(self.db)
