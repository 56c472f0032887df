"""Postgres storage: the tables, their migrations, and the one module that writes SQL."""

from __future__ import annotations

from batchinfer.storage.store import ApplyResult, Store

__all__ = ["ApplyResult", "Store"]
