"""Run by alembic inside ``migrate()``: the connection and schema come from the caller."""

from __future__ import annotations

from alembic import context

from batchinfer.storage.tables import metadata

config = context.config
context.configure(
    connection=config.attributes["connection"],
    target_metadata=metadata,
    version_table_schema=config.attributes["schema"],
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
