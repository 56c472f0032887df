"""Workers: one claim for submitters and workers, poll scheduling, completion handlers.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _schema() -> str:
    schema: str = context.config.attributes["schema_quoted"]
    return schema


def upgrade() -> None:
    s = _schema()
    # A submit lease that outlived its holder blocked retries for minutes; the claim that
    # replaces it is renewed while its holder works, so it can be short.
    op.execute(f"""
        ALTER TABLE {s}.batches
            DROP COLUMN submit_lease_until,
            ADD COLUMN poll_count integer DEFAULT 0 NOT NULL,
            ADD COLUMN submit_requested_at timestamptz,
            ADD COLUMN claimed_by text,
            ADD COLUMN claimed_until timestamptz,
            ADD COLUMN handler text,
            ADD COLUMN handlers_done text[] DEFAULT '{{}}'::text[] NOT NULL,
            ADD COLUMN handler_attempts integer DEFAULT 0 NOT NULL,
            ADD COLUMN handler_error text,
            ADD COLUMN handler_next_at timestamptz,
            ADD COLUMN handler_dispatched_at timestamptz,
            ADD COLUMN handler_gave_up_at timestamptz
    """)
    # Batches whose results were applied before workers existed are not handlers' business.
    op.execute(f"""
        UPDATE {s}.batches SET handler_dispatched_at = results_applied_at
        WHERE results_applied_at IS NOT NULL
    """)
    # Only what a worker may take: a pending batch nobody asked to submit is not scanned.
    op.execute(f"DROP INDEX {s}.ix_batches_open")
    op.execute(f"""
        CREATE INDEX ix_batches_open ON {s}.batches (next_poll_at)
        WHERE results_applied_at IS NULL
            AND (provider_batch_id IS NOT NULL OR submit_requested_at IS NOT NULL)
    """)
    op.execute(f"""
        CREATE INDEX ix_batches_handlers_due ON {s}.batches (handler_next_at)
        WHERE results_applied_at IS NOT NULL AND handler_dispatched_at IS NULL
            AND handler_gave_up_at IS NULL
    """)
    op.execute(f"CREATE INDEX ix_batches_metadata ON {s}.batches USING gin (metadata)")
    op.execute(f"""
        CREATE TABLE {s}.workers (
            id text NOT NULL,
            hostname text NOT NULL,
            pid integer NOT NULL,
            started_at timestamptz DEFAULT now() NOT NULL,
            alive_until timestamptz NOT NULL,
            CONSTRAINT pk_workers PRIMARY KEY (id)
        )
    """)


def downgrade() -> None:
    s = _schema()
    op.execute(f"DROP TABLE {s}.workers")
    op.execute(f"DROP INDEX {s}.ix_batches_metadata")
    op.execute(f"DROP INDEX {s}.ix_batches_handlers_due")
    op.execute(f"DROP INDEX {s}.ix_batches_open")
    op.execute(
        f"CREATE INDEX ix_batches_open ON {s}.batches (next_poll_at) "
        "WHERE results_applied_at IS NULL"
    )
    op.execute(f"""
        ALTER TABLE {s}.batches
            ADD COLUMN submit_lease_until timestamptz,
            DROP COLUMN poll_count,
            DROP COLUMN submit_requested_at,
            DROP COLUMN claimed_by,
            DROP COLUMN claimed_until,
            DROP COLUMN handler,
            DROP COLUMN handlers_done,
            DROP COLUMN handler_attempts,
            DROP COLUMN handler_error,
            DROP COLUMN handler_next_at,
            DROP COLUMN handler_dispatched_at,
            DROP COLUMN handler_gave_up_at
    """)
