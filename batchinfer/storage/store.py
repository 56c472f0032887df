"""The only module that writes SQL. It hands back frozen domain objects, never rows.

Hot paths are single bulk statements: completions go in with COPY, results are applied a chunk
at a time with one ``UPDATE ... FROM jsonb_to_recordset(...)``, and every write is conditional on
the row's current status, so re-running any step changes nothing already done.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchinfer.domain import (
    Batch,
    BatchStatus,
    Completion,
    CompletionStatus,
    NewRequest,
    ProviderBatch,
    ResultOutcome,
)
from batchinfer.errors import (
    BatchNotFoundError,
    DataRejectedError,
    InvalidBatchError,
    SchemaNotReadyError,
    StorageError,
)
from batchinfer.storage.rows import (
    batch_from_row,
    completion_from_row,
    dumps,
    outcome_rows,
    provider_values,
)
from batchinfer.storage.tables import batches, completions

logger = logging.getLogger(__name__)

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TERMINAL = ("completed", "failed")
_COPY_CHUNK = 5_000
_COMPLETION_COLUMNS = ("batch_id", "custom_id", "line_no", "status", "request_body", "metadata")
_UNDEFINED = {"42P01", "3F000"}  # undefined_table, invalid_schema_name
_UNSUBMITTED = sa.and_(
    batches.c.status == BatchStatus.PENDING.value, batches.c.provider_batch_id.is_(None)
)


@contextmanager
def wrap_db_errors(what: str) -> Iterator[None]:
    """Translate SQLAlchemy/asyncpg errors into batchinfer's, naming the operation."""
    try:
        yield
    except (SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # The raw driver is used for COPY, so its errors arrive here too, unwrapped.
        orig = getattr(exc, "orig", exc)
        sqlstate = getattr(orig, "sqlstate", None) or ""
        if sqlstate in _UNDEFINED:
            raise SchemaNotReadyError(
                f"{what}: the batchinfer tables do not exist yet; call `await bi.migrate()` "
                "once (it is idempotent)"
            ) from exc
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, str):
            detail = detail.splitlines()[0]
        error = DataRejectedError if sqlstate.startswith("22") else StorageError
        raise error(f"{what}: {type(orig).__name__}: {detail}") from exc
    except OSError as exc:
        raise StorageError(f"{what}: cannot reach the database ({exc})") from exc


class _SourceError(Exception):
    """An error raised by the caller's request iterator, carried past the DB error mapping."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


async def _guarded(requests: AsyncIterator[NewRequest]) -> AsyncIterator[NewRequest]:
    while True:
        try:
            item = await anext(requests)
        except StopAsyncIteration:
            return
        except Exception as exc:
            raise _SourceError(exc) from exc
        yield item


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    already_applied: list[str]
    unknown: list[str]


class Store:
    """Batches and completions in Postgres, inside one schema."""

    def __init__(self, engine: AsyncEngine, *, schema: str = "batchinfer") -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(
                f"schema {schema!r} must be a lower-case SQL identifier (letters, digits, _)"
            )
        self.schema = schema
        self._engine = engine.execution_options(schema_translate_map={None: schema})
        self._q = engine.dialect.identifier_preparer.quote_schema(schema)

    # -- schema -------------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Create the schema and tables, or upgrade them; safe to call from many processes."""
        lock_key = int.from_bytes(hashlib.sha256(self.schema.encode()).digest()[:8], "big") >> 1
        with wrap_db_errors("migrating the schema"):
            async with self._engine.connect() as conn:
                # Two apps starting at once must not both create the tables. The lock is the
                # session's: on any error the connection is dropped, which releases it.
                await conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": lock_key})
                try:
                    exists = (
                        await conn.execute(
                            sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :s"),
                            {"s": self.schema},
                        )
                    ).first()
                    if exists is None:  # CREATE SCHEMA needs a right the app may not have
                        await conn.execute(sa.text(f"CREATE SCHEMA {self._q}"))
                    await conn.commit()
                    await conn.run_sync(self._upgrade)
                    await conn.commit()
                except BaseException:
                    await conn.invalidate()
                    raise
                await conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key})
                await conn.commit()

    def _upgrade(self, sync_conn: sa.Connection) -> None:
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        config.attributes.update(connection=sync_conn, schema=self.schema, schema_quoted=self._q)
        command.upgrade(config, "head")

    @asynccontextmanager
    async def _tx(self, what: str) -> AsyncIterator[AsyncConnection]:
        with wrap_db_errors(what):
            async with self._engine.begin() as conn:
                yield conn

    # -- batches ------------------------------------------------------------------------------

    async def create_batch(
        self,
        *,
        provider: str,
        endpoint: str,
        model: str,
        metadata: dict[str, Any],
        requests: AsyncIterator[NewRequest],
    ) -> Batch:
        """The batch row and every completion row (COPY, in chunks), in one transaction."""
        batch_id = uuid.uuid4()
        try:
            async with self._tx("creating the batch") as conn:
                await conn.execute(
                    batches.insert().values(
                        id=batch_id,
                        provider=provider,
                        endpoint=endpoint,
                        model=model,
                        status=BatchStatus.PENDING.value,
                        request_total=0,
                        input_bytes=0,
                        metadata=metadata,
                    )
                )
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                count, size = 0, 0
                records: list[tuple[Any, ...]] = []

                async def flush() -> None:
                    await driver.copy_records_to_table(
                        "completions",
                        schema_name=self.schema,
                        columns=_COMPLETION_COLUMNS,
                        records=records,
                    )
                    records.clear()

                async for req in _guarded(requests):
                    count += 1
                    size += req.line_bytes
                    records.append(
                        (
                            batch_id,
                            req.custom_id,
                            req.line_no,
                            CompletionStatus.PENDING.value,
                            req.body_json.decode(),
                            dumps(req.metadata),
                        )
                    )
                    if len(records) >= _COPY_CHUNK:
                        await flush()
                if records:
                    await flush()
                row = (
                    await conn.execute(
                        batches.update()
                        .where(batches.c.id == batch_id)
                        .values(request_total=count, input_bytes=size)
                        .returning(batches)
                    )
                ).one()
        except _SourceError as exc:
            # Rolled back; the caller sees its own iterator's error, not a database one.
            raise exc.original from exc.original.__cause__
        return batch_from_row(row)

    async def get_batch(self, batch_id: uuid.UUID) -> Batch:
        with wrap_db_errors(f"reading batch {batch_id}"):
            async with self._engine.connect() as conn:
                row = (
                    await conn.execute(sa.select(batches).where(batches.c.id == batch_id))
                ).one_or_none()
        if row is None:
            raise BatchNotFoundError(f"no batch {batch_id} in schema {self.schema!r}")
        return batch_from_row(row)

    async def list_batches(
        self, *, status: BatchStatus | None = None, limit: int = 50
    ) -> list[Batch]:
        query = sa.select(batches).order_by(batches.c.created_at.desc()).limit(limit)
        if status is not None:
            query = query.where(batches.c.status == status.value)
        with wrap_db_errors("listing batches"):
            async with self._engine.connect() as conn:
                return [batch_from_row(r) for r in await conn.execute(query)]

    async def request_pages(
        self, batch_id: uuid.UUID, *, page_size: int = 2_000
    ) -> AsyncIterator[list[tuple[str, bytes]]]:
        """(custom_id, body JSON as stored) in line order, a page per short query (keyset)."""
        after = 0
        query = sa.text(
            f"SELECT line_no, custom_id, request_body::text FROM {self._q}.completions "
            "WHERE batch_id = :b AND line_no > :after ORDER BY line_no LIMIT :n"
        )
        while True:
            with wrap_db_errors(f"reading the requests of batch {batch_id}"):
                async with self._engine.connect() as conn:
                    rows = (
                        await conn.execute(query, {"b": batch_id, "after": after, "n": page_size})
                    ).all()
            if not rows:
                return
            # Stored as json text, exactly as validated and encoded at create time.
            yield [(r[1], r[2].encode()) for r in rows]
            after = rows[-1][0]

    async def claim_submission(self, batch_id: uuid.UUID, *, seconds: float) -> datetime | None:
        """Take the right to submit a pending batch for ``seconds``.

        Returns None when taken, else when the current holder's lease ends. A holder that died
        is replaced once its lease runs out; its provider batch, if it made one, is re-attached.
        """
        async with self._tx(f"claiming batch {batch_id} for submission") as conn:
            claimed = (
                await conn.execute(
                    batches.update()
                    .where(
                        batches.c.id == batch_id,
                        _UNSUBMITTED,
                        sa.or_(
                            batches.c.submit_lease_until.is_(None),
                            batches.c.submit_lease_until < sa.func.now(),
                        ),
                    )
                    .values(submit_lease_until=sa.func.now() + timedelta(seconds=seconds))
                    .returning(batches.c.id)
                )
            ).first()
            if claimed is not None:
                return None
            held: datetime | None = (
                await conn.execute(
                    sa.select(batches.c.submit_lease_until).where(batches.c.id == batch_id)
                )
            ).scalar_one_or_none()
            return held or datetime.now(UTC)

    async def release_submission(self, batch_id: uuid.UUID) -> None:
        async with self._tx(f"releasing batch {batch_id}") as conn:
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.provider_batch_id.is_(None))
                .values(submit_lease_until=None)
            )

    async def record_input_file(self, batch_id: uuid.UUID, file_id: str) -> None:
        """Remember the uploaded file before creating the batch, so a retry need not re-upload."""
        async with self._tx(f"recording the input file of batch {batch_id}") as conn:
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.status == BatchStatus.PENDING.value)
                .values(input_file_id=file_id, updated_at=sa.func.now())
            )

    async def record_submission(self, batch_id: uuid.UUID, pb: ProviderBatch) -> Batch:
        """Provider ids, status, timestamps and counts; children become ``submitted``."""
        async with self._tx(f"recording the submission of batch {batch_id}") as conn:
            row = (
                await conn.execute(
                    batches.update()
                    .where(
                        batches.c.id == batch_id,
                        _UNSUBMITTED,
                    )
                    .values(
                        provider_batch_id=pb.id,
                        submitted_at=sa.func.now(),
                        submit_lease_until=None,
                        **provider_values(pb),
                        status=pb.status.value,
                        ended_at=sa.func.now() if pb.status.is_terminal else None,
                        input_file_id=pb.input_file_id or batches.c.input_file_id,
                    )
                    .returning(batches)
                )
            ).one_or_none()
            if row is None:
                raise InvalidBatchError(
                    f"batch {batch_id} was submitted by another caller meanwhile; provider "
                    f"batch {pb.id} is not recorded and should be cancelled"
                )
            await conn.execute(
                completions.update()
                .where(
                    completions.c.batch_id == batch_id,
                    completions.c.status == CompletionStatus.PENDING.value,
                )
                .values(
                    status=CompletionStatus.SUBMITTED.value,
                    started_at=sa.func.coalesce(completions.c.started_at, sa.func.now()),
                )
            )
        return batch_from_row(row)

    async def record_status(self, batch_id: uuid.UUID, pb: ProviderBatch) -> Batch:
        """Store what the provider reports, under a row lock; a status never goes backwards.

        A poll answered before a cancel but recorded after it cannot turn ``cancelling`` back
        into ``in_progress``, and nothing undoes a terminal status. For a terminal batch only
        file ids still missing are filled in: a lagging output file id can still arrive.
        """
        async with self._tx(f"recording the status of batch {batch_id}") as conn:
            current = (
                await conn.execute(
                    sa.select(batches.c.status).where(batches.c.id == batch_id).with_for_update()
                )
            ).scalar_one_or_none()
            if current is None:
                raise BatchNotFoundError(f"no batch {batch_id} in schema {self.schema!r}")
            update = batches.update().where(batches.c.id == batch_id).returning(batches)
            stored = BatchStatus(current)
            if stored.is_terminal:
                update = update.values(
                    output_file_id=sa.func.coalesce(batches.c.output_file_id, pb.output_file_id),
                    error_file_id=sa.func.coalesce(batches.c.error_file_id, pb.error_file_id),
                    updated_at=sa.func.now(),
                )
            elif pb.status.rank < stored.rank:
                update = update.values(updated_at=sa.func.now())  # a stale answer: keep ours
            else:
                update = update.values(
                    status=pb.status.value,
                    ended_at=sa.func.now() if pb.status.is_terminal else None,
                    **provider_values(pb),
                )
            row = (await conn.execute(update)).one()
        return batch_from_row(row)

    # -- results ------------------------------------------------------------------------------

    async def apply_outcomes(
        self,
        batch_id: uuid.UUID | None,
        outcomes: Sequence[ResultOutcome],
        *,
        completion_id: int | None = None,
    ) -> ApplyResult:
        """Write a chunk of outcomes in one statement; rows already terminal are left alone.

        ``outcomes`` must hold each custom_id once. With ``completion_id`` the single outcome
        targets that row (the realtime path) instead of matching on custom_id.
        """
        target = (
            "c.id = :completion_id"
            if completion_id is not None
            else "c.batch_id = :batch_id AND c.custom_id = v.custom_id"
        )
        # One jsonb document per chunk: the driver sends one parameter instead of 18 arrays
        # checked element by element, and the server parses it once (json_to_recordset would
        # parse each response body a second time to make it jsonb: twice the server time).
        sql = sa.text(f"""
            UPDATE {self._q}.completions AS c SET
                status = v.status,
                response_body = v.response_body,
                output_text = v.output_text,
                tool_calls = v.tool_calls,
                finish_reason = v.finish_reason,
                status_code = v.status_code,
                provider_request_id = v.provider_request_id,
                prompt_tokens = v.prompt_tokens,
                completion_tokens = v.completion_tokens,
                total_tokens = v.total_tokens,
                cached_tokens = v.cached_tokens,
                reasoning_tokens = v.reasoning_tokens,
                input_cost = v.input_cost,
                output_cost = v.output_cost,
                total_cost = v.input_cost + v.output_cost,
                failure_error = v.failure_error,
                failure_reason = v.failure_reason,
                started_at = coalesce(c.started_at, now()),
                completed_at = now()
            FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(
                custom_id text, status text, response_body jsonb, output_text text,
                tool_calls jsonb, finish_reason text, status_code int,
                provider_request_id text, prompt_tokens int, completion_tokens int,
                total_tokens int, cached_tokens int, reasoning_tokens int,
                input_cost numeric, output_cost numeric, failure_error text,
                failure_reason text)
            WHERE {target} AND c.status NOT IN ('completed', 'failed')
            RETURNING c.custom_id
        """)
        params = {
            "rows": outcome_rows(outcomes),
            "batch_id": batch_id,
            "completion_id": completion_id,
        }
        async with self._tx(f"applying results to batch {batch_id}") as conn:
            done = {r[0] for r in await conn.execute(sql, params)}
            missed = [o.custom_id for o in outcomes if o.custom_id not in done]
            known: set[str] = set()
            if missed and completion_id is None:
                known = set(
                    (
                        await conn.execute(
                            sa.select(completions.c.custom_id).where(
                                completions.c.batch_id == batch_id,
                                completions.c.custom_id.in_(missed),
                            )
                        )
                    ).scalars()
                )
        return ApplyResult(
            applied=len(done),
            already_applied=[c for c in missed if c in known],
            unknown=[c for c in missed if c not in known],
        )

    async def finish_results(
        self,
        batch_id: uuid.UUID,
        *,
        applied_files: tuple[str | None, str | None],
        failure_error: str,
        failure_reason: str,
        line_reasons: dict[int, str] | None = None,
    ) -> tuple[Batch, int] | None:
        """Fail every completion still open, sum the costs, stamp results_applied_at.

        Returns the batch and how many completions the sweep failed, or None, changing nothing,
        when the batch's (output, error) file ids are no longer ``applied_files``: a file that
        was not applied must not be swept as missing.
        """
        async with self._tx(f"finishing the results of batch {batch_id}") as conn:
            locked = (
                await conn.execute(
                    sa.select(batches.c.output_file_id, batches.c.error_file_id)
                    .where(batches.c.id == batch_id)
                    .with_for_update()
                )
            ).one_or_none()
            if locked is None:
                raise BatchNotFoundError(f"no batch {batch_id} in schema {self.schema!r}")
            if tuple(locked) != applied_files:
                return None
            swept = 0
            if line_reasons:
                result = await conn.execute(
                    sa.text(f"""
                        UPDATE {self._q}.completions AS c
                        SET status = 'failed', failure_error = :error,
                            failure_reason = v.reason, completed_at = now()
                        FROM unnest(CAST(:lines AS int[]), CAST(:reasons AS text[]))
                            AS v(line_no, reason)
                        WHERE c.batch_id = :b AND c.line_no = v.line_no
                          AND c.status NOT IN ('completed', 'failed')
                    """),
                    {
                        "b": batch_id,
                        "error": failure_error,
                        "lines": list(line_reasons),
                        "reasons": [r[:255] for r in line_reasons.values()],
                    },
                )
                swept += result.rowcount
            result = await conn.execute(
                completions.update()
                .where(
                    completions.c.batch_id == batch_id,
                    completions.c.status.not_in(_TERMINAL),
                )
                .values(
                    status=CompletionStatus.FAILED.value,
                    failure_error=failure_error,
                    failure_reason=failure_reason[:255],
                    started_at=sa.func.coalesce(completions.c.started_at, sa.func.now()),
                    completed_at=sa.func.now(),
                )
            )
            swept += result.rowcount
            sums = (
                sa.select(
                    sa.func.sum(completions.c.input_cost).label("i"),
                    sa.func.sum(completions.c.output_cost).label("o"),
                    sa.func.sum(completions.c.total_cost).label("t"),
                )
                .where(completions.c.batch_id == batch_id)
                .subquery()
            )
            row = (
                await conn.execute(
                    batches.update()
                    .where(batches.c.id == batch_id)
                    .values(
                        input_cost=sa.select(sums.c.i).scalar_subquery(),
                        output_cost=sa.select(sums.c.o).scalar_subquery(),
                        total_cost=sa.select(sums.c.t).scalar_subquery(),
                        results_applied_at=sa.func.coalesce(
                            batches.c.results_applied_at, sa.func.now()
                        ),
                        updated_at=sa.func.now(),
                    )
                    .returning(batches)
                )
            ).one()
        return batch_from_row(row), swept

    # -- completions --------------------------------------------------------------------------

    async def completion_pages(
        self,
        batch_id: uuid.UUID,
        *,
        status: CompletionStatus | None = None,
        page_size: int = 1_000,
    ) -> AsyncIterator[list[Completion]]:
        after = 0
        while True:
            query = (
                sa.select(completions)
                .where(completions.c.batch_id == batch_id, completions.c.line_no > after)
                .order_by(completions.c.line_no)
                .limit(page_size)
            )
            if status is not None:
                query = query.where(completions.c.status == status.value)
            with wrap_db_errors(f"reading the completions of batch {batch_id}"):
                async with self._engine.connect() as conn:
                    rows = (await conn.execute(query)).all()
            if not rows:
                return
            yield [completion_from_row(r) for r in rows]
            after = rows[-1].line_no

    async def get_completion(self, completion_id: int) -> Completion:
        with wrap_db_errors(f"reading completion {completion_id}"):
            async with self._engine.connect() as conn:
                row = (
                    await conn.execute(
                        sa.select(completions).where(completions.c.id == completion_id)
                    )
                ).one()
        return completion_from_row(row)

    async def create_live_completion(
        self, *, custom_id: str, body: dict[str, Any], metadata: dict[str, Any]
    ) -> int:
        """A completion outside any batch, for the realtime path."""
        async with self._tx("recording a live request") as conn:
            return int(
                (
                    await conn.execute(
                        completions.insert()
                        .values(
                            batch_id=None,
                            custom_id=custom_id,
                            line_no=1,
                            status=CompletionStatus.SUBMITTED.value,
                            request_body=body,
                            metadata=metadata,
                            started_at=sa.func.now(),
                        )
                        .returning(completions.c.id)
                    )
                ).scalar_one()
            )

    async def summary(self, batch_id: uuid.UUID) -> dict[str, Any]:
        """Counts by status and token sums, for reports."""
        c = completions.c
        query = (
            sa.select(
                c.status,
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(c.prompt_tokens), 0),
                sa.func.coalesce(sa.func.sum(c.completion_tokens), 0),
                sa.func.coalesce(sa.func.sum(c.cached_tokens), 0),
                sa.func.coalesce(sa.func.sum(c.reasoning_tokens), 0),
            )
            .where(c.batch_id == batch_id)
            .group_by(c.status)
        )
        with wrap_db_errors(f"summarising batch {batch_id}"):
            async with self._engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        by_status = {r[0]: int(r[1]) for r in rows}
        return {
            "by_status": by_status,
            "prompt_tokens": sum(int(r[2]) for r in rows),
            "completion_tokens": sum(int(r[3]) for r in rows),
            "cached_tokens": sum(int(r[4]) for r in rows),
            "reasoning_tokens": sum(int(r[5]) for r in rows),
        }
