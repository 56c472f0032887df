"""Provider-neutral batches: where the results are, as a list of sources rather than two
files; a submit's notes for its own retry; the steps that keep failing; tokens written to a
provider's prompt cache.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _schema() -> str:
    schema: str = context.config.attributes["schema_quoted"]
    return schema


def upgrade() -> None:
    s = _schema()
    # NULL: the provider has not said yet (a batch not submitted).
    op.execute(f"ALTER TABLE {s}.batches ADD COLUMN result_sources jsonb")
    op.execute(f"ALTER TABLE {s}.batches ADD COLUMN submit_state jsonb NOT NULL DEFAULT '{{}}'")
    op.execute(f"ALTER TABLE {s}.batches ADD COLUMN step_failures integer NOT NULL DEFAULT 0")
    op.execute(f"ALTER TABLE {s}.batches ADD COLUMN last_error jsonb")
    op.execute(f"ALTER TABLE {s}.completions ADD COLUMN cache_write_tokens integer")
    # Every batch submitted before this version went through the OpenAI adapter: its sources
    # are its output and error files, and what is still to come is judged by its counts, as
    # that adapter now does on every poll.
    op.execute(f"""
        UPDATE {s}.batches SET result_sources = jsonb_build_object(
            'sources', (
                SELECT coalesce(jsonb_agg(
                    jsonb_build_object('key', f.key, 'ref', f.ref, 'deletable', true)
                    ORDER BY f.n), '[]'::jsonb)
                FROM (VALUES (1, 'output', output_file_id), (2, 'error', error_file_id))
                    AS f(n, key, ref)
                WHERE f.ref IS NOT NULL
            ),
            'waiting_for', CASE
                WHEN counts_completed > 0 AND output_file_id IS NULL
                    THEN counts_completed || ' completed requests but no output file yet'
                WHEN counts_failed > 0 AND error_file_id IS NULL
                    THEN counts_failed || ' failed requests but no error file yet'
                WHEN status = 'completed' AND output_file_id IS NULL AND error_file_id IS NULL
                    THEN 'neither an output nor an error file yet'
            END,
            'described_as', 'the output or error file'
        )
        WHERE provider_batch_id IS NOT NULL
    """)


def downgrade() -> None:
    s = _schema()
    op.execute(f"ALTER TABLE {s}.completions DROP COLUMN cache_write_tokens")
    op.execute(f"ALTER TABLE {s}.batches DROP COLUMN last_error")
    op.execute(f"ALTER TABLE {s}.batches DROP COLUMN step_failures")
    op.execute(f"ALTER TABLE {s}.batches DROP COLUMN submit_state")
    op.execute(f"ALTER TABLE {s}.batches DROP COLUMN result_sources")
