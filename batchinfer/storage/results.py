"""The bulk result statements: one chunk of outcomes in one ``UPDATE ... FROM``, and the sweep
that fails what came back in neither file and totals the costs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from batchinfer.domain import Batch, CompletionStatus, ResultOutcome, ResultSources
from batchinfer.errors import BatchNotFoundError
from batchinfer.storage.database import Database
from batchinfer.storage.rows import RESULT_FIELDS, ResultColumns, batch_from_row
from batchinfer.storage.tables import batches, completions

_TERMINAL = (CompletionStatus.COMPLETED.value, CompletionStatus.FAILED.value)

# The apply statement, derived from the table: each field of a chunk (``rows.ResultColumns``)
# arrives as one array and is written to its column of that name, cast to the column's type on
# the server (so a value out of range fails there, as DataRejectedError); the total and the
# time are the server's.
_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


def _array_and_value(name: str) -> tuple[str, str]:
    """The array type a field travels in, and the expression that writes it to its column."""
    kind = completions.c[name].type
    if isinstance(kind, sa.JSON):  # JSONB too: text, parsed by the server
        return "text[]", f"CAST(v.{name} AS {kind.compile(dialect=_DIALECT)})"
    if isinstance(kind, sa.Numeric):
        # Money is read unrounded, so the total is the sum of the exact parts, rounded once.
        return "text[]", f"CAST(v.{name} AS numeric)"
    if isinstance(kind, sa.Integer):
        return "bigint[]", f"CAST(v.{name} AS {kind.compile(dialect=_DIALECT)})"
    return "text[]", f"v.{name}"


_TYPED = {name: _array_and_value(name) for name in RESULT_FIELDS}
_ARRAYS = ", ".join(
    ["CAST(:custom_ids AS text[])"] + [f"CAST(:{n} AS {_TYPED[n][0]})" for n in RESULT_FIELDS]
)
_COLUMNS = ", ".join(["custom_id", *RESULT_FIELDS])
_ASSIGNMENTS = ", ".join(
    [f"{name} = {_TYPED[name][1]}" for name in RESULT_FIELDS]
    + [
        f"total_cost = {_TYPED['input_cost'][1]} + {_TYPED['output_cost'][1]}",
        "completed_at = now()",
    ]
)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    already_applied: list[str]
    unknown: list[str]
    #: Already applied since ``since``: by this same pass, from an earlier line.
    applied_since: list[str] = field(default_factory=list)


class ResultStore:
    def __init__(self, db: Database) -> None:
        self.db = db

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
        return await self.apply_rows(
            batch_id, ResultColumns.of(outcomes), completion_id=completion_id
        )

    async def apply_rows(
        self,
        batch_id: uuid.UUID | None,
        rows: ResultColumns,
        *,
        completion_id: int | None = None,
        since: datetime | None = None,
    ) -> ApplyResult:
        """The same, for outcomes already flattened into columns. Rows already terminal are
        told apart by when they ended: at or after ``since`` (a pass's start) in
        ``applied_since``, before it in ``already_applied``.

        A batch's rows keep ``started_at`` empty: they started with their batch, which says
        when (see ``completions.py``)."""
        target = (
            "c.id = :completion_id"
            if completion_id is not None
            else "c.batch_id = :batch_id AND c.custom_id = v.custom_id"
        )
        # One array per column, each encoded by the driver as one binary parameter: the server
        # parses only the JSON bodies, where a JSON document of the whole chunk had it parse
        # every field (about half the statement's time), then build a record from each row.
        sql = sa.text(f"""
            UPDATE {self.db.q}.completions AS c SET {_ASSIGNMENTS}
            FROM unnest({_ARRAYS}) AS v({_COLUMNS})
            WHERE {target} AND c.status NOT IN ('completed', 'failed')
            RETURNING c.custom_id
        """)
        custom_ids = rows.custom_ids
        params: dict[str, Any] = dict(zip(RESULT_FIELDS, rows.values, strict=True))
        params |= {"custom_ids": custom_ids, "batch_id": batch_id, "completion_id": completion_id}
        async with self.db.tx(f"applying results to batch {batch_id}") as conn:
            done = {r[0] for r in await conn.execute(sql, params)}
            missed = [c for c in custom_ids if c not in done]
            ended: dict[str, datetime | None] = {}
            if missed and completion_id is None:
                ended = {
                    r.custom_id: r.completed_at
                    for r in await conn.execute(
                        sa.select(completions.c.custom_id, completions.c.completed_at).where(
                            completions.c.batch_id == batch_id,
                            completions.c.custom_id.in_(missed),
                        )
                    )
                }

        def lately(custom_id: str) -> bool:
            at = ended[custom_id]
            return since is not None and at is not None and at >= since

        return ApplyResult(
            applied=len(done),
            already_applied=[c for c in missed if c in ended and not lately(c)],
            unknown=[c for c in missed if c not in ended],
            applied_since=[c for c in missed if c in ended and lately(c)],
        )

    async def clock(self) -> datetime:
        """The database's time now: what ``since`` is measured by."""
        async with self.db.connect("reading the database's clock") as conn:
            now: datetime = (await conn.execute(sa.select(sa.func.now()))).scalar_one()
        return now

    async def finish_results(
        self,
        batch_id: uuid.UUID,
        *,
        applied_sources: ResultSources,
        failure_error: str,
        failure_reason: str,
        line_reasons: dict[int, str] | None = None,
    ) -> tuple[Batch, int] | None:
        """Fail every completion still open, sum the costs, stamp results_applied_at.

        Returns the batch and how many completions the sweep failed, or None, changing nothing,
        when the batch's result sources are no longer ``applied_sources``: results in a source
        that was not applied must not be swept as missing.
        """
        async with self.db.tx(f"finishing the results of batch {batch_id}") as conn:
            locked = (
                await conn.execute(
                    sa.select(batches.c.result_sources)
                    .where(batches.c.id == batch_id)
                    .with_for_update()
                )
            ).one_or_none()
            if locked is None:
                raise BatchNotFoundError(f"no batch {batch_id} in schema {self.db.schema!r}")
            stored = ResultSources.from_json(locked.result_sources or {})
            if stored.sources != applied_sources.sources:
                return None
            swept = 0
            if line_reasons:
                result = await conn.execute(
                    sa.text(f"""
                        UPDATE {self.db.q}.completions AS c
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
                    completed_at=sa.func.now(),
                )
            )
            swept += result.rowcount
            # One scan of the batch's rows for all three sums.
            row = (
                await conn.execute(
                    sa.text(f"""
                        UPDATE {self.db.q}.batches AS b SET
                            (input_cost, output_cost, total_cost) = (
                                SELECT sum(input_cost), sum(output_cost), sum(total_cost)
                                FROM {self.db.q}.completions WHERE batch_id = :b
                            ),
                            results_applied_at = coalesce(b.results_applied_at, now()),
                            step_failures = 0, last_error = NULL,
                            updated_at = now()
                        WHERE b.id = :b
                        RETURNING b.*
                    """).columns(*batches.c),
                    {"b": batch_id},
                )
            ).one()
            await self.db.notify(conn, f"results {batch_id}")
        return batch_from_row(row), swept
