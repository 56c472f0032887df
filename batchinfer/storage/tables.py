"""The two tables, as SQLAlchemy Core. They carry no schema name: the store maps ``None`` to the
configured schema (``batchinfer`` by default), so the app's own tables are never touched."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON, JSONB, TIMESTAMP

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

BATCH_STATUSES = (
    "pending",
    "validating",
    "in_progress",
    "finalizing",
    "cancelling",
    "completed",
    "failed",
    "expired",
    "cancelled",
)
COMPLETION_STATUSES = ("pending", "submitted", "completed", "failed")

#: USD; 12 decimals keep a single token at a fraction of a cent per million exact.
Money = Numeric(20, 12)
Timestamp = TIMESTAMP(timezone=True)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


batches = Table(
    "batches",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("provider", Text, nullable=False),
    Column("endpoint", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("provider_batch_id", Text),
    Column("input_file_id", Text),
    Column("output_file_id", Text),
    Column("error_file_id", Text),
    Column("request_total", Integer, nullable=False),
    Column("input_bytes", BigInteger, nullable=False),
    Column("counts_total", Integer, nullable=False, server_default="0"),
    Column("counts_completed", Integer, nullable=False, server_default="0"),
    Column("counts_failed", Integer, nullable=False, server_default="0"),
    Column("provider_errors", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("provider_response", JSONB),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("failure_reason", Text),
    Column("input_cost", Money),
    Column("output_cost", Money),
    Column("total_cost", Money),
    Column("created_at", Timestamp, nullable=False, server_default=func.now()),
    Column("updated_at", Timestamp, nullable=False, server_default=func.now()),
    Column("submitted_at", Timestamp),
    Column("ended_at", Timestamp),
    Column("results_applied_at", Timestamp),
    # When a worker should next look at it (submit, poll); NULL is "now".
    Column("next_poll_at", Timestamp),
    Column("poll_count", Integer, nullable=False, server_default="0"),
    # Created with submit=True: a worker submits it.
    Column("submit_requested_at", Timestamp),
    # The one claim, for submitters and workers alike: whoever holds it until claimed_until
    # (renewed while working) is the only one driving the batch. A dead holder's claim lapses.
    Column("claimed_by", Text),
    Column("claimed_until", Timestamp),
    # Completion handlers: the batch's named one, the keys of those that returned, retries.
    Column("handler", Text),
    Column("handlers_done", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("handler_attempts", Integer, nullable=False, server_default="0"),
    Column("handler_error", Text),
    Column("handler_next_at", Timestamp),
    Column("handler_dispatched_at", Timestamp),
    Column("handler_gave_up_at", Timestamp),
    # The provider's copies of our files, deleted once the results are in our rows.
    Column("files_deleted_at", Timestamp),
    # Where the provider keeps the results, in its own terms (domain.ResultSources).
    Column("result_sources", JSONB),
    # A submit's notes for its own retry, in the provider's terms (the input file id is kept
    # in input_file_id, as the provider's copy of the requests).
    Column("submit_state", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    # Steps that failed in a row (reset by one that goes through), and the last failure, so a
    # waiter in another process sees a batch nobody can move.
    Column("step_failures", Integer, nullable=False, server_default="0"),
    Column("last_error", JSONB),
    # The provider's own word for the status ("ended", "BATCH_STATE_SUCCEEDED"), beside ours.
    Column("provider_status", Text),
    CheckConstraint(_in("status", BATCH_STATUSES), name="status"),
    Index(
        "ix_batches_provider_provider_batch_id",
        "provider",
        "provider_batch_id",
        unique=True,
        postgresql_where=text("provider_batch_id IS NOT NULL"),
    ),
    Index(
        "ix_batches_open",
        "next_poll_at",
        postgresql_where=text(
            "results_applied_at IS NULL "
            "AND (provider_batch_id IS NOT NULL OR submit_requested_at IS NOT NULL)"
        ),
    ),
    Index(
        "ix_batches_handlers_due",
        "handler_next_at",
        postgresql_where=text(
            "results_applied_at IS NOT NULL AND handler_dispatched_at IS NULL "
            "AND handler_gave_up_at IS NULL"
        ),
    ),
    Index("ix_batches_metadata", "metadata", postgresql_using="gin"),
    Index(
        "ix_batches_files_due",
        "next_poll_at",
        postgresql_where=text("results_applied_at IS NOT NULL AND files_deleted_at IS NULL"),
    ),
)

#: Live workers, so wait() knows whether anyone else is driving batches.
workers = Table(
    "workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Timestamp, nullable=False, server_default=func.now()),
    Column("alive_until", Timestamp, nullable=False),
)

completions = Table(
    "completions",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("batch_id", Uuid, ForeignKey("batches.id", ondelete="CASCADE")),
    Column("custom_id", Text, nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),
    # json, not jsonb: the body is sent byte for byte as given, keys in the caller's order
    # (property order in a JSON schema changes what a model generates).
    Column("request_body", JSON, nullable=False),
    Column("response_body", JSONB),
    Column("output_text", Text),
    Column("tool_calls", JSONB),
    Column("finish_reason", Text),
    Column("status_code", Integer),
    Column("provider_request_id", Text),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("total_tokens", Integer),
    Column("cached_tokens", Integer),
    Column("reasoning_tokens", Integer),
    Column("input_cost", Money),
    Column("output_cost", Money),
    Column("total_cost", Money),
    Column("failure_error", Text),
    Column("failure_reason", Text),
    Column("started_at", Timestamp),
    Column("completed_at", Timestamp),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("cache_write_tokens", Integer),
    CheckConstraint(_in("status", COMPLETION_STATUSES), name="status"),
    # Also the index every per-batch statement uses (batch_id is its first column).
    Index("uq_completions_batch_id_custom_id", "batch_id", "custom_id", unique=True),
    # Request order: the upload and completions() page through a batch by line number.
    Index("uq_completions_batch_id_line_no", "batch_id", "line_no", unique=True),
)
