"""Room on each page of completions for the row a result makes of it (fillfactor 50).

A completion is written twice: its request at create, then its result, which about doubles the
row. With full pages the second version went to another page and every index of the table got
a new entry for it; with half of each page left free it stays on its page as a heap-only
update, and no index is touched. Pages written from now on keep the room; existing ones are
not rewritten.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import context, op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _schema() -> str:
    schema: str = context.config.attributes["schema_quoted"]
    return schema


def upgrade() -> None:
    op.execute(f"ALTER TABLE {_schema()}.completions SET (fillfactor = 50)")


def downgrade() -> None:
    op.execute(f"ALTER TABLE {_schema()}.completions RESET (fillfactor)")
