"""``migrate()``: create or upgrade the schema with alembic, one process at a time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import sqlalchemy as sa

from batchinfer.storage.database import Database, wrap_db_errors


async def migrate(db: Database, *, revision: str = "head") -> None:
    """Create the schema and tables, or upgrade them; safe to call from many processes.

    ``revision`` stops at an older version (tests of the upgrades themselves)."""
    lock_key = int.from_bytes(hashlib.sha256(db.schema.encode()).digest()[:8], "big") >> 1
    with wrap_db_errors("migrating the schema"):
        async with db.engine.connect() as conn:
            # Two apps starting at once must not both create the tables. The lock is the
            # session's: on any error the connection is dropped, which releases it.
            await conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": lock_key})
            try:
                exists = (
                    await conn.execute(
                        sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :s"),
                        {"s": db.schema},
                    )
                ).first()
                if exists is None:  # CREATE SCHEMA needs a right the app may not have
                    await conn.execute(sa.text(f"CREATE SCHEMA {db.q}"))
                await conn.commit()
                await conn.run_sync(_upgrade, db, revision)
                await conn.commit()
            except BaseException:
                await conn.invalidate()
                raise
            await conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key})
            await conn.commit()


def _upgrade(sync_conn: sa.Connection, db: Database, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes.update(connection=sync_conn, schema=db.schema, schema_quoted=db.q)
    command.upgrade(config, revision)
