"""The provider's own word for a batch's status, beside ours.

Providers name their statuses differently (Anthropic's ``ended``, Gemini's
``BATCH_STATE_SUCCEEDED``, xAI's none at all: read from counters); ours map onto one
vocabulary, and this keeps what the provider said (or what the counters amounted to) in a
column one can filter on.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import context, op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _schema() -> str:
    schema: str = context.config.attributes["schema_quoted"]
    return schema


def upgrade() -> None:
    s = _schema()
    op.execute(f"ALTER TABLE {s}.batches ADD COLUMN provider_status text")
    # Every batch before this version was OpenAI's, whose status field says it.
    op.execute(
        f"UPDATE {s}.batches SET provider_status = provider_response->>'status' "
        "WHERE provider_response IS NOT NULL"
    )


def downgrade() -> None:
    op.execute(f"ALTER TABLE {_schema()}.batches DROP COLUMN provider_status")
