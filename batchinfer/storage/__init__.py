"""Postgres storage: the tables, their migrations, and the only modules that write SQL."""

from __future__ import annotations

from batchinfer.storage.database import wrap_db_errors
from batchinfer.storage.results import ApplyResult
from batchinfer.storage.store import Store

__all__ = ["ApplyResult", "Store", "wrap_db_errors"]
