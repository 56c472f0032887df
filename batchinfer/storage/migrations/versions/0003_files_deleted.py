"""When the provider's files were deleted; lz4 on the remaining wide columns.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _schema() -> str:
    schema: str = context.config.attributes["schema_quoted"]
    return schema


def upgrade() -> None:
    s = _schema()
    # A process that dies between applying results and deleting the files leaves this NULL,
    # so the deletion is done by whoever looks at the batch next.
    op.execute(f"ALTER TABLE {s}.batches ADD COLUMN files_deleted_at timestamptz")
    # Batches finished before this version keep their files: deleting them is not expected.
    op.execute(f"""
        UPDATE {s}.batches SET files_deleted_at = results_applied_at
        WHERE results_applied_at IS NOT NULL
    """)
    op.execute(f"""
        CREATE INDEX ix_batches_files_due ON {s}.batches (next_poll_at)
        WHERE results_applied_at IS NOT NULL AND files_deleted_at IS NULL
    """)
    op.execute(f"""
        DO $$
        BEGIN
            IF EXISTS (
                SELECT 1 FROM pg_settings
                WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)
            ) THEN
                ALTER TABLE {s}.completions
                    ALTER COLUMN output_text SET COMPRESSION lz4,
                    ALTER COLUMN tool_calls SET COMPRESSION lz4;
            END IF;
        END
        $$
    """)


def downgrade() -> None:
    s = _schema()
    op.execute(f"DROP INDEX {s}.ix_batches_files_due")
    op.execute(f"ALTER TABLE {s}.batches DROP COLUMN files_deleted_at")
